"""Cairn's exceptions: one base class and one subclass per kind of failure a caller can
act on. Raised by the native layer with the Rust message, which names the file, tensor
or key involved."""

from ._cairn import (
    AlreadyExistsError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleError,
    InvalidArgumentError,
    PermissionDeniedError,
    StorageFullError,
    UnavailableError,
)

__all__ = [
    "AlreadyExistsError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "IncompatibleError",
    "InvalidArgumentError",
    "PermissionDeniedError",
    "StorageFullError",
    "UnavailableError",
]
