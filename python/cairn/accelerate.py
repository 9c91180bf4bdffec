"""Cairn as Accelerate's `save_state` / `load_state`, for loops written with a plain
`accelerate.Accelerator`:

    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, data, scheduler)
    step = cairn.accelerate.load_state(accelerator, "runs/job") or 0    # newest committed; None if none
    ...
    cairn.accelerate.save_state(accelerator, "runs/job", step=step, keep=cairn.KeepLast(3))  # every process

What `accelerator.save_state(dir)` writes, as one Cairn checkpoint of the run `path` at
`step`: every prepared model's weights (unwrapped: no DDP `module.` prefix), optimizer,
scheduler, the gradient scaler, the objects given to `register_for_checkpointing`, the
position of stateful dataloaders (`DataLoaderConfiguration(use_stateful_dataloader=True)`),
Accelerate's step counter, and each process's RNG states. Nothing is pickled: a value that
would need pickle is refused, naming its key. The checkpoint is committed once all of it
is durable on every process, so a save killed halfway leaves the previous one to resume
from. DeepSpeed, FSDP and Megatron-LM runs keep their own engines' formats and are refused.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import accelerate
from accelerate.utils import DistributedType

from . import _api, _torch_rng
from ._cairn import InvalidArgumentError
from ._policy import Keep

__all__ = ["save_state", "load_state"]

# The distributed types whose engines save the model and optimizer themselves.
_OWN_ENGINES = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM)


def save_state(
    accelerator: accelerate.Accelerator,
    path: str | os.PathLike,
    *,
    step: int,
    keep: Keep | Sequence[Keep] = (),
    metrics: dict[str, float] | None = None,
    storage_options: dict[str, str] | None = None,
) -> None:
    """Commits the accelerator's state as the checkpoint of `step` in the run `path`
    (every process calls it, as `accelerator.save_state`), then, on the main process,
    prunes the run with `keep` (nothing when empty). `metrics` are recorded with the
    checkpoint (for `cairn.KeepBest`); `storage_options` are the store's settings, as for
    `cairn.save`."""
    _refuse_own_engines(accelerator)
    state: dict[str, Any] = {
        "models": [accelerator.unwrap_model(model).state_dict() for model in accelerator._models],
        "optimizers": [optimizer.state_dict() for optimizer in accelerator._optimizers],
        "schedulers": [scheduler.state_dict() for scheduler in accelerator._schedulers],
        "dataloaders": [loader.state_dict() for loader in _stateful(accelerator)],
        "custom": [obj.state_dict() for obj in accelerator._custom_objects],
        "step": accelerator.step,
        "rng": _torch_rng.get(),
    }
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    job: dict[str, Any] = {}
    if accelerator.num_processes > 1:
        job = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "all_gather": _api.torch_all_gather()}
    _api.save(path, state, step=step, metrics=metrics, storage_options=storage_options, metadata={"saved_by": "accelerate"}, **job)
    if keep and accelerator.is_main_process:
        _api.prune(path, keep=keep, storage_options=storage_options)


def load_state(
    accelerator: accelerate.Accelerator,
    path: str | os.PathLike,
    *,
    step: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> int | None:
    """Restores what `save_state` committed in the run `path` (the checkpoint of `step`,
    by default the newest) into the accelerator's prepared objects, in place, with this
    process's own RNG states; returns the step restored, or None when the run holds no
    committed checkpoint (a fresh start). The prepared objects must be those that were
    saved, in the same order: another count is refused."""
    _refuse_own_engines(accelerator)
    if step is None:
        step = _api._newest_step(path, storage_options)
        if step is None:
            return None
    models = [accelerator.unwrap_model(model) for model in accelerator._models]
    where = {"path": path, "step": step, "storage_options": storage_options}
    # Weights straight into the live parameters (checked shapes and dtypes), the rest as
    # torch values for each object's own load_state_dict.
    _api.load(**where, target={"models": [model.state_dict() for model in models]})
    rank = accelerator.process_index if accelerator.num_processes > 1 else 0
    loaded = _api.load(**where, framework="torch", rank=rank, prefix=["optimizers", "schedulers", "dataloaders", "custom", "step", "rng", "scaler"])
    targets = {
        "optimizers": accelerator._optimizers,
        "schedulers": accelerator._schedulers,
        "dataloaders": _stateful(accelerator),
        "custom": accelerator._custom_objects,
    }
    for name, objects in targets.items():
        saved = loaded.get(name, [])
        if len(saved) != len(objects):
            raise InvalidArgumentError(
                f"the checkpoint holds {len(saved)} {name}, this accelerator has {len(objects)} key=`{name}` step={step}"
            )
        for obj, obj_state in zip(objects, saved):
            obj.load_state_dict(obj_state)
    if "scaler" in loaded and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(loaded["scaler"])
    accelerator.step = int(loaded["step"])
    _torch_rng.set(loaded["rng"])
    return step


def _stateful(accelerator: accelerate.Accelerator) -> list[Any]:
    """The prepared dataloaders that can tell their position (stateful ones)."""
    return [loader for loader in accelerator._dataloaders if getattr(loader, "use_stateful_dataloader", False)]


def _refuse_own_engines(accelerator: accelerate.Accelerator) -> None:
    if accelerator.distributed_type in _OWN_ENGINES:
        raise InvalidArgumentError(
            f"cairn.accelerate checkpoints plain and DDP runs; this one uses {accelerator.distributed_type.value} "
            "(use cairn.dcp for FSDP state, or accelerator.save_state)"
        )
