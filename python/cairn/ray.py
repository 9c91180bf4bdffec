"""Cairn in Ray Train: `cairn.ray.report(metrics, state, step=...)` where a training
function would call `ray.train.report(metrics, checkpoint=...)`, and
`cairn.ray.load(ray.train.get_checkpoint())` to resume.

Every worker passes its state; together they commit one Cairn checkpoint in the folder Ray
names under the run's storage path (`RunConfig(storage_path=...)`, a local or shared
folder, `s3://` or `gs://`), through Ray's `checkpoint_upload_fn`: nothing is first written
to a local folder and copied, replicated tensors (a DDP model) are written once, each
worker's RNG state is its own, and Ray registers the checkpoint only once it is committed.
Ray keeps the history (`CheckpointConfig(num_to_keep=...)`) and hands the newest back to a
restarted worker group (`FailureConfig(max_failures=...)`) or to `result.checkpoint`; Cairn
reads it without a copy, every checksum verified, nothing unpickled.
"""

from __future__ import annotations

import posixpath
import tempfile
from typing import Any

import ray.train

from . import _api
from ._cairn import CheckpointNotFoundError, InvalidArgumentError

__all__ = ["report", "load", "uri"]

_SCHEMES = {"s3": "s3://", "gcs": "gs://"}  # pyarrow filesystem type names


def report(
    metrics: dict[str, Any],
    state: Any,
    *,
    step: int,
    checkpoint_dir_name: str | None = None,
    storage_options: dict[str, str] | None = None,
    **report_options: Any,
) -> None:
    """Commits `state` as this report's checkpoint (every worker calls it, as
    `ray.train.report`), then reports `metrics` with it. The checkpoint folder is the one
    Ray names (or `checkpoint_dir_name`) under the run's storage, holding the checkpoint
    of `step`; `storage_options` are the store's settings, as for `cairn.save`;
    `report_options` go on to `ray.train.report`. The commit is synchronous: Ray's
    asynchronous upload would write the state while training changes it."""
    mode = report_options.get("checkpoint_upload_mode", ray.train.CheckpointUploadMode.SYNC)
    if mode != ray.train.CheckpointUploadMode.SYNC:
        raise InvalidArgumentError(f"cairn.ray.report commits synchronously; checkpoint_upload_mode={mode} is refused")
    context = ray.train.get_context()
    storage = context.get_storage()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    job: dict[str, Any] = {}
    if world_size > 1:
        job = {"rank": rank, "world_size": world_size}
        if _torch_distributed():
            job["all_gather"] = _api.torch_all_gather()

    def commit(_empty: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        path = posixpath.join(storage.experiment_fs_path, dir_name)
        _api.save(uri(ray.train.Checkpoint(path, storage.storage_filesystem)), state, step=step,
                  metrics=_numbers(metrics), storage_options=storage_options, **job)
        return ray.train.Checkpoint(path, filesystem=storage.storage_filesystem)

    # Ray uploads only a checkpoint it is handed: an empty folder stands for this one.
    with tempfile.TemporaryDirectory(prefix="cairn-ray-") as empty:
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(empty),
            checkpoint_dir_name=checkpoint_dir_name,
            checkpoint_upload_fn=commit,
            **report_options,
        )


def load(checkpoint: ray.train.Checkpoint, *, storage_options: dict[str, str] | None = None, **options: Any) -> Any:
    """Loads the Cairn checkpoint a `ray.train.Checkpoint` points at (from
    `ray.train.get_checkpoint()` or `result.checkpoint`); `options` are `cairn.load`'s
    (`framework="torch"`, `target=...`). Every worker reads the same step, and in a
    training worker its own rank's values and RNG states (unless `rank=` says whose)."""
    where = uri(checkpoint)
    step = _api._newest_step(where, storage_options)
    if step is None:
        raise CheckpointNotFoundError(f"no committed Cairn checkpoint in the Ray checkpoint `{where}`")
    if "rank" not in options:
        options["rank"] = _worker_rank()
    return _api.load(where, step=step, storage_options=storage_options, **options)


def uri(checkpoint: ray.train.Checkpoint) -> str:
    """The URI Cairn opens for a `ray.train.Checkpoint`'s folder (a path on the local
    filesystem, `s3://` or `gs://`)."""
    kind = checkpoint.filesystem.type_name
    if kind == "local":
        return checkpoint.path
    if kind in _SCHEMES:
        return _SCHEMES[kind] + checkpoint.path
    raise InvalidArgumentError(
        f"cairn.ray reads and writes local, s3:// and gs:// storage; this run's storage is `{kind}`"
    )


def _worker_rank() -> int | None:
    """This training worker's rank; None outside a Ray Train worker (the driver)."""
    try:
        return ray.train.get_context().get_world_rank()
    except RuntimeError:  # not in a training worker: Ray refuses the call
        return None


def _torch_distributed() -> bool:
    """Whether this worker is in a torch.distributed job (Ray's TorchTrainer), whose
    collectives then coordinate the save."""
    try:
        import torch.distributed
    except ImportError:
        return False
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics that are numbers, kept with the checkpoint (`cairn ls` shows them)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
