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
saves at once (a further save waits for the oldest); removals queue behind them. The first
background failure is raised by the next `save_checkpoint` and by `teardown` (end of
`fit`), and stops queued removals; loads first wait for the background work. A failure
nobody is left to hear (a save after `fit`) is printed at exit.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import sys
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _LightningCheckpointIO

from . import _api
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
        self._saves: list[concurrent.futures.Future] = []  # in flight, at most max_in_flight
        self._pending: list[concurrent.futures.Future] = []  # saves and removals queued
        atexit.register(self._at_exit)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise InvalidArgumentError(
                "cairn.lightning.CheckpointIO takes its storage_options when it is made, not per save"
            )
        self._raise_failure()
        if not self.async_save:
            self._write(checkpoint, path)
            return
        # Wait for a free slot before copying: at most `max_in_flight` copies exist.
        while len(self._saves) >= self.max_in_flight:
            self._settle(self._saves[0])
            self._raise_failure()
        snapshot = _copied(checkpoint)
        self._saves.append(self._submit(self._write, snapshot, path))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        self._wait()
        if callable(map_location) or isinstance(map_location, dict):
            raise InvalidArgumentError("map_location must be a device (or its name), not a function or a dict")
        return _api.load(path, framework="torch", map_location=map_location, storage_options=self.storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        if not self.async_save:
            self._remove(path, [])
            return
        # Queued behind the saves in flight (Lightning removes the checkpoint a new save
        # replaces right after asking for that save): the loop does not wait for them, and
        # nothing is removed if one of them failed.
        self._submit(self._remove, path, list(self._pending))

    def wait(self) -> None:
        """Waits for the saves and removals in the background (before the job exits on a
        preemption signal, say); raises the first failure not reported yet."""
        self._wait()

    def teardown(self) -> None:
        try:
            self._wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _write(self, checkpoint: dict[str, Any], path: Any) -> None:
        """Commits `checkpoint` as the newest checkpoint of the run `path`, then drops
        the older ones. Its step is Lightning's global step, or one past the newest
        already there."""
        _api._replace_newest(path, checkpoint, int(checkpoint.get("global_step", 0) or 0), self.storage_options)

    def _remove(self, path: Any, before: list[concurrent.futures.Future]) -> None:
        """Removes the run `path`, unless some of the work queued `before` it failed
        (done by now: there is one background thread)."""
        if any(not f.cancelled() and f.exception() is not None for f in before):
            return
        try:
            _remove_run(_api._uri(path), self.storage_options)
        except CheckpointNotFoundError:
            pass  # nothing there: as Lightning's own, removing nothing is not an error

    def _submit(self, work: Any, *args: Any) -> concurrent.futures.Future:
        """Runs `work(*args)` on the one background thread, after what is queued."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cairn-lightning")
        future = self._executor.submit(work, *args)
        self._pending.append(future)
        return future

    def _settle(self, future: concurrent.futures.Future) -> None:
        """Waits for the background work `future`."""
        concurrent.futures.wait([future])
        self._saves = [f for f in self._saves if not f.done()]

    def _wait(self) -> None:
        """Waits for all background work; raises the first failure not reported yet."""
        concurrent.futures.wait(self._pending)
        self._saves = []
        self._raise_failure()

    def _raise_failure(self) -> None:
        """Raises the first failure of the background work done since the last call (the
        others, of the same cause most likely, are dropped with it)."""
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            error = None if future.cancelled() else future.exception()
            if error is not None:
                raise error

    def _at_exit(self) -> None:
        """At interpreter exit (a save made after `fit`, say): waits for the background
        work and reports a failure that nobody else will."""
        try:
            self.teardown()
        except Exception as e:
            print(f"cairn.lightning: a background checkpoint save failed: {e}", file=sys.stderr)


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
    if isinstance(state, np.ndarray):
        return state.copy()
    return state
