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
from. DeepSpeed, FSDP, Megatron-LM and XLA runs keep their own engines' formats and are
refused, as are accelerators with state hooks (`register_save_state_pre_hook`), which
would not run. RNG states: Python's, numpy's, torch's CPU and CUDA generators.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import accelerate
import accelerate.utils
import torch
from accelerate.utils import DistributedType

from . import _api, _torch_rng
from ._cairn import CheckpointError, InvalidArgumentError
from ._policy import Keep, retention as _retention

__all__ = ["save_state", "load_state"]

# The distributed types whose engines save the model and optimizer themselves.
_OWN_ENGINES = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM, DistributedType.XLA)


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
    prunes the run with `keep` (nothing when empty; a failed prune is a warning: the
    checkpoint is committed). `metrics` are recorded with the checkpoint (for
    `cairn.KeepBest`); `storage_options` are the store's settings, as for `cairn.save`.
    A step at or below the newest committed one is refused: the newer checkpoint would
    shadow it on resume (and retention would drop it); delete the newer ones first to go
    back."""
    _refuse_unsupported(accelerator)
    _retention(keep, {})  # refused on every process alike, before anything is written
    newest = _agreed(accelerator, _api._newest_step(path, storage_options))
    if newest is not None and step <= newest:
        raise InvalidArgumentError(
            f"the run already holds a checkpoint at step {newest}, at or after step={step}: "
            f"delete the newer checkpoints to go back run=`{os.fspath(path)}`"
        )
    state: dict[str, Any] = {
        "models": [accelerator.unwrap_model(model).state_dict() for model in accelerator._models],
        "optimizers": [optimizer.state_dict() for optimizer in accelerator._optimizers],
        "schedulers": [scheduler.state_dict() for scheduler in accelerator._schedulers],
        "dataloaders": [loader.state_dict() for loader in _stateful(accelerator)],
        "custom": [obj.state_dict() for obj in accelerator._custom_objects],
        "num_models": len(accelerator._models),
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
        try:
            _api.prune(path, keep=keep, storage_options=storage_options)
        except CheckpointError as e:
            warnings.warn(f"the checkpoint of step {step} is committed; pruning the run failed: {e}")


def load_state(
    accelerator: accelerate.Accelerator,
    path: str | os.PathLike,
    *,
    step: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> int | None:
    """Restores what `save_state` committed in the run `path` (the checkpoint of `step`,
    by default the newest, as the main process sees it) into the accelerator's prepared
    objects, in place, with this process's own RNG states; returns the step restored, or
    None when the run holds no committed checkpoint (a fresh start). The prepared objects
    must be those that were saved, in the same order (a gradient scaler too): anything
    else is refused, naming it, before any of them is changed."""
    _refuse_unsupported(accelerator)
    if step is None:
        step = _agreed(accelerator, _api._newest_step(path, storage_options))
        if step is None:
            return None
    where = {"path": path, "step": step, "storage_options": storage_options}
    rank = accelerator.process_index if accelerator.num_processes > 1 else 0
    loaded = _api.load(
        **where, framework="torch", rank=rank,
        prefix=["optimizers", "schedulers", "dataloaders", "custom", "num_models", "step", "rng", "scaler"],
    )
    targets = {
        "models": accelerator._models,
        "optimizers": accelerator._optimizers,
        "schedulers": accelerator._schedulers,
        "dataloaders": _stateful(accelerator),
        "custom": accelerator._custom_objects,
    }
    for key in ("num_models", "step", "rng"):
        if key not in loaded:
            raise InvalidArgumentError(f"not a checkpoint cairn.accelerate.save_state wrote: no `{key}` key=`{key}` step={step}")
    counts = {name: len(loaded.get(name, [])) for name in targets} | {"models": loaded["num_models"]}
    for name, objects in targets.items():
        if counts[name] != len(objects):
            raise InvalidArgumentError(
                f"the checkpoint holds {counts[name]} {name}, this accelerator has {len(objects)} key=`{name}` step={step}"
            )
    if ("scaler" in loaded) != (accelerator.scaler is not None):
        held = "holds" if "scaler" in loaded else "holds no"
        raise InvalidArgumentError(
            f"the checkpoint {held} gradient scaler state, this accelerator {'has no' if accelerator.scaler is None else 'has a'} scaler key=`scaler` step={step}"
        )
    # Weights straight into the live parameters (shapes and dtypes checked), the rest
    # through each object's own load_state_dict.
    models = [accelerator.unwrap_model(model) for model in accelerator._models]
    _api.load(**where, target={"models": [model.state_dict() for model in models]})
    for name in ("optimizers", "schedulers", "dataloaders", "custom"):
        for obj, obj_state in zip(targets[name], loaded.get(name, [])):
            obj.load_state_dict(obj_state)
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(loaded["scaler"])
    accelerator.step = int(loaded["step"])
    _torch_rng.set(loaded["rng"])
    return step


def _agreed(accelerator: accelerate.Accelerator, step: int | None) -> int | None:
    """`step` as the main process found it, on every process (listings of a shared store
    may differ for a moment; every process must use the same checkpoint)."""
    if accelerator.num_processes == 1:
        return step
    agreed = accelerate.utils.broadcast(torch.tensor([-1 if step is None else step], device=accelerator.device))
    return None if int(agreed.item()) < 0 else int(agreed.item())


def _stateful(accelerator: accelerate.Accelerator) -> list[Any]:
    """The prepared dataloaders that can tell their position (stateful ones)."""
    return [loader for loader in accelerator._dataloaders if getattr(loader, "use_stateful_dataloader", False)]


def _refuse_unsupported(accelerator: accelerate.Accelerator) -> None:
    """DeepSpeed, FSDP, Megatron-LM and XLA runs save through their own engines; state
    hooks registered for `accelerator.save_state` / `load_state` would not be run."""
    if accelerator.distributed_type in _OWN_ENGINES:
        raise InvalidArgumentError(
            f"cairn.accelerate checkpoints plain and DDP runs; this one uses {accelerator.distributed_type.value} "
            "(use cairn.dcp for FSDP state, or accelerator.save_state)"
        )
    if accelerator._save_model_state_pre_hook or accelerator._load_model_state_pre_hook:
        raise InvalidArgumentError(
            "this accelerator has save/load state hooks (register_save_state_pre_hook), which cairn.accelerate "
            "would not run: save what they handle in an object given to register_for_checkpointing"
        )
