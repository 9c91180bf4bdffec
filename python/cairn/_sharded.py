"""The sharded arrays frameworks hold, as pieces: torch `DTensor` (FSDP2, tensor
parallelism, any mesh), torch `ShardedTensor` (FSDP1's sharded state dict) and `jax.Array`
sharded over devices or processes.

Saving: each process declares the pieces it holds (`(local data, offsets, global shape)`),
found with the frameworks' own public descriptions of a shard; a replicated piece is
declared by every holder and written once (the planner keeps one writer per distinct box),
a jax replica only by its `replica_id == 0` holder. Nothing is gathered.

Loading into a target: the same descriptions give the boxes a process needs, and the
tensors to fill in place.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._cairn import InvalidArgumentError


def _torch():
    return sys.modules.get("torch")


def _dtensor_type(torch: Any) -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def _sharded_tensor_type(torch: Any) -> Any:
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor
    except ImportError:
        return None
    return ShardedTensor


def is_sharded(obj: Any) -> bool:
    """Whether `obj` is an array whose pieces Cairn saves separately."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        dtensor, sharded = _dtensor_type(torch), _sharded_tensor_type(torch)
        return (dtensor is not None and isinstance(obj, dtensor)) or (sharded is not None and isinstance(obj, sharded))
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(obj, jax.Array):
        return not (obj.is_fully_addressable and (obj.is_fully_replicated or len(obj.sharding.device_set) == 1))
    return False


def pieces(key: str, obj: Any) -> list[tuple[Any, list[int], list[int]]]:
    """The pieces of the sharded array `obj` (see `is_sharded`) this process writes:
    `(local data, offsets, global shape)` each."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        global_shape = [int(d) for d in obj.shape]
        return [(local, offsets, global_shape) for local, offsets in _torch_boxes(key, obj)]
    global_shape = [int(d) for d in obj.shape]
    out = []
    for shard in obj.addressable_shards:
        if shard.replica_id != 0:
            continue
        offsets = []
        for dim, (index, size) in enumerate(zip(shard.index, shard.data.shape)):
            start, stop, step = index.indices(global_shape[dim])
            if step != 1 or stop - start != size:
                raise InvalidArgumentError(f"a jax shard that is not a box ({shard.index}) key=`{key}`")
            offsets.append(start)
        offsets += [0] * (len(global_shape) - len(offsets))
        out.append((shard.data, offsets, global_shape))
    return out


def _torch_boxes(key: str, obj: Any) -> list[tuple[Any, list[int]]]:
    """`(local tensor, offsets)` of each box of a DTensor or ShardedTensor this process
    holds (the local tensors are the live ones: filling them fills `obj`)."""
    torch = _torch()
    dtensor = _dtensor_type(torch)
    if dtensor is not None and isinstance(obj, dtensor):
        try:
            chunks = obj.__create_chunk_list__()
        except ValueError as e:  # e.g. a Partial placement: the local data is not the value
            raise InvalidArgumentError(f"cannot save this DTensor ({e}) key=`{key}`") from None
        local = obj.to_local()
        if len(chunks) != 1 or list(chunks[0].sizes) != list(local.shape) or not _strided_is_box(obj):
            raise InvalidArgumentError(
                f"a DTensor whose local data is {len(chunks)} boxes (placements {obj.placements}) "
                f"is not supported yet key=`{key}`"
            )
        return [(local, [int(o) for o in chunks[0].offsets])]
    return [
        (shard.tensor, [int(o) for o in shard.metadata.shard_offsets])
        for shard in obj.local_shards()
    ]


def _strided_is_box(obj: Any) -> bool:
    """Whether a DTensor's strided placements (`_StridedShard`, as FSDP2 over tensor
    parallelism makes) leave its local data one box: each strided split must undo the
    splits of the same tensor dimension on later mesh dimensions (its split factor their
    product), so that the dimension is in effect split right to left, into contiguous
    runs. Other strided layouts interleave rows from several places."""
    placements = obj.placements
    for i, placement in enumerate(placements):
        factor = getattr(placement, "split_factor", None)
        if factor is None:
            continue
        later = 1
        for j in range(i + 1, len(placements)):
            if placements[j].is_shard(placement.dim):
                later *= obj.device_mesh.size(j)
        if factor != later:
            return False
    return True


class Devices:
    """Where a box of a jax target goes: the devices of this process that hold it (a
    replicated box is read once and put on each)."""

    def __init__(self, devices: list[Any]) -> None:
        self.devices = devices


def jax_sharding(obj: Any) -> Any:
    """The sharding of a jax target (`jax.Array` or `jax.ShapeDtypeStruct`): its own, or
    the first device alone when it has none."""
    jax = sys.modules["jax"]
    sharding = getattr(obj, "sharding", None)
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _jax_boxes(key: str, obj: Any) -> list[tuple[Any, list[int], list[int]]]:
    """The distinct boxes of a jax target this process's devices hold, each with its
    devices."""
    shape = [int(d) for d in obj.shape]
    by_box: dict[tuple[tuple[int, ...], tuple[int, ...]], list[Any]] = {}
    try:
        placed = jax_sharding(obj).addressable_devices_indices_map(tuple(shape))
    except ValueError as e:  # a sharding that does not fit the shape
        raise InvalidArgumentError(f"the target's sharding does not fit its shape {shape} ({e}) key=`{key}`") from None
    for device, index in placed.items():
        offsets, sizes = [], []
        for dim, part in enumerate(tuple(index) + (slice(None),) * (len(shape) - len(index))):
            start, stop, step = part.indices(shape[dim])
            if step != 1:
                raise InvalidArgumentError(f"a jax sharding whose shards are not boxes key=`{key}`")
            offsets.append(start)
            sizes.append(stop - start)
        by_box.setdefault((tuple(offsets), tuple(sizes)), []).append(device)
    return [(Devices(devices), list(offsets), list(sizes)) for (offsets, sizes), devices in by_box.items()]


def targets(key: str, obj: Any) -> list[tuple[Any, list[int], list[int]]] | None:
    """Where a load into `obj` puts its data: `(destination, offsets, shape)` for each box
    this process holds: a DTensor's, ShardedTensor's, plain torch tensor's or writable
    numpy array's memory (filled in place), or the devices of a `jax.Array` or
    `jax.ShapeDtypeStruct` (a new array is made on them); None for a plain value (the
    loaded value replaces it). A tensor without storage (`meta`) is refused, naming the
    key."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            raise InvalidArgumentError(f"cannot load into a tensor on the meta device key=`{key}`")
        if is_sharded(obj):
            return [(local, offsets, [int(d) for d in local.shape]) for local, offsets in _torch_boxes(key, obj)]
        return [(obj, [0] * obj.dim(), [int(d) for d in obj.shape])]
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(obj, (jax.Array, jax.ShapeDtypeStruct)):
        return _jax_boxes(key, obj)
    if isinstance(obj, np.ndarray):
        if not obj.flags.writeable:
            raise InvalidArgumentError(f"cannot load into a read-only numpy array key=`{key}`")
        return [(obj, [0] * obj.ndim, [int(d) for d in obj.shape])]
    return None
