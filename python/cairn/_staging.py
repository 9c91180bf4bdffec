"""Bringing a state's tensors to host memory in one batch when some live on an accelerator.

`tensor.cpu()` tensor by tensor waits for each transfer in turn and lands in fresh
pageable memory, which an async save then copies once more into its snapshot. Instead,
when any tensor of the state is on a device, every tensor is copied into one host buffer,
pinned where CUDA is available: device tensors asynchronously on their current streams,
then one synchronize per device. The buffer belongs to this save alone, so the manager
keeps it as the snapshot and writes from it without a second copy; it is released (to
torch's pinned-memory cache, ready for the next save) once the save is durable.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

import numpy as np

from . import _arrays
from ._cairn import InvalidArgumentError

# Every tensor starts at a multiple of this many bytes in the buffer (any dtype's alignment).
_ALIGN = 64


def needed(objs: Iterable[Any]) -> bool:
    """Whether any of `objs` is a torch tensor outside CPU memory."""
    torch = sys.modules.get("torch")
    return torch is not None and any(isinstance(o, torch.Tensor) and o.device.type != "cpu" for o in objs)


def stage(items: list[tuple[str, Any]]) -> tuple[np.ndarray, list[tuple[str, list[int], np.ndarray]]]:
    """Copies every `(key, array)` into one new host buffer. Returns the buffer (a uint8
    numpy array) and, per item, `(dtype name, shape, uint8 view of its bytes in the buffer)`."""
    import torch

    sources = [_source(torch, key, obj) for key, obj in items]
    offsets, total = [], 0
    for _, _, _, nbytes, _ in sources:
        offsets.append(total)
        total += -(-nbytes // _ALIGN) * _ALIGN
    devices = {src.device for *_, src in sources if isinstance(src, torch.Tensor) and src.device.type != "cpu"}
    buffer = _allocate(torch, total, pinned=any(d.type == "cuda" for d in devices))
    host = buffer.numpy()
    staged = []
    for (key, name, shape, nbytes, src), offset in zip(sources, offsets):
        if isinstance(src, torch.Tensor):
            target = buffer[offset : offset + nbytes].view(src.dtype).view(src.shape)
            try:
                target.copy_(src, non_blocking=True)
            except (RuntimeError, NotImplementedError) as e:
                raise InvalidArgumentError(f"cannot copy the tensor to host memory key=`{key}`: {e}") from None
        else:
            host[offset : offset + nbytes] = src
        staged.append((name, shape, host[offset : offset + nbytes]))
    for device in devices:
        _synchronize(torch, device)
    return host, staged


def _source(torch: Any, key: str, obj: Any) -> tuple[str, str, list[int], int, Any]:
    """`(key, dtype name, shape, byte size, source)`: a torch tensor, or the raw bytes of
    any other array."""
    try:
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach()
            name = _arrays.torch_dtype_name(key, tensor.dtype)
            return key, name, list(tensor.shape), tensor.numel() * tensor.element_size(), tensor
        name, shape, raw = _arrays.to_raw(key, obj)
        return key, name, shape, raw.nbytes, raw
    except TypeError as e:
        raise InvalidArgumentError(str(e)) from None


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
