"""Cairn as the Hugging Face Trainer's checkpointing: `cairn.huggingface.Trainer` in place
of `transformers.Trainer`, or `CheckpointMixin` placed before any Trainer subclass
(`class SFT(cairn.huggingface.CheckpointMixin, trl.SFTTrainer)`).

The Trainer keeps deciding when to save, where (`output_dir/checkpoint-<step>`), how many
to keep (`save_total_limit`) and which is best; what it saves there changes. The model
weights, optimizer, scheduler, gradient scaler and every process's RNG states become one
Cairn checkpoint, committed in that folder (a Cairn run) once all of it is durable, beside
the Trainer's own `trainer_state.json` and the model's config. Nothing is pickled, and
nothing is unpickled on resume: every checksum is verified.

`train(resume_from_checkpoint=True)` resumes from the newest folder whose checkpoint was
committed (a folder a killed save left half-written is passed over, where the Trainer's
own choice would fail on it); a folder written by the plain Trainer still resumes.
`load_best_model_at_end` reads the best folder's weights through Cairn. With several
processes (DDP) each rank takes part in the save: the replicated weights and optimizer are
written once, and each rank's RNG state is its own. DeepSpeed, FSDP and XLA runs keep
their own checkpoint formats: they are refused when training starts.

`cairn export output_dir/checkpoint-500 hf --prefix model. --strip-prefix` then makes a
folder `from_pretrained` loads (with the config copied beside it).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import transformers

from . import _api, _torch_rng
from ._cairn import CheckpointNotFoundError, InvalidArgumentError

__all__ = ["CheckpointMixin", "Trainer", "last_checkpoint"]

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"cairn.huggingface needs transformers 5 or newer, found {transformers.__version__}")

_FOLDER = re.compile(rf"^{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-(\d+)$")
_TRAINER_STATE = transformers.trainer.TRAINER_STATE_NAME
# The weight files the plain Trainer writes into a checkpoint folder.
_TRAINER_WEIGHTS = {
    transformers.utils.SAFE_WEIGHTS_NAME,
    transformers.utils.SAFE_WEIGHTS_INDEX_NAME,
    transformers.utils.WEIGHTS_NAME,
    transformers.utils.WEIGHTS_INDEX_NAME,
    transformers.utils.ADAPTER_SAFE_WEIGHTS_NAME,
    transformers.utils.ADAPTER_WEIGHTS_NAME,
}


class CheckpointMixin:
    """Routes a `transformers.Trainer`'s checkpoints through Cairn (see the module)."""

    _cairn_state: dict[str, Any] | None = None
    _cairn_folder: str | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        self._cairn_refuse_unsupported()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint in output directory `{self.args.output_dir}` to resume from"
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- saving: the Trainer's steps fill one state, committed at the end ----

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._cairn_refuse_unsupported()
        # The Trainer's own steps fill the state; its rotation waits until the new
        # checkpoint is committed (an older one must not go before).
        limit = self.args.save_total_limit
        self._cairn_state, self._cairn_folder = {}, None
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
            state, folder = self._cairn_state, self._cairn_folder
        finally:
            self._cairn_state, self._cairn_folder = None, None
            self.args.save_total_limit = limit
        if folder is None:
            raise InvalidArgumentError("the Trainer saved a checkpoint without saving its model; Cairn has nothing to commit")
        self._cairn_commit(folder, state)
        if self.args.should_save:
            transformers.trainer_utils.rotate_checkpoints(
                output_dir=os.path.dirname(folder),
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self._cairn_state is None:  # `save_model` outside a checkpoint: the Trainer's own files
            return super()._save(output_dir, state_dict)
        self._cairn_folder = output_dir
        self._cairn_state["model"] = self.model.state_dict() if state_dict is None else state_dict
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._cairn_state is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        self._cairn_state["optimizer"] = self.optimizer.state_dict()
        if self.lr_scheduler is not None:
            self._cairn_state["scheduler"] = self.lr_scheduler.state_dict()

    def _save_scaler(self, output_dir: str) -> None:
        if self._cairn_state is None:
            return super()._save_scaler(output_dir)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            self._cairn_state["scaler"] = scaler.state_dict()

    def _save_rng_state(self, output_dir: str) -> None:
        if self._cairn_state is None:
            return super()._save_rng_state(output_dir)
        self._cairn_state["rng"] = _torch_rng.get()

    def _cairn_commit(self, folder: str, state: dict[str, Any]) -> None:
        """Commits `state` as the checkpoint of `folder` at the Trainer's global step,
        every process taking part. A checkpoint already committed there (a run this one
        resumed from before it got this far) is replaced once the new one is."""
        job: dict[str, Any] = {}
        if self.args.world_size > 1:
            job = {"rank": self.args.process_index, "world_size": self.args.world_size, "all_gather": _api.torch_all_gather()}
        _api._replace_newest(folder, state, self.state.global_step, **job)

    # ---- resuming: Cairn folders through Cairn, any other through the Trainer ----

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        step = _committed_step(resume_from_checkpoint)
        if step is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_weights(resume_from_checkpoint, step, self.model if model is None else model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        step = _committed_step(best)
        if step is None:
            return super()._load_best_model()
        _load_weights(best, step, self.model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        step = None if checkpoint is None else _committed_step(checkpoint)
        if step is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        loaded = _api.load(checkpoint, step=step, prefix=["optimizer.", "scheduler."], framework="torch")
        if "optimizer" in loaded:
            self.optimizer.load_state_dict(loaded["optimizer"])
        if "scheduler" in loaded and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(loaded["scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        step = None if checkpoint is None else _committed_step(checkpoint)
        if step is None:
            return super()._load_scaler(checkpoint)
        scaler = getattr(self.accelerator, "scaler", None)
        loaded = _api.load(checkpoint, step=step, prefix="scaler.", framework="torch")
        if scaler is not None and "scaler" in loaded:
            scaler.load_state_dict(loaded["scaler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        step = None if checkpoint is None else _committed_step(checkpoint)
        if step is None:
            return super()._load_rng_state(checkpoint)
        rank = self.args.process_index if self.args.world_size > 1 else 0
        loaded = _api.load(checkpoint, step=step, prefix="rng.", framework="torch", rank=rank)
        if "rng" in loaded:
            _torch_rng.set(loaded["rng"])

    def _cairn_refuse_unsupported(self) -> None:
        """DeepSpeed, FSDP, XLA and SageMaker runs save through their own engines, not
        the steps this mixin takes over; pushing checkpoints to the Hub would push no
        weights."""
        engines = {
            "DeepSpeed": getattr(self, "is_deepspeed_enabled", False),
            "FSDP": getattr(self, "is_fsdp_enabled", False),
            "XLA": transformers.utils.is_torch_xla_available(),
            "SageMaker model parallel": transformers.utils.is_sagemaker_mp_enabled(),
        }
        for name, used in engines.items():
            if used:
                raise InvalidArgumentError(
                    f"cairn.huggingface checkpoints plain and DDP runs; this one uses {name} "
                    "(use cairn.dcp for FSDP state, or the Trainer's own checkpoints)"
                )
        if self.args.push_to_hub:
            raise InvalidArgumentError(
                "cairn.huggingface does not push checkpoints to the Hub (push_to_hub=True): "
                "export one with `cairn export` and push that folder"
            )


class Trainer(CheckpointMixin, transformers.Trainer):
    """`transformers.Trainer` whose checkpoints are Cairn checkpoints (see the module)."""


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-<step>` folder in `output_dir` that can be resumed from: its
    Cairn checkpoint committed (or, a folder of the plain Trainer, its weights there) and
    its `trainer_state.json` whole. None if there is none."""
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return None
    folders = sorted(
        ((int(m.group(1)), name) for name in names if (m := _FOLDER.match(name))),
        reverse=True,
    )
    for _, name in folders:
        folder = os.path.join(output_dir, name)
        if not os.path.isdir(folder) or not _whole_json(os.path.join(folder, _TRAINER_STATE)):
            continue
        if _committed_step(folder) is not None or _holds_trainer_weights(folder):
            return folder
    return None


def _committed_step(folder: str | os.PathLike) -> int | None:
    """The step of the newest committed Cairn checkpoint in `folder`; None if it holds
    none (a folder of the plain Trainer, or one whose save never committed)."""
    return _api._newest_step(folder)


def _holds_trainer_weights(folder: str) -> bool:
    """Whether `folder` is one the plain Trainer wrote: its model weights are there."""
    return any(name in _TRAINER_WEIGHTS for name in os.listdir(folder))


def _whole_json(path: str) -> bool:
    try:
        with open(path) as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def _load_weights(folder: str, step: int, model: Any) -> None:
    """Fills `model`'s parameters and buffers in place from the checkpoint's weights."""
    _api.load(folder, step=step, target={"model": model.state_dict()})
