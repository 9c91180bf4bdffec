"""Cairn as Lightning's checkpoint IO: `Trainer(plugins=[cairn.lightning.CheckpointIO()])`.

Every checkpoint Lightning writes (`ModelCheckpoint`'s `epoch=1-step=200.ckpt`,
`last.ckpt`, `trainer.save_checkpoint(path)`) becomes a Cairn run at that path: each save
of the path commits a new checkpoint in it (crash-safe: a save killed at any moment leaves
the previous one whole) and then drops the older ones; loading the path reads its latest,
every checksum verified, nothing unpickled. `remove_checkpoint` (Lightning's retention,
`save_top_k`) removes the run, manifests first. Paths may be any URI Cairn opens
(`s3://...`).

Saves are asynchronous by default: `save_checkpoint` copies the state's tensors (on their
devices) and returns; the writing goes on in the background, at most `max_in_flight`
saves at once (a further save waits for the oldest). A background failure is raised by the
next `save_checkpoint` and by `teardown` (end of `fit`); loads and removals first wait for
the saves in flight.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _LightningCheckpointIO

from . import _api
from ._policy import KeepLast
from ._cairn import CheckpointNotFoundError, InvalidArgumentError
from ._cairn import remove_run as _remove_run

__all__ = ["CheckpointIO"]


class CheckpointIO(_LightningCheckpointIO):
    """Lightning's checkpoint IO through Cairn. `async_save` writes in the background,
    at most `max_in_flight` saves at once; `storage_options` are the store's settings,
    as for `cairn.save`."""

    def __init__(
        self,
        *,
        async_save: bool = True,
        max_in_flight: int = 1,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise InvalidArgumentError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.async_save = async_save
        self.max_in_flight = max_in_flight
        self.storage_options = storage_options
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: list[concurrent.futures.Future] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise InvalidArgumentError(
                "cairn.lightning.CheckpointIO takes its storage_options when it is made, not per save"
            )
        self._raise_failure()
        if not self.async_save:
            self._write(checkpoint, path)
            return
        snapshot = _copied(checkpoint)
        while len(self._in_flight) >= self.max_in_flight:
            self._settle(self._in_flight[0])
            self._raise_failure()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cairn-lightning")
        self._in_flight.append(self._executor.submit(self._write, snapshot, path))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        self._wait()
        if callable(map_location) or isinstance(map_location, dict):
            raise InvalidArgumentError("map_location must be a device (or its name), not a function or a dict")
        return _api.load(path, framework="torch", map_location=map_location, storage_options=self.storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        self._wait()
        try:
            _remove_run(_api._uri(path), self.storage_options)
        except CheckpointNotFoundError:
            pass  # nothing there: as Lightning's own, removing nothing is not an error

    def teardown(self) -> None:
        self._wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _write(self, checkpoint: dict[str, Any], path: Any) -> None:
        """Commits `checkpoint` as the newest checkpoint of the run `path`, then drops
        the older ones. Its step is Lightning's global step, or one past the newest
        already there."""
        try:
            newest = max((i.step for i in _api.list_checkpoints(path, storage_options=self.storage_options)), default=-1)
        except CheckpointNotFoundError:
            newest = -1
        step = max(int(checkpoint.get("global_step", 0) or 0), newest + 1)
        _api.save(path, checkpoint, step=step, storage_options=self.storage_options)
        _api.prune(path, keep=KeepLast(1), storage_options=self.storage_options)

    def _settle(self, future: concurrent.futures.Future) -> None:
        """Waits for the save `future`, keeping its failure for `_raise_failure`."""
        try:
            future.result()
        except BaseException as e:  # raised to the training loop at its next save
            with self._lock:
                self._error = self._error or e
        finally:
            if future in self._in_flight:
                self._in_flight.remove(future)

    def _wait(self) -> None:
        """Waits for every save in flight; raises the first background failure."""
        while self._in_flight:
            self._settle(self._in_flight[0])
        self._raise_failure()

    def _raise_failure(self) -> None:
        for future in [f for f in self._in_flight if f.done()]:
            self._settle(future)
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error


def _copied(state: Any) -> Any:
    """`state` with every tensor copied on its own device, so that training may change
    the originals while the copy is written."""
    if isinstance(state, dict):
        out = {k: _copied(v) for k, v in state.items()}
        if type(state) is dict:
            return out
        rebuilt = state.copy()
        rebuilt.update(out)
        return rebuilt
    if isinstance(state, list):
        return [_copied(v) for v in state]
    if isinstance(state, tuple):
        items = [_copied(v) for v in state]
        return type(state)(*items) if hasattr(state, "_fields") else type(state)(items)
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    return state
