"""Bringing a state's tensors to host memory in one batch when some live on an accelerator.

`tensor.cpu()` tensor by tensor waits for each transfer in turn and lands in fresh
pageable memory, which an async save then copies once more into its snapshot. Instead,
when any tensor of the state is on a device, every tensor is copied into a few host
buffers, pinned where CUDA is available: device tensors asynchronously on their current
streams, then one synchronize per device. The buffers belong to this save alone, so the
manager keeps them as the snapshot and writes from them without a second copy; they are
released (to torch's pinned-memory cache, ready for the next save) once the save is
durable.

Torch's pinned-memory cache rounds every block up to a power of two, so one buffer for the
whole state could take twice its size. The tensors are packed instead (first fit, largest
first) into bins of one power-of-two size, at least `_MIN_BIN` and at least four times the
largest tensor: every bin but the last is then more than three quarters full, and each bin
is allocated at the power of two its contents need, so the buffers take at most 4/3 of the
state plus one bin.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

import numpy as np

from . import _arrays
from ._cairn import InvalidArgumentError

# Every tensor starts at a multiple of this many bytes in its buffer (any dtype's alignment).
_ALIGN = 64
# The smallest bin tensors are packed into.
_MIN_BIN = 64 << 20


def needed(objs: Iterable[Any]) -> bool:
    """Whether any of `objs` is a torch tensor outside CPU memory."""
    torch = sys.modules.get("torch")
    return torch is not None and any(isinstance(o, torch.Tensor) and o.device.type != "cpu" for o in objs)


def stage(items: list[tuple[str, Any]]) -> tuple[list[np.ndarray], list[tuple[str, list[int], np.ndarray]]]:
    """Copies every `(key, array)` into new host buffers. Returns the buffers (uint8 numpy
    arrays) and, per item, `(dtype name, shape, uint8 view of its bytes in a buffer)`."""
    import torch

    sources = [_source(torch, key, obj) for key, obj in items]
    places, sizes = pack([nbytes for _, _, _, nbytes, _ in sources])
    devices = {src.device for *_, src in sources if isinstance(src, torch.Tensor) and src.device.type != "cpu"}
    pinned = any(d.type == "cuda" for d in devices)
    buffers = [_allocate(torch, size, pinned=pinned) for size in sizes]
    hosts = [b.numpy() for b in buffers]
    staged = []
    for (key, name, shape, nbytes, src), (bin_index, offset) in zip(sources, places):
        host = hosts[bin_index][offset : offset + nbytes]
        if isinstance(src, torch.Tensor):
            target = buffers[bin_index][offset : offset + nbytes].view(src.dtype).view(src.shape)
            try:
                target.copy_(src, non_blocking=True)
            except (RuntimeError, NotImplementedError) as e:
                raise InvalidArgumentError(f"cannot copy the tensor to host memory key=`{key}`: {e}") from None
        else:
            host[...] = src
        staged.append((name, shape, host))
    for device in devices:
        _synchronize(torch, device)
    return hosts, staged


def pack(sizes: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Places byte sizes in bins, first fit, largest first: returns each size's `(bin,
    offset)` (offsets aligned to `_ALIGN`) and each bin's size in bytes, a power of two."""
    aligned = [-(-n // _ALIGN) * _ALIGN for n in sizes]
    capacity = _power_of_two(max([_MIN_BIN, *(4 * n for n in aligned)]))
    order = sorted(range(len(sizes)), key=lambda i: -aligned[i])
    smallest = aligned[order[-1]] if order else 0
    places: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    used: list[int] = []
    open_bins: list[int] = []  # bins with room for at least the smallest size, in order
    for i in order:
        bin_index = next((b for b in open_bins if used[b] + aligned[i] <= capacity), None)
        if bin_index is None:
            bin_index = len(used)
            used.append(0)
            open_bins.append(bin_index)
        places[i] = (bin_index, used[bin_index])
        used[bin_index] += aligned[i]
        if capacity - used[bin_index] < max(smallest, 1):
            open_bins.remove(bin_index)
    return places, [_power_of_two(u) for u in used]


def _power_of_two(n: int) -> int:
    """The smallest power of two at least `n` (and at least 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _source(torch: Any, key: str, obj: Any) -> tuple[str, str, list[int], int, Any]:
    """`(key, dtype name, shape, byte size, source)`: a torch tensor, or the raw bytes of
    any other array."""
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        name = _arrays.torch_dtype_name(key, tensor.dtype)
        return key, name, list(tensor.shape), tensor.numel() * tensor.element_size(), tensor
    name, shape, raw = _arrays.to_raw(key, obj)
    return key, name, shape, raw.nbytes, raw


def _allocate(torch: Any, nbytes: int, *, pinned: bool) -> Any:
    """A uint8 host tensor of `nbytes`: page-locked when asked and possible (device copies
    into it run at full speed and asynchronously), else ordinary memory."""
    if pinned:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


def _synchronize(torch: Any, device: Any) -> None:
    """Waits for the copies queued on `device`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    module = getattr(torch, device.type, None)
    if hasattr(module, "synchronize"):
        module.synchronize()
