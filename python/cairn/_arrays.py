"""Conversions between framework arrays (numpy, torch, jax) and raw little-endian bytes.

Everything here is zero-copy where the source allows it: a contiguous CPU array or tensor
reaches Rust as a view of its own memory; only CUDA tensors (copied to host), JAX arrays
(fetched from the device), non-contiguous or big-endian arrays are copied first.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

import ml_dtypes
import numpy as np

from ._cairn import InvalidArgumentError

# Cairn dtype name -> numpy dtype.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "C64": np.dtype(np.complex64),
}
_NAMES = {dtype: name for name, dtype in NUMPY_DTYPES.items()}
# torch dtype name (without `torch.`) -> Cairn dtype name.
_TORCH_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
}
# Why a dtype Cairn refuses has no safetensors counterpart, and what to do instead.
_UNSUPPORTED = {
    "complex128": "safetensors has no complex128: cast to complex64, or save the real and imaginary parts",
}


def _unsupported(key: str, dtype: Any) -> InvalidArgumentError:
    name = str(dtype).removeprefix("torch.")
    hint = _UNSUPPORTED.get(name)
    return InvalidArgumentError(f"unsupported dtype `{dtype}` key=`{key}`" + (f" ({hint})" if hint else ""))


def _torch():
    return sys.modules.get("torch")


def _jax():
    return sys.modules.get("jax")


def is_array(obj: Any) -> bool:
    """Whether `obj` is an array or tensor Cairn stores as a tensor."""
    if isinstance(obj, (np.ndarray, np.generic)) and not isinstance(obj, (np.str_, np.bytes_, np.object_)):
        return True
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        return True
    jax = _jax()
    return jax is not None and isinstance(obj, jax.Array)


def check_storable(key: str, obj: Any) -> None:
    """Refuses, naming `key`, an array or tensor that is not one dense tensor of a dtype
    Cairn stores: sparse and meta torch tensors, torch dtypes without a safetensors
    counterpart (`float8_e4m3fnuz`, `complex128`, ...), and typed jax PRNG keys."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            raise InvalidArgumentError(f"a {obj.layout} tensor is not stored (only dense ones): save .to_dense() key=`{key}`")
        if obj.is_meta:
            raise InvalidArgumentError(f"a meta tensor has no data to store key=`{key}`")
        torch_dtype_name(key, obj.dtype)
        return
    jax = _jax()
    if jax is not None and isinstance(obj, jax.Array) and jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):
        raise InvalidArgumentError(
            f"a typed jax PRNG key is not stored as it is: save jax.random.key_data(key) and restore it with "
            f"jax.random.wrap_key_data key=`{key}`"
        )


def _torch_to_numpy(t) -> np.ndarray:
    torch = _torch()
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    views = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    if t.dtype in views:
        raw, np_dtype = views[t.dtype]
        return t.view(raw).numpy().view(np_dtype)
    return t.numpy()


def prefetch(objs: Iterable[Any]) -> None:
    """Starts the device-to-host copy of every jax array that is not in host memory, so that
    the copies run together instead of one after another as each is converted."""
    jax = _jax()
    if jax is None:
        return
    for obj in objs:
        if isinstance(obj, jax.Array) and any(d.platform != "cpu" for d in obj.devices()):
            obj.copy_to_host_async()


def torch_dtype_name(key: str, dtype: Any) -> str:
    """The Cairn dtype name of a torch dtype (`torch.bfloat16` -> `"BF16"`)."""
    name = _TORCH_NAMES.get(str(dtype).removeprefix("torch."))
    if name is None:
        raise _unsupported(key, dtype)
    return name


def to_raw(key: str, obj: Any) -> tuple[str, list[int], np.ndarray]:
    """(dtype name, shape, 1-D uint8 view of the C-contiguous little-endian data)."""
    if type(obj) is np.ndarray and obj.flags.c_contiguous:
        # The common case, without the conversions below (a state can hold 100,000s).
        name = _NAMES.get(obj.dtype)
        if name is not None and obj.dtype.isnative and sys.byteorder == "little":
            return name, list(obj.shape), obj.reshape(-1).view(np.uint8)
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        arr = _torch_to_numpy(obj)
    else:
        arr = np.asarray(obj)
    dtype = arr.dtype
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(dtype.newbyteorder("<"))
        dtype = arr.dtype
    name = _NAMES.get(dtype)
    if name is None:
        raise _unsupported(key, dtype)
    shape = list(arr.shape)  # before ascontiguousarray, which turns 0-d into 1-d
    arr = np.ascontiguousarray(arr)
    return name, shape, arr.reshape(-1).view(np.uint8)


def from_buffer(dtype: str, shape: list[int], buffer: Any) -> np.ndarray:
    """A numpy array over a loaded tensor buffer (no copy)."""
    return np.ndarray(shape, NUMPY_DTYPES[dtype], buffer)


# The floating-point dtypes a cast goes to or from.
_FLOATS = {NUMPY_DTYPES[n] for n in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")}
# The spellings of a cast's dtype people use (lowercase) -> Cairn name.
_SPELLINGS = {
    "fp64": "F64", "float64": "F64", "double": "F64", "f64": "F64",
    "fp32": "F32", "float32": "F32", "f32": "F32",
    "fp16": "F16", "float16": "F16", "half": "F16", "f16": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "fp8": "F8_E4M3", "fp8_e4m3": "F8_E4M3", "float8_e4m3fn": "F8_E4M3", "f8_e4m3": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2", "float8_e5m2": "F8_E5M2", "f8_e5m2": "F8_E5M2",
}


def is_float(dtype: Any) -> bool:
    """Whether a numpy dtype is one of the floating-point dtypes a cast applies to."""
    return dtype in _FLOATS


def cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Casts a floating-point array to `dtype` (from `resolve_dtype`); integer, boolean
    and complex arrays are returned unchanged."""
    return arr.astype(dtype) if is_float(arr.dtype) and arr.dtype != dtype else arr


def cast_plan(dtype: Any) -> dict[str, np.dtype] | None:
    """A save's `dtype` as `{key prefix: dtype}`: one dtype casts every key (prefix
    `""`); a mapping (`{"model.": "bf16"}`) casts the keys under each prefix, the longest
    matching prefix deciding."""
    if dtype is None:
        return None
    if isinstance(dtype, dict):
        return {str(prefix): resolve_dtype(d) for prefix, d in dtype.items()}
    return {"": resolve_dtype(dtype)}


def cast_for(plan: dict[str, np.dtype], key: str) -> np.dtype | None:
    """The dtype `plan` (from `cast_plan`) casts `key` to, if any."""
    prefix = max((p for p in plan if key.startswith(p)), key=len, default=None)
    return None if prefix is None else plan[prefix]


def cast_leaf(obj: Any, dtype: np.dtype) -> Any:
    """A numpy array, torch tensor or jax array cast to `dtype` (from `resolve_dtype`) on
    its own device when it is floating point and not 0-d (a scalar such as an optimizer's
    step count stays exact); anything else as it is."""
    if getattr(obj, "ndim", 1) == 0:
        return obj
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        if not is_float(NUMPY_DTYPES.get(_TORCH_NAMES.get(str(obj.dtype).removeprefix("torch."), ""))):
            return obj
        target = getattr(torch, _NUMPY_TO_TORCH[dtype])
        return obj if obj.dtype == target else obj.detach().to(target)
    if hasattr(obj, "dtype") and hasattr(obj, "astype") and is_float(np.dtype(obj.dtype)):
        return obj if np.dtype(obj.dtype) == dtype else obj.astype(dtype)  # numpy, jax
    return obj


# numpy dtype -> torch dtype name (the inverse of `_TORCH_NAMES`).
_NUMPY_TO_TORCH = {NUMPY_DTYPES[name]: torch_name for torch_name, name in _TORCH_NAMES.items()}


def torch_dtype(name: str) -> Any:
    """The torch dtype of the Cairn dtype `name` (`"BF16"` -> `torch.bfloat16`)."""
    import torch

    return getattr(torch, _CAIRN_TO_TORCH[name])


# Cairn dtype name -> torch dtype name (the inverse of `_TORCH_NAMES`).
_CAIRN_TO_TORCH = {name: torch_name for torch_name, name in _TORCH_NAMES.items()}


def resolve_dtype(dtype: Any) -> np.dtype:
    """The floating-point dtype of a cast, from a Cairn name (`"BF16"`), a common spelling
    (`"bf16"`, `"fp16"`, `"half"`, `"fp32"`, `"fp8"`), a numpy dtype or a torch dtype;
    anything else is an `InvalidArgumentError`."""
    resolved = None
    if isinstance(dtype, str):
        name = dtype.strip()
        name = _SPELLINGS.get(name.lower(), name.upper())
        resolved = NUMPY_DTYPES.get(name)
    else:
        torch = _torch()
        if torch is not None and isinstance(dtype, torch.dtype):
            resolved = NUMPY_DTYPES.get(_TORCH_NAMES.get(str(dtype).removeprefix("torch."), ""))
        else:
            try:
                resolved = np.dtype(dtype)
            except TypeError:
                resolved = None
    if resolved is None or not is_float(resolved):
        raise InvalidArgumentError(
            f"cannot cast to dtype `{dtype}`: a cast is to a floating-point dtype "
            "(bf16, fp16, fp32, fp64, fp8 / fp8_e4m3, fp8_e5m2, or a numpy or torch dtype of these)"
        )
    return resolved


def torch_source(arr: np.ndarray) -> Any:
    """A torch tensor over `arr`'s memory without a copy, even when `arr` is read-only
    (a mapped checkpoint file): only to be read from, e.g. as the source of `copy_`."""
    import warnings

    import torch

    views = {
        np.dtype(ml_dtypes.bfloat16): (np.int16, torch.bfloat16),
        np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, torch.float8_e4m3fn),
        np.dtype(ml_dtypes.float8_e5m2): (np.uint8, torch.float8_e5m2),
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if arr.dtype in views:
            raw, torch_dtype = views[arr.dtype]
            return torch.from_numpy(arr.view(raw)).view(torch_dtype)
        return torch.from_numpy(arr)


def to_framework(arr: np.ndarray, framework: str, device: Any = None) -> Any:
    """Converts a numpy array to the requested framework's array type, on `device` if
    given (torch: a `torch.device` or its name, e.g. `"cuda:0"`; jax: a `jax.Device`)."""
    if framework == "numpy":
        return arr
    if framework == "torch" and device is not None:
        return to_framework(arr, "torch").to(device)
    if framework == "torch":
        import torch

        views = {
            np.dtype(ml_dtypes.bfloat16): (np.int16, torch.bfloat16),
            np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, torch.float8_e4m3fn),
            np.dtype(ml_dtypes.float8_e5m2): (np.uint8, torch.float8_e5m2),
        }
        if not arr.flags.writeable:
            arr = arr.copy()
        if arr.dtype in views:
            raw, torch_dtype = views[arr.dtype]
            return torch.from_numpy(arr.view(raw)).view(torch_dtype)
        return torch.from_numpy(arr)
    if framework == "jax":
        import jax

        # On a CPU device, device_put uses a 64-byte-aligned array in place (Cairn's shards
        # align large tensors so); jnp.asarray would always copy.
        return jax.device_put(arr, device)
    raise ValueError(f'framework must be "numpy", "torch" or "jax", got framework=`{framework}`')
