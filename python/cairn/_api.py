"""The public Python API: `save`, `load`, `prune`, `CheckpointManager`, `CheckpointInfo`."""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import functools
import json
import math
import os
import signal as _signal
import sys
import warnings
import weakref
from dataclasses import dataclass, field as _field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import _arrays, _cairn, _sharded, _tree
from ._policy import Every, Keep, KeepLast, retention as _retention


@dataclass(frozen=True)
class CheckpointInfo:
    """What is known about a committed checkpoint without loading it."""

    step: int
    created: _dt.datetime
    temporary: bool
    metrics: dict[str, float]
    metadata: Any
    save_id: str
    uri: str
    num_tensors: int
    tensor_bytes: int
    #: Bytes of the data files in the checkpoint's own folder: what its save wrote (less
    #: than `tensor_bytes` when an incremental save found tensors already stored).
    written_bytes: int
    #: How long its save took, as the save measured itself, in seconds: `snapshot` (the
    #: loop blocked while a manager copied the state; absent otherwise) and `write`
    #: (from the start of the save to its commit). Empty for multi-rank saves.
    timings: dict[str, float] = _field(default_factory=dict)

    @classmethod
    def _from_native(cls, d: dict) -> "CheckpointInfo":
        created = _dt.datetime.fromtimestamp(d["created_unix_ms"] / 1000, tz=_dt.timezone.utc)
        return cls(
            step=d["step"],
            created=created,
            temporary=d["temporary"],
            metrics=dict(d["metrics"]),
            metadata=json.loads(d["metadata_json"]),
            save_id=d["save_id"],
            uri=d["uri"],
            num_tensors=d["num_tensors"],
            tensor_bytes=d["tensor_bytes"],
            written_bytes=d["written_bytes"],
            timings=dict(d["timings"]),
        )


_ARGUMENT_ERRORS = (TypeError, ValueError, AttributeError, OverflowError, KeyError, IndexError)


def _typed(fn: Callable) -> Callable:
    """Makes `fn` raise only `CheckpointError` subclasses: an argument Python or the
    binding cannot convert (a wrong type, a negative step, a malformed rename) becomes
    `InvalidArgumentError` naming the call, with the original error as its cause."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _ARGUMENT_ERRORS as e:
            raise _cairn.InvalidArgumentError(
                f"invalid argument to {fn.__qualname__}: {type(e).__name__}: {e}"
            ) from e

    return wrapper


def _uri(path: str | os.PathLike) -> str:
    return os.fspath(path)


def _metrics(metrics: dict[str, float] | None) -> list[tuple[str, Any]] | None:
    return None if metrics is None else [(str(k), v) for k, v in metrics.items()]


def _metadata(metadata: Any) -> str | None:
    if metadata is None:
        return None
    try:
        return json.dumps(metadata, allow_nan=False)
    except TypeError as e:
        raise _cairn.InvalidArgumentError(f"metadata is not json-serializable: {e}") from None
    except ValueError:
        raise _cairn.InvalidArgumentError(
            f"metadata holds a NaN or infinite number, which JSON cannot store key=`{_non_finite(metadata, '')}`"
        ) from None


def _non_finite(obj: Any, path: str) -> str | None:
    """The key path of the first NaN or infinite float in `obj`, if any."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "_"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _rename(rename: Any) -> list[tuple[str, str]] | None:
    if rename is None:
        return None
    if isinstance(rename, dict):
        return [(str(k), str(v)) for k, v in rename.items()]
    return [(str(k), str(v)) for k, v in rename]


def _prefixes(prefix: str | Sequence[str] | None) -> list[str] | None:
    if prefix is None:
        return None
    return [prefix] if isinstance(prefix, str) else list(prefix)


def _arrays_wanted(framework: str, dtype: Any) -> tuple[Any, dict[str, Any]] | None:
    """What a native load needs to give its tensors as numpy arrays, as loaded (plain
    numpy, no cast): made there, 100,000 tiny tensors take half the time."""
    return (np.ndarray, _arrays.NUMPY_DTYPES) if framework == "numpy" and dtype is None else None


def _build(native: tuple, *, dtype: Any, framework: str, renamed: bool, device: Any = None) -> Any:
    """A native load's result as the caller's state: tensors as `framework` arrays (on
    `device`), floating-point ones cast to `dtype` (from `_arrays.resolve_dtype`)."""
    leaves, structure, info = native
    if isinstance(leaves, dict):  # numpy arrays as loaded, made natively (`_arrays_wanted`)
        return leaves if renamed else _tree.unflatten(structure, leaves, info.get("uri", ""))
    out: dict[str, Any] = {}
    # Plain numpy arrays, as loaded, are the common case: made here without a call per
    # tensor (100,000 tiny tensors are made in a third less time).
    plain = framework == "numpy" and dtype is None
    dtypes = _arrays.NUMPY_DTYPES
    for leaf in leaves:
        if leaf[1] == "tensor":
            key, _, name, shape, buffer = leaf
            arr = np.ndarray(shape, dtypes[name], buffer)
            if not arr.flags.writeable:
                arr = arr.copy()
            if plain:
                out[key] = arr
                continue
            if dtype is not None:
                arr = _arrays.cast(arr, dtype)
            out[key] = _arrays.to_framework(arr, framework, device)
        else:
            key, _, value = leaf
            out[key] = value
    return dict(out) if renamed else _tree.unflatten(structure, out, info.get("uri", ""))


@_typed
def save(
    path: str | os.PathLike,
    state: Any,
    *,
    step: int | None = None,
    metadata: Any = None,
    metrics: dict[str, float] | None = None,
    storage_options: dict[str, str] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    all_gather: Callable[[bytes], list[bytes]] | None = None,
    timeout: float = 600.0,
    dtype: Any = None,
    incremental: bool = False,
) -> CheckpointInfo:
    """Saves `state` and commits it; returns once it is durable.

    With `incremental` (and a `step`), only the tensors whose content no committed
    checkpoint of the run already holds are written; the others are referred to (see
    `CheckpointManager`). A multi-process save writes everything.

    `dtype` casts floating-point tensors before they are written, each on its own device
    (`"bf16"`, `"fp16"`, `"fp32"`, `"fp8"`, or a numpy or torch dtype), or only those under
    some key prefixes (`{"model.": "bf16"}`); integer, boolean, complex and 0-d tensors
    are saved as they are. A cast loses precision: cast the weights you export, not the
    optimizer state a run resumes from (a load into a target refuses another dtype).

    `state` is nested dicts, lists and tuples of numpy arrays, torch tensors, jax arrays and
    plain values. With `step`, `path` is a run and the checkpoint goes to
    `path/step-<step>`; without, `path` is the checkpoint folder. A committed checkpoint is
    never overwritten (`AlreadyExistsError`). `storage_options` are object_store settings
    (e.g. `{"aws_endpoint": ..., "aws_allow_http": "true"}`) that override the environment.

    Several processes save one checkpoint together by each calling `save` with its `rank`
    and the `world_size`: leaves that are `cairn.Piece`s are this rank's pieces of sharded
    tensors; other tensors held by several ranks with the same contents are replicated
    (written once overall, the work balanced across ranks), and with different contents
    (an RNG state) each rank's own, as are plain values that differ from rank 0's
    (`load(rank=)` gives each its own back). The ranks coordinate through the store alone,
    or through `all_gather` (e.g. `cairn.torch_all_gather()`); one commit makes the
    checkpoint visible once every rank's data is durable, and every rank gets the same
    outcome. A rank that does not show up within `timeout` seconds fails the save.

    The frameworks' sharded arrays are saved as they are held, each process writing only
    its own pieces: torch `DTensor` (FSDP2, tensor parallel, any mesh), `ShardedTensor`
    (FSDP1) and sharded `jax.Array`s. With such a state and no `rank`/`world_size`, they
    come from the job: `torch.distributed` (its collectives coordinate, never pickling,
    and every rank of the default group must call `save`; `timeout` does not apply) or
    `jax.distributed`; a single process holding every piece saves alone."""
    leaves = _tree.flatten(state, _arrays.cast_plan(dtype))
    rank, world_size, all_gather = _job(rank, world_size, all_gather, leaves.sharded)
    info = _cairn.save(
        _uri(path),
        leaves.tensors,
        leaves.values,
        leaves.structure,
        step,
        _metrics(metrics),
        _metadata(metadata),
        storage_options,
        rank,
        world_size,
        all_gather,
        timeout,
        incremental,
    )
    return CheckpointInfo._from_native(info)


@_typed
def load(
    path: str | os.PathLike,
    *,
    prefix: str | Sequence[str] | None = None,
    keys: Iterable[str] | None = None,
    rename: Any = None,
    dtype: Any = None,
    framework: str = "numpy",
    step: int | None = None,
    storage_options: dict[str, str] | None = None,
    boxes: dict[str, tuple[Sequence[int], Sequence[int]]] | None = None,
    target: Any = None,
    rank: int | None = None,
    slices: dict[str, tuple[Sequence[int], Sequence[int]]] | None = None,
    device: Any = None,
    map_location: Any = None,
    progress: Callable[[str, int], Any] | None = None,
) -> Any:
    """Loads a checkpoint folder, or the latest (or given `step`) checkpoint of a run.

    `prefix` / `keys` select flattened keys (`"model."`); `rename` is a list of
    `(regex, replacement)` applied to keys (the result is then a flat dict); `dtype` casts
    floating-point tensors (`"bf16"`, `"fp16"`, `"fp32"`, ... or a numpy or torch dtype);
    `framework` is `"numpy"`, `"torch"` or `"jax"`, and `device` (or `map_location`, as
    `torch.load` calls it) the device the tensors go to: a `torch.device` or its name
    (`"cuda:0"`), or a `jax.Device`. Every checksum
    is verified; nothing is unpickled. `boxes` maps a (flattened) key to `(offsets,
    shape)`: only that box of the tensor is returned, read from the pieces that overlap it
    (a checkpoint saved by N ranks loads on M ranks). `slices` is its deprecated name.

    `target` loads into what the job already has, like torch DCP and Orbax: a state of the
    same nesting whose torch tensors (plain, `DTensor` on any mesh, `ShardedTensor`) and
    numpy arrays are filled in place, and whose `jax.Array`s or abstract
    `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` become arrays with that sharding,
    each process reading only the boxes its tensors or devices hold, on any number of
    processes. Every key of `target` must be in the checkpoint with the same global shape
    and dtype (keys of the checkpoint the target lacks are not read). The target's
    structure is returned, its containers' types kept (NamedTuples stay NamedTuples), its
    plain values replaced by the loaded ones. In a multi-process job pass `step`, so that
    every process reads the same checkpoint.

    A multi-process save keeps each rank's own plain values (and nesting) where they
    differ from rank 0's; `rank` chooses whose to read: by default this process's rank in
    a `torch.distributed` (or multi-process jax) job, else rank 0's.

    `progress(stage, nbytes)` is told the tensor bytes read and checked (`"reading"`),
    as each data file (at most 512 MiB as Cairn writes them) is done, in steps of at
    least a few MiB; the total is the selected tensors' bytes."""
    if framework not in ("numpy", "torch", "jax"):
        raise _cairn.InvalidArgumentError(f'framework must be "numpy", "torch" or "jax", got framework=`{framework}`')
    device = _device(device, map_location, framework)
    if target is not None:
        if any(x is not None for x in (prefix, keys, rename, dtype, boxes, slices, device)) or framework != "numpy":
            raise _cairn.InvalidArgumentError(
                "a load into `target` takes no prefix, keys, rename, dtype, boxes, device or framework "
                "(the target's tensors say where and how)"
            )
        return _load_into(_uri(path), target, step, storage_options, _own_rank(rank), progress)
    dtype = None if dtype is None else _arrays.resolve_dtype(dtype)
    if slices is not None:
        if boxes is not None:
            raise _cairn.InvalidArgumentError("pass `boxes` only (`slices` is its deprecated name)")
        warnings.warn("cairn.load(slices=...) is now cairn.load(boxes=...)", DeprecationWarning, stacklevel=3)
        boxes = slices
    with _tree.gc_paused():
        native = _cairn.open(_uri(path), step, storage_options).load(
            _prefixes(prefix),
            None if keys is None else list(keys),
            _rename(rename),
            None if boxes is None else {k: ([int(o) for o in off], [int(d) for d in shp]) for k, (off, shp) in boxes.items()},
            None,
            _own_rank(rank),
            progress,
            _arrays_wanted(framework, dtype),
        )
        return _build(native, dtype=dtype, framework=framework, renamed=rename is not None, device=device)


def _device(device: Any, map_location: Any, framework: str) -> Any:
    """The device a load puts tensors on: `device` or its `torch.load` name
    `map_location` (not both), for the torch or jax framework."""
    if device is not None and map_location is not None:
        raise _cairn.InvalidArgumentError("pass `device` or `map_location`, not both")
    device = map_location if device is None else device
    if device is not None and framework == "numpy":
        raise _cairn.InvalidArgumentError(f"device=`{device}` needs framework=\"torch\" or \"jax\" (numpy arrays live on the host)")
    if device is not None and framework == "torch" and not isinstance(device, str):
        import torch

        if not isinstance(device, torch.device):
            raise _cairn.InvalidArgumentError(f"device must be a torch.device or its name for torch, got `{device!r}`")
    return device


def _own_rank(rank: int | None) -> int | None:
    """The rank whose plain values a load reads: `rank` if given, else this process's in
    a multi-process job (torch.distributed, then jax), else None (rank 0's)."""
    if rank is not None:
        return rank
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    if _jax_job():
        return sys.modules["jax"].process_index()
    return None


def _jax_job() -> bool:
    """Whether this process is one of a multi-process jax job (asked without starting
    jax's backends when the job never initialised `jax.distributed`)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


def _load_into(
    uri: str,
    target: Any,
    step: int | None,
    storage_options: dict[str, str] | None,
    rank: int | None,
    progress: Callable[[str, int], Any] | None,
) -> Any:
    """`load(target=...)`: fills the target's tensors in place (makes its jax arrays on
    their devices), one read of each box; returns the target's structure, its containers'
    types kept."""
    leaves = _tree.leaves_of(target)
    places = {key: _reads(_sharded.targets(key, obj)) for key, obj in leaves.items()}
    shapes = {key: [int(d) for d in obj.shape] for key, obj in leaves.items() if places[key] is not None}
    filled: dict[str, Any] = {}
    on_devices: dict[str, list[Any]] = {}
    # The checkpoint is opened once (its manifest read and validated once). One read per
    # batch: the i-th box of every key that has one (a ShardedTensor may hold several
    # boxes of one tensor), at most `_LOAD_BATCH_BYTES` at a time; plain values come with
    # the first. The next batch is read (on a thread, without the GIL) while this one is
    # copied into the target, so at most two batches are mapped at once, and each
    # batch's mapping is let go once copied. The loaded bytes are copied once, into the
    # target.
    for key in [k for k, p in places.items() if p == []]:
        # Nothing of this tensor lives in this process (no local shard): nothing to read.
        del places[key]
        filled[key] = leaves[key]
    reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cairn-load")
    with _tree.gc_paused(), reader:
        opened = _cairn.open(uri, step, storage_options)
        batches = list(_batches(places, {k: _itemsize(leaves[k]) for k, p in places.items() if p is not None}))

        def read(keys: dict[str, int]) -> tuple:
            boxes = {k: (places[k][i][1], places[k][i][2]) for k, i in keys.items() if places[k] is not None}
            return opened.load(None, list(keys), None, boxes, {k: shapes[k] for k in boxes}, rank, progress)

        ahead = reader.submit(read, batches[0]) if batches else None
        for n, keys in enumerate(batches):
            native = ahead.result()
            ahead = reader.submit(read, batches[n + 1]) if n + 1 < len(batches) else None
            got = _raw(native)
            for key, i in keys.items():
                if places[key] is None:
                    filled[key] = got[key]
                    continue
                for dest, within in places[key][i][0]:
                    part = got[key] if within is None else got[key][within]
                    if isinstance(dest, _sharded.Devices):
                        on_devices.setdefault(key, []).extend(_to_devices(key, leaves[key], part, dest))
                    else:
                        _fill(key, dest, part)
                        filled[key] = leaves[key]
            del native, got  # let this batch's mapping go
    for key, parts in on_devices.items():
        import jax

        obj = leaves[key]
        filled[key] = jax.make_array_from_single_device_arrays(tuple(obj.shape), _sharded.jax_sharding(obj), parts)
    return _tree.rebuild(target, filled)


def _reads(places: list[tuple[Any, list[int], list[int]]] | None) -> list[tuple[list[tuple[Any, Any]], list[int], list[int]]] | None:
    """The reads of a load into one target leaf, from its places (`(destination, offsets,
    shape)` per box, see `_sharded.targets`): `([(destination, slices within the read)],
    offsets, shape)` per read. Boxes that tile their bounding box (the column blocks a
    jax process's devices hold, a ShardedTensor's local shards) are read as that one box,
    each piece of the checkpoint read and verified once, and then sliced; other boxes are
    read one by one (`slices` None: the whole read)."""
    if places is None or len(places) < 2:
        return None if places is None else [([(dest, None)], offsets, shape) for dest, offsets, shape in places]
    low = [min(o[d] for _, o, _ in places) for d in range(len(places[0][1]))]
    high = [max(o[d] + s[d] for _, o, s in places) for d in range(len(places[0][1]))]
    bounds = [h - lo for lo, h in zip(low, high)]
    if sum(int(np.prod(s, dtype=np.int64)) for _, _, s in places) != int(np.prod(bounds, dtype=np.int64)):
        return [([(dest, None)], offsets, shape) for dest, offsets, shape in places]
    within = [(dest, tuple(slice(o - lo, o - lo + n) for o, lo, n in zip(offsets, low, shape))) for dest, offsets, shape in places]
    return [(within, low, bounds)]


# The most bytes of boxes one batch of a load into a target reads.
_LOAD_BATCH_BYTES = 64 << 20


def _itemsize(obj: Any) -> int:
    """Bytes per element of a target tensor or array."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj.dtype, torch.dtype):
        return int(obj.dtype.itemsize)  # tensors, DTensors, ShardedTensors
    return int(np.dtype(obj.dtype).itemsize)  # numpy, jax arrays and ShapeDtypeStructs


def _batches(places: dict[str, Any], itemsizes: dict[str, int]) -> Iterator[dict[str, int]]:
    """Batches of `{key: index of its box}` for `_load_into`: each key's boxes in order
    (a key appears once per batch), plain values in the first batch, at most
    `_LOAD_BATCH_BYTES` of boxes per batch unless one box alone is larger."""
    pending = {k: 0 for k in places}
    while pending:
        batch: dict[str, int] = {}
        size = 0
        for key, i in list(pending.items()):
            place = places[key]
            if place is None:
                batch[key] = 0
                del pending[key]
                continue
            nbytes = int(np.prod(place[i][2], dtype=np.int64)) * itemsizes[key]
            if batch and size + nbytes > _LOAD_BATCH_BYTES:
                continue
            batch[key] = i
            size += nbytes
            if i + 1 < len(place):
                pending[key] = i + 1
            else:
                del pending[key]
        yield batch


def _raw(native: tuple) -> dict[str, Any]:
    """A native load's leaves by key: tensors as numpy arrays over the loaded bytes (no
    copy; read-only when mapped), values as they are."""
    out: dict[str, Any] = {}
    for leaf in native[0]:
        if leaf[1] == "tensor":
            key, _, name, shape, buffer = leaf
            out[key] = _arrays.from_buffer(name, shape, buffer)
        else:
            out[leaf[0]] = leaf[2]
    return out


def _to_devices(key: str, obj: Any, loaded: np.ndarray, dest: Any) -> list[Any]:
    """One box of a jax target, put on each of its devices; the dtypes must agree. On
    host (CPU) devices the box is first made one writable, C-ordered, 64-byte aligned
    array, which jax takes without a copy: one copy per box, not one per device holding
    it (a replicated box), and no array aliasing the checkpoint's read-only mapping."""
    import jax

    if np.dtype(obj.dtype) != loaded.dtype:
        raise _cairn.InvalidArgumentError(f"dtype {loaded.dtype} in the checkpoint, {obj.dtype} in the target key=`{key}`")
    if all(device.platform == "cpu" for device in dest.devices):
        loaded = _host_owned(loaded)
    return [jax.device_put(loaded, device) for device in dest.devices]


# The alignment jax's host devices need to take a numpy array without copying it.
_HOST_ALIGN = 64


def _host_owned(loaded: np.ndarray) -> np.ndarray:
    """`loaded` as a writable, C-ordered, `_HOST_ALIGN`-aligned array: itself when it is
    one, else one copy."""
    if loaded.flags.c_contiguous and loaded.flags.writeable and loaded.ctypes.data % _HOST_ALIGN == 0:
        return loaded
    raw = np.empty(loaded.nbytes + _HOST_ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _HOST_ALIGN
    out = raw[start : start + loaded.nbytes].view(loaded.dtype).reshape(loaded.shape)
    np.copyto(out, loaded)
    return out


def _fill(key: str, dest: Any, loaded: np.ndarray) -> None:
    """Copies the loaded array into `dest` (a torch tensor or numpy array) in place; the
    dtypes must agree (no silent cast)."""
    if isinstance(dest, np.ndarray):
        if dest.dtype != loaded.dtype:
            raise _cairn.InvalidArgumentError(f"dtype {loaded.dtype} in the checkpoint, {dest.dtype} in the target key=`{key}`")
        np.copyto(dest, loaded.reshape(dest.shape))
        return
    import torch

    source = _arrays.torch_source(loaded)
    if source.dtype != dest.dtype:
        raise _cairn.InvalidArgumentError(f"dtype {source.dtype} in the checkpoint, {dest.dtype} in the target key=`{key}`")
    with torch.no_grad():
        dest.copy_(source.reshape(dest.shape))


def _job(
    rank: int | None, world_size: int | None, all_gather: Callable | None, sharded: bool
) -> tuple[int, int, Callable | None]:
    """The rank, world size and all-gather of a save: as given, else the job's when the
    state holds a framework's sharded arrays, else one process alone."""
    if (rank is None) != (world_size is None):
        raise _cairn.InvalidArgumentError("pass rank and world_size together (or neither)")
    if rank is not None or not sharded:
        return (0 if rank is None else rank), (1 if world_size is None else world_size), all_gather
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        dist = torch.distributed
        return dist.get_rank(), dist.get_world_size(), all_gather or torch_all_gather()
    if _jax_job():
        jax = sys.modules["jax"]
        return jax.process_index(), jax.process_count(), all_gather
    return 0, 1, all_gather


def _manager_job(
    rank: int | None, world_size: int | None, group: Any, timeout: float
) -> tuple[int, int, Callable | None]:
    """The rank, world size and all-gather of a manager: as given (coordinated through
    the store), else `group`'s or the `torch.distributed` job's (over a new gloo group of
    the manager's own, whose collectives give up after `timeout` seconds), else the
    multi-process jax job's, else one process alone. A given group must be a gloo group
    holding this process: the manager's collectives run on its background thread, where
    an NCCL group would run on whatever device that thread sees."""
    if (rank is None) != (world_size is None):
        raise _cairn.InvalidArgumentError("pass rank and world_size together (or neither)")
    if rank is not None:
        if group is not None:
            raise _cairn.InvalidArgumentError("pass process_group or rank and world_size, not both")
        return rank, world_size, None
    torch = sys.modules.get("torch")
    job = torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()
    if group is not None and not job:
        raise _cairn.InvalidArgumentError("process_group needs an initialised torch.distributed")
    if job:
        dist = torch.distributed
        if dist.get_world_size() == 1 and group is None:
            return 0, 1, None
        if group is None:
            # Saves run on the manager's background thread: a group of their own keeps
            # their collectives apart from the training loop's. A collective no other rank
            # joins (a rank that died) fails after the manager's timeout, not gloo's 30 min.
            group = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=timeout))
        elif dist.get_rank(group) < 0:
            raise _cairn.InvalidArgumentError(
                f"this process (rank {dist.get_rank()}) is not in process_group; create the manager only "
                "on the group's ranks"
            )
        elif "gloo" not in str(dist.get_backend(group)):
            raise _cairn.InvalidArgumentError(
                f"process_group has backend {dist.get_backend(group)!r}: a manager saves on a background "
                "thread and needs a gloo group (torch.distributed.new_group(backend='gloo'))"
            )
        return dist.get_rank(group), dist.get_world_size(group), torch_all_gather(group)
    if _jax_job():
        jax = sys.modules["jax"]
        return jax.process_index(), jax.process_count(), None
    return 0, 1, None


def torch_all_gather(group: Any = None) -> Callable[[bytes], list[bytes]]:
    """An `all_gather` for `save` over `torch.distributed` (any backend, gloo included):
    byte strings travel as uint8 tensors, never pickled."""
    import torch
    import torch.distributed as dist

    def gather(payload: bytes) -> list[bytes]:
        world = dist.get_world_size(group)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        longest = int(max(s.item() for s in sizes))
        mine = torch.zeros(longest, dtype=torch.uint8, device=device)
        mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else mine[:0]
        buffers = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
        dist.all_gather(buffers, mine, group=group)
        return [bytes(b[: int(s.item())].cpu().numpy().tobytes()) for b, s in zip(buffers, sizes)]

    return gather


class DamagedCheckpointWarning(UserWarning):
    """A committed checkpoint of a run could not be read (damaged manifest, newer format)
    and was skipped; the message names it. It is never deleted by retention."""


def _warn_passed_over(messages: list[str]) -> None:
    for message in messages:
        warnings.warn(f"passed over a copy that could not be restored: {message}", DamagedCheckpointWarning, stacklevel=4)


@_typed
def list_checkpoints(path: str | os.PathLike, *, storage_options: dict[str, str] | None = None) -> list[CheckpointInfo]:
    """The readable committed checkpoints of the run at `path`, in step order. Each
    damaged one is skipped with a `DamagedCheckpointWarning` naming it."""
    infos, damaged = _cairn.list_checkpoints(_uri(path), storage_options)
    for message in damaged:
        warnings.warn(f"skipped a damaged checkpoint: {message}", DamagedCheckpointWarning, stacklevel=2)
    return [CheckpointInfo._from_native(d) for d in infos]


@dataclass(frozen=True)
class PruneReport:
    """What `prune` did (or, on a dry run, would do)."""

    deleted: list[int]
    kept: int
    damaged: list[str]
    removed: list[str]


@_typed
def prune(
    path: str | os.PathLike,
    *,
    keep: Keep | Sequence[Keep] = (),
    grace: float | _dt.timedelta = 3600.0,
    dry_run: bool = False,
    storage_options: dict[str, str] | None = None,
    keep_last: int | None = None,
    keep_every: int | None = None,
    keep_best: int | None = None,
    metric: str | None = None,
    mode: str = "min",
) -> PruneReport:
    """Applies the retention rules `keep` (`cairn.KeepLast`, `KeepEvery`, `KeepBest`) to
    the run at `path` (never the latest checkpoint, never a damaged one), then removes
    what unfinished saves left behind once older than `grace` (seconds or a timedelta),
    like `cairn prune`. The flat `keep_last=`... flags are deprecated."""
    legacy = dict(keep_last=keep_last, keep_every=keep_every, keep_best=keep_best, metric=metric, mode=mode)
    last, every, best = _retention(keep, legacy)
    deleted, kept, damaged, removed = _cairn.prune(
        _uri(path), last, every, best, _seconds(grace), dry_run, storage_options
    )
    return PruneReport(deleted, kept, damaged, removed)


def _newest_step(path: str | os.PathLike, storage_options: dict[str, str] | None = None) -> int | None:
    """The step of the newest committed checkpoint of the run `path`; None if it holds
    none (or is not there)."""
    try:
        return max((info.step for info in list_checkpoints(path, storage_options=storage_options)), default=None)
    except _cairn.CheckpointNotFoundError:
        return None


def _replace_newest(
    path: str | os.PathLike, state: Any, step: int, storage_options: dict[str, str] | None = None, **job: Any
) -> None:
    """Commits `state` as the newest checkpoint of the run `path` (a path that names one
    checkpoint to its framework: Lightning's `last.ckpt`, the Trainer's
    `checkpoint-500`), then drops the older ones. Its step is `step`, or one past the
    newest already there: the older checkpoint stays whole until the new one is
    committed. `job` is `save`'s rank, world_size and all_gather; rank 0 drops."""
    newest = _newest_step(path, storage_options)
    step = step if newest is None else max(step, newest + 1)
    save(path, state, step=step, storage_options=storage_options, **job)
    if job.get("rank", 0) == 0:
        prune(path, keep=KeepLast(1), storage_options=storage_options)


@_typed
def copy(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    src_options: dict[str, str] | None = None,
    dst_options: dict[str, str] | None = None,
    progress: Callable[[str, int], Any] | None = None,
) -> list[CheckpointInfo]:
    """Copies a checkpoint folder, or every checkpoint of a run, between any two stores
    (e.g. local disk and `s3://`), verified at the destination. Running it again after
    an interruption resumes; what is already there is kept. `progress(stage, nbytes)`
    is told the bytes of the data files as they are copied (`"copying"`) and then
    verified at the destination (`"verifying"`), in steps of a few MiB."""
    copied = _cairn.copy(_uri(src), _uri(dst), src_options, dst_options, progress)
    return [CheckpointInfo._from_native(d) for d in copied]


@_typed
def to_bytes(path: str | os.PathLike, *, storage_options: dict[str, str] | None = None) -> bytes:
    """Packs a checkpoint (or a run's latest) into one self-contained byte bundle."""
    return _cairn.to_bytes(_uri(path), storage_options)


@_typed
def from_bytes(bundle: bytes, path: str | os.PathLike, *, storage_options: dict[str, str] | None = None) -> CheckpointInfo:
    """Unpacks a bundle from `to_bytes` into the checkpoint folder `path`, verified."""
    return CheckpointInfo._from_native(_cairn.from_bytes(bundle, _uri(path), storage_options))


@_typed
def as_directory(
    path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    storage_options: dict[str, str] | None = None,
) -> str:
    """A local read-only directory holding the checkpoint at `path` (any URI): its own
    folder when local, else a copy downloaded once into `cache_dir` (default
    `$CAIRN_CACHE_DIR` or `~/.cache/cairn`), safe when several processes ask at once.
    `storage_options` are the store's settings, as for `load`."""
    if cache_dir is None:
        cache_dir = os.environ.get("CAIRN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cairn")
    os.makedirs(cache_dir, exist_ok=True)
    return os.fspath(_cairn.as_directory(_uri(path), os.fspath(cache_dir), storage_options))


@_typed
def register_scheme(prefix: str, resolver: Callable[[str], str]) -> None:
    """Registers a URI prefix (e.g. `"mystore://"`): `resolver(uri)` returns the URI Cairn
    should use instead (a path, `s3://...`). The longest registered prefix wins."""
    _cairn.register_scheme(prefix, resolver)


@_typed
def unregister_scheme(prefix: str) -> bool:
    """Removes a prefix registered with `register_scheme`; returns whether it was there."""
    return _cairn.unregister_scheme(prefix)


def _prepare(
    state: Any, metrics: dict[str, float] | None, metadata: Any, world_size: int, dtype: Any
) -> Callable[[], tuple]:
    """What the native manager calls, only when a step saves, to read the state (its
    floating-point tensors cast to `dtype` if given). A state of a framework's sharded
    arrays in a manager of one rank, inside a job of several, is refused (each process
    would save its pieces alone)."""

    def prepare() -> tuple:
        leaves = _tree.flatten(state, dtype)
        if leaves.sharded and world_size == 1:
            job_rank, job_world, _ = _job(None, None, None, True)
            if job_world > 1:
                raise _cairn.InvalidArgumentError(
                    f"a sharded state in a job of {job_world} processes (this is rank {job_rank}) in a manager "
                    "saving alone: make the manager without rank and world_size (it takes the job's ranks), "
                    f"or pass rank={job_rank}, world_size={job_world}"
                )
        return leaves, _metrics(metrics), _metadata(metadata)

    return prepare


def _seconds(interval: float | _dt.timedelta | None) -> float | None:
    if interval is None:
        return None
    if isinstance(interval, _dt.timedelta):
        return interval.total_seconds()
    return float(interval)


@dataclass(frozen=True)
class Cadence:
    """What recent saves cost and the interval `save_interval="auto"` chose from it, in
    seconds: `blocking` is how long a save stalls the loop, `writing` how long it takes
    to commit (running averages); both, and `interval`, are None until a save is
    measured."""

    interval: float | None
    blocking: float | None
    writing: float | None
    mtbf: float


class CheckpointManager:
    """Decides when to save, saves in the background, keeps what retention says, resumes.

    `policies` say when to save (default: every 500 steps until 5,000, then every 1,000;
    `save_interval` adds a temporary checkpoint after that much time without a save);
    `save_interval="auto"` with `mtbf=` (the mean time between failures, seconds or a
    timedelta) chooses that interval from what saves cost: Daly's optimum for the
    measured stall of recent saves, never shorter than a save's write time, re-estimated
    after every save (`cadence()` tells the figures); the first is due at once. `keep` says what to keep (`cairn.KeepLast(3)`, `cairn.KeepEvery(10_000)`,
    `cairn.KeepBest(2, "loss", "min")`; default: everything). The flat `keep_last=`,
    `keep_every=`, `keep_best=`, `metric=`, `mode=` flags are deprecated. `dtype`
    (`"bf16"`, `{"model.": "bf16"}`, ...) casts the floating-point tensors of every save,
    as `cairn.save(dtype=)` does (lossy: a run resumed into its own state needs the
    optimizer state saved as it is).

    Call `on_step(step, state)` every step. It returns once the state is copied; writing
    continues in the background (at most `max_in_flight` saves at once). A background
    failure is raised by the next call and by `wait()` (in a job of several ranks, after
    that call's own save is under way: every rank takes part in every save). Use as a context manager to wait
    on exit. After SIGTERM (`preemption_signal`) the next `on_step` saves and flushes, and
    `preempted` becomes true: stop the loop then.

    With `background_snapshot=True` (and async saving) the copy itself runs in the
    background too, overlapping what the loop does next (the next batch, a GPU step), as
    torch DCP's asynchronous staging: `on_step` returns without waiting for the copy (it
    still waits, as always, for a free save slot and for the last save's copy), and the
    state's buffers must stay unchanged until `wait_snapshot()` returns. Call it before anything changes
    them: in torch, `optimizer.register_step_pre_hook(lambda *_: manager.wait_snapshot())`
    covers the optimizer (a module that updates buffers in its forward pass, such as
    batch norm, needs `module.register_forward_pre_hook` likewise). Changing the state
    earlier saves a mix of old and new values. Every `on_step`, `save`, `wait()` and
    `close()` waits for the copy too; a preemption save copies inside the call, and so does a state with
    CUDA tensors (into pinned memory, as without this option).

    In a multi-process job every process makes a manager and they save each checkpoint
    together (rank 0 applies retention). In a `torch.distributed` job the ranks are the
    job's and they coordinate through a `gloo` group of their own, made here (every rank
    must construct the manager), so that the background saves never share a group with
    the training loop's collectives; `process_group` chooses another gloo group (one the
    loop does not use from another thread), whose ranks are the manager's. Elsewhere (or
    with `rank` and `world_size` given) the ranks coordinate through the store; in a
    multi-process jax job the ranks are jax's. Either way a save waits at most `timeout`
    seconds for the other ranks (a gloo collective that timed out may leave its group
    unusable: restart the job then). Every rank must save the same steps (a time-based
    `save_interval` is refused with several ranks); a rank whose state cannot be read
    for a step still takes part, so that save fails on every rank at once, naming it,
    and the next one works. A process that saves alone in a
    job passes `rank=0, world_size=1`. On opening, rank 0
    removes in the background what unfinished saves left once older than `orphan_grace`
    (seconds; None: never); cleanup problems never fail a save (`cleanup_errors()`).

    Saves are `incremental` by default: a save writes only the tensors whose content
    (XXH3-128 and length) no committed checkpoint of the run holds, and its manifest
    refers to the stored copies, so a frozen backbone, an adapter fine-tune or an EMA
    that has not moved costs almost nothing to save again. A tensor whose sparse sample
    changed is written without being hashed whole, so a save where everything changes
    costs what a full one does; a tensor that stops changing is written once more (with
    its content id), then shared. Deleting a checkpoint keeps the data
    others still refer to; `cairn cp` of one checkpoint copies what it refers to. A job of
    several processes writes everything.

    Two tiers: with `local=` (a fast local folder), saves go there first, by
    `local_policies` / `local_save_interval` and kept by `keep_local` (a count or
    `Keep` rules); the checkpoints that `policies` / `save_interval` select go on to
    `run` (a bucket, say) in the background, copied from the local copy and verified
    there, and `keep` applies to those. A local checkpoint is kept until its upload is
    done; uploads a killed process owed are done by the next manager on the same local
    folder. `restore()` takes the newest readable copy across both tiers (the local one
    of a step first) and passes over a missing or damaged copy with a
    `DamagedCheckpointWarning`. After SIGTERM the preemption save goes to the local tier,
    then uploads go on for `upload_grace` seconds at most. Upload failures are cleanup
    problems (`cleanup_errors()`); `pending_uploads()` tells what is owed. In a job of
    several ranks each rank saves its own part (what it holds) into its own folder
    `rank-<r>` inside `local`, and the ranks upload together into one checkpoint of `run`,
    each box written once; `restore()` agrees over the job's collectives on the newest
    step every rank can load (from its own part, else from `run`), so that all ranks
    resume from the same step (without collectives, `rank=`/`world_size=` given, only
    `run` serves).

    `on_event(event)` is called (on the thread that did the work: a background one for
    background saves and uploads; it must not call the manager) after every save, upload,
    load and deletion with a dict: `operation`, `tier` ("local" or "durable"), `step`,
    `uri`, `unix_ms`, `duration_s`, `phases` (seconds by phase: snapshot, write, commit,
    upload, verify, read, retention), `bytes`, `bytes_per_s`, `error`, `detail`,
    `interval_s` (after a save, with `save_interval="auto"`: the interval chosen);
    `event_log=` appends the same as JSON Lines to a file. An exception in `on_event` is
    reported as unraisable and never fails a save."""

    @_typed
    def __init__(
        self,
        run: str | os.PathLike,
        *,
        policies: Sequence[Every] | None = None,
        save_interval: float | _dt.timedelta | str | None = None,
        mtbf: float | _dt.timedelta | None = None,
        keep: Keep | Sequence[Keep] = (),
        async_save: bool = True,
        max_in_flight: int = 1,
        background_snapshot: bool = False,
        preemption_signal: int | None = _signal.SIGTERM,
        storage_options: dict[str, str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        process_group: Any = None,
        timeout: float = 600.0,
        orphan_grace: float | _dt.timedelta | None = 3600.0,
        dtype: Any = None,
        incremental: bool = True,
        local: str | os.PathLike | None = None,
        local_policies: Sequence[Every] | None = None,
        local_save_interval: float | _dt.timedelta | None = None,
        keep_local: int | Keep | Sequence[Keep] = (),
        upload_grace: float | _dt.timedelta = 30.0,
        on_event: Callable[[dict], Any] | None = None,
        event_log: str | os.PathLike | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: str = "min",
    ) -> None:
        auto = isinstance(save_interval, str)
        if auto and save_interval != "auto":
            raise ValueError(f"save_interval is seconds, a timedelta or 'auto', not {save_interval!r}")
        if auto and mtbf is None:
            raise ValueError("save_interval='auto' needs mtbf=, the mean time between failures")
        if mtbf is not None and not auto:
            raise ValueError("mtbf= is for save_interval='auto'")
        legacy = dict(keep_last=keep_last, keep_every=keep_every, keep_best=keep_best, metric=metric, mode=mode)
        last, every, best = _retention(keep, legacy)
        dtype = _arrays.cast_plan(dtype)
        rank, world_size, all_gather = _manager_job(rank, world_size, process_group, timeout)
        tier = None
        if local is not None:
            keep_local = KeepLast(keep_local) if isinstance(keep_local, int) else keep_local
            tier = (
                _uri(local),
                None if local_policies is None else [(p.interval, p.until) for p in local_policies],
                _seconds(local_save_interval),
                _seconds(mtbf) if auto else None,
                _retention(keep_local, {}),
                _seconds(upload_grace),
            )
        elif local_policies is not None or local_save_interval is not None or keep_local != ():
            raise ValueError("local_policies, local_save_interval and keep_local are for a local tier (local=)")
        self._native = _cairn.Manager(
            _uri(run),
            None if policies is None else [(p.interval, p.until) for p in policies],
            None if auto else _seconds(save_interval),
            last,
            every,
            best,
            async_save,
            max_in_flight,
            None if preemption_signal is None else int(preemption_signal),
            storage_options,
            rank,
            world_size,
            _seconds(orphan_grace),
            all_gather,
            timeout,
            incremental,
            None if tier is not None else _seconds(mtbf),
            tier,
            on_event,
            None if event_log is None else os.fspath(event_log),
            background_snapshot,
        )
        self._world_size = world_size
        self._rank = rank
        self._storage_options = storage_options
        self._dtype = dtype
        # Closes at interpreter exit (or when collected) without keeping `self` alive.
        self._closer = weakref.finalize(self, self._native.close)

    @property
    def run(self) -> str:
        """The run's location."""
        return self._native.uri()

    @property
    def local(self) -> str | None:
        """The local tier's location, if the manager has one."""
        return self._native.local_uri()

    def wait_snapshot(self) -> None:
        """Returns once the state handed to the last save has been copied: its buffers may
        change from then on. At once unless `background_snapshot=True`."""
        self._native.wait_snapshot()

    def pending_uploads(self) -> list[int]:
        """The steps still owed to the durable tier (queued, uploading, or failed and
        kept for the next try), in step order."""
        return self._native.pending_uploads()

    @property
    def preempted(self) -> bool:
        """Whether the preemption signal arrived (the loop should stop)."""
        return self._native.preempted()

    @_typed
    def on_step(
        self,
        step: int,
        state: Any,
        *,
        force: bool = False,
        metrics: dict[str, float] | None = None,
        metadata: Any = None,
    ) -> bool:
        """Saves `state` if the policies say so (or `force`); returns whether it saved.
        A step already committed is never saved again, forced or not: this returns False.
        On a step that saves nothing, `state`, `metrics` and `metadata` are not looked at
        (no device copy; a bad one is reported on the first step that saves); a saved
        state is read once a save slot is free (`max_in_flight` copies at most), and
        reading it must not save through a manager."""
        return self._native.on_step(step, _prepare(state, metrics, metadata, self._world_size, self._dtype), force)

    @_typed
    def save(
        self,
        step: int,
        state: Any,
        *,
        temporary: bool = False,
        metrics: dict[str, float] | None = None,
        metadata: Any = None,
    ) -> None:
        """Saves `state` as `step` now, whatever the policies. Raises `AlreadyExistsError`
        if the step is already saved."""
        self._native.save(step, _prepare(state, metrics, metadata, self._world_size, self._dtype), temporary)

    def cadence(self) -> Cadence | None:
        """What recent saves cost and the interval chosen from it, with
        `save_interval="auto"`; else None."""
        got = self._native.cadence()
        return None if got is None else Cadence(*got)

    def wait(self) -> None:
        """Blocks until every save, deletion and upload is done (after a preemption
        save, uploads only for `upload_grace`); raises a background error of a save."""
        self._native.wait()

    @_typed
    def restore(
        self,
        step: int | None = None,
        *,
        prefix: str | Sequence[str] | None = None,
        keys: Iterable[str] | None = None,
        rename: Any = None,
        dtype: Any = None,
        framework: str = "numpy",
        target: Any = None,
        boxes: dict[str, tuple[Sequence[int], Sequence[int]]] | None = None,
        device: Any = None,
        map_location: Any = None,
    ) -> tuple[Any, CheckpointInfo]:
        """Loads the latest committed checkpoint (or `step`): `(state, info)`.
        Raises `CheckpointNotFoundError` when there is none. `target` fills the job's own
        state in place, `boxes` reads boxes of tensors and `dtype`, `device` (or
        `map_location`) cast and place them, as `cairn.load` does (every
        process of a job reads the same step: the latest once this manager's saves in
        flight are over). Plain values, structure and whole tensors that ranks held with
        contents of their own (an RNG state) are this manager's `rank`'s own; a rank that
        saved none of its own (or a rank beyond those that saved) gets the shared ones:
        rank 0's values and structure, the lowest-ranked holder's tensors."""
        if target is not None or boxes is not None:
            def load_copy(uri: str) -> Any:
                return load(
                    uri, prefix=prefix, keys=keys, rename=rename, dtype=dtype, framework=framework,
                    storage_options=self._storage_options, boxes=boxes, target=target, rank=self._rank,
                    device=device, map_location=map_location,
                )

            state, info, passed_over = self._native.restore_into(step, load_copy)
            _warn_passed_over(passed_over)
            return state, CheckpointInfo._from_native(info)
        device = _device(device, map_location, framework)
        dtype = None if dtype is None else _arrays.resolve_dtype(dtype)
        with _tree.gc_paused():
            native, passed_over = self._native.restore(
                step, _prefixes(prefix), None if keys is None else list(keys), _rename(rename),
                _arrays_wanted(framework, dtype),
            )
            _warn_passed_over(passed_over)
            state = _build(native, dtype=dtype, framework=framework, renamed=rename is not None, device=device)
        return state, CheckpointInfo._from_native(native[2])

    def cleanup_errors(self) -> list[_cairn.CheckpointError]:
        """The problems of the cleanup after committed saves (retention's deletions, the
        `LATEST` hint) since the last call. They never fail a save: those checkpoints are
        committed; each step was retried with backoff and retention tries again after the
        next save."""
        return self._native.take_cleanup_errors()

    @_typed
    def latest_step(self) -> int | None:
        """The highest committed step, or None."""
        return self._native.latest_step()

    @_typed
    def list(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, in step order."""
        return [CheckpointInfo._from_native(d) for d in self._native.list()]

    @_typed
    def reset(self) -> None:
        """Deletes every checkpoint of the run."""
        self._native.reset()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Waits for every save and deletion (raising a background error) and stops
        handling the preemption signal: SIGTERM then does what it did before the manager
        opened. Called by the `with` block's end, and at interpreter exit."""
        if self._closer.alive:
            self._closer()
        else:
            self._native.wait()
