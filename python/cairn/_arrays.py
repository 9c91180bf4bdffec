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


def _torch_to_numpy(t) -> np.ndarray:
    torch = _torch()
    t = t.detach()
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
    raw = np.frombuffer(buffer, dtype=np.uint8)
    return raw.view(NUMPY_DTYPES[dtype]).reshape(shape)


def cast(arr: np.ndarray, dtype: Any) -> np.ndarray:
    """Casts floating-point arrays to `dtype` (a Cairn name, numpy dtype or torch dtype);
    integer and boolean arrays are returned unchanged."""
    if arr.dtype.kind != "f" and arr.dtype not in (NUMPY_DTYPES["BF16"], NUMPY_DTYPES["F8_E4M3"], NUMPY_DTYPES["F8_E5M2"]):
        return arr
    return arr.astype(resolve_dtype(dtype))


def resolve_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype from a Cairn name (`"BF16"`), a numpy dtype or name, or a torch dtype."""
    if isinstance(dtype, str) and dtype.upper() in NUMPY_DTYPES:
        return NUMPY_DTYPES[dtype.upper()]
    torch = _torch()
    if torch is not None and isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
        return np.dtype(getattr(ml_dtypes, name, None) or name)
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(getattr(ml_dtypes, str(dtype)))


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


def to_framework(arr: np.ndarray, framework: str) -> Any:
    """Converts a numpy array to the requested framework's array type."""
    if framework == "numpy":
        return arr
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
        return jax.device_put(arr)
    raise ValueError(f'framework must be "numpy", "torch" or "jax", got framework=`{framework}`')
