"""Type stubs of the native module `cairn._cairn` (the PyO3 layer). Use the `cairn`
package's public API instead; these signatures are what it calls."""

from typing import Any, Callable, Sequence

__version__: str

class CheckpointError(Exception): ...
class InvalidArgumentError(CheckpointError): ...
class CheckpointNotFoundError(CheckpointError): ...
class AlreadyExistsError(CheckpointError): ...
class CorruptCheckpointError(CheckpointError): ...
class IncompatibleError(CheckpointError): ...
class PermissionDeniedError(CheckpointError): ...
class StorageFullError(CheckpointError): ...
class UnavailableError(CheckpointError): ...

TensorLeaf = tuple[str, str, list[int], Any, tuple[list[int], list[int]] | None]
ValueLeaf = tuple[str, Any]
Loaded = tuple[list[tuple[Any, ...]] | dict[str, Any], str | None, dict[str, Any]]
# numpy's ndarray type and the numpy dtype of each Cairn dtype name: a load then gives its
# tensors as numpy arrays, in a dict by key, with the values.
Arrays = tuple[Any, dict[str, Any]] | None

class TensorBuffer:
    """Loaded tensor bytes, exported through the buffer protocol without a copy."""

Options = dict[str, str] | None

def save(
    uri: str,
    tensors: Sequence[TensorLeaf],
    values: Sequence[ValueLeaf],
    structure: str | None = None,
    step: int | None = None,
    metrics: Sequence[tuple[str, float]] | None = None,
    metadata: str | None = None,
    storage_options: Options = None,
    rank: int = 0,
    world_size: int = 1,
    all_gather: Callable[[bytes], list[bytes]] | None = None,
    timeout: float = 600.0,
    incremental: bool = False,
) -> dict[str, Any]: ...
def open(uri: str, step: int | None = None, storage_options: Options = None) -> Opened: ...

class Opened:
    """A committed checkpoint, opened (its manifest read and validated once)."""

    def load(
        self,
        prefix: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        rename: Sequence[tuple[str, str]] | None = None,
        boxes: dict[str, tuple[list[int], list[int]]] | None = None,
        shapes: dict[str, list[int]] | None = None,
        rank: int | None = None,
        progress: Callable[[str, int], Any] | None = None,
        arrays: Arrays = None,
    ) -> Loaded: ...
    def describe(self, rank: int | None = None) -> tuple[list[tuple[str, str, list[int]]], list[str], str | None]: ...

def write_part(uri: str, tensors: list[Any], rank: int, step: int | None = None, storage_options: Options = None) -> bytes: ...
def commit_parts(
    uri: str,
    parts: list[bytes],
    values: list[tuple[str, Any]],
    structure: str | None,
    world_size: int,
    step: int | None = None,
    metadata: str | None = None,
    storage_options: Options = None,
) -> dict[str, Any]: ...
def remove_run(uri: str, storage_options: Options = None) -> None: ...
def list_checkpoints(uri: str, storage_options: Options = None) -> tuple[list[dict[str, Any]], list[str]]: ...
def prune(
    uri: str,
    keep_last: int | None = None,
    keep_every: int | None = None,
    keep_best: tuple[int, str, str] | None = None,
    grace: float = 3600.0,
    dry_run: bool = False,
    storage_options: Options = None,
) -> tuple[list[int], int, list[str], list[str]]: ...
def copy(
    src: str,
    dst: str,
    src_options: Options = None,
    dst_options: Options = None,
    progress: Callable[[str, int], Any] | None = None,
) -> list[dict[str, Any]]: ...
def to_bytes(uri: str, storage_options: Options = None) -> bytes: ...
def from_bytes(bundle: bytes, uri: str, storage_options: Options = None) -> dict[str, Any]: ...
def as_directory(uri: str, cache_dir: str, storage_options: Options = None) -> str: ...
def register_scheme(prefix: str, resolver: Callable[[str], str]) -> None: ...
def unregister_scheme(prefix: str) -> bool: ...
def unflatten(structure: str, leaves: dict[str, Any]) -> tuple[bool, Any]: ...

class Manager:
    def __init__(
        self,
        uri: str,
        policies: Sequence[tuple[int, int | None]] | None = None,
        save_interval: float | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: tuple[int, str, str] | None = None,
        async_save: bool = True,
        max_in_flight: int = 1,
        preemption_signal: int | None = None,
        storage_options: Options = None,
        rank: int = 0,
        world_size: int = 1,
        orphan_grace: float | None = 3600.0,
        all_gather: Callable[[bytes], list[bytes]] | None = None,
        timeout: float = 600.0,
        incremental: bool = True,
        mtbf: float | None = None,
        # (uri, policies, save_interval, mtbf, (keep_last, keep_every, keep_best), upload_grace)
        local: tuple[str, Sequence[tuple[int, int | None]] | None, float | None, float | None, tuple[Any, Any, Any], float]
        | None = None,
        on_event: Callable[[dict[str, Any]], Any] | None = None,
        event_log: str | None = None,
        background_snapshot: bool = False,
    ) -> None: ...
    def cadence(self) -> tuple[float | None, float | None, float | None, float] | None: ...
    # `prepare()` returns `(leaves, metrics, metadata)`; called only when the step saves.
    def on_step(self, step: int, prepare: Callable[[], tuple[Any, Any, Any]], force: bool = False) -> bool: ...
    def save(self, step: int, prepare: Callable[[], tuple[Any, Any, Any]], temporary: bool = False) -> None: ...
    def wait_snapshot(self) -> None: ...
    def wait(self) -> None: ...
    def close(self) -> None: ...
    def restore(
        self,
        step: int | None = None,
        prefix: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        rename: Sequence[tuple[str, str]] | None = None,
        arrays: Arrays = None,
    ) -> tuple[Loaded, list[str]]: ...
    def restore_into(self, step: int | None, load: Callable[[str], Any]) -> tuple[Any, dict[str, Any], list[str]]: ...
    def pending_uploads(self) -> list[int]: ...
    def local_uri(self) -> str | None: ...
    def latest_step(self) -> int | None: ...
    def settled_latest_step(self) -> int | None: ...
    def take_cleanup_errors(self) -> list[CheckpointError]: ...
    def list(self) -> list[dict[str, Any]]: ...
    def reset(self) -> None: ...
    def preempted(self) -> bool: ...
    def uri(self) -> str: ...
