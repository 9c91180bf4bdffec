"""Cairn: crash-safe, fast, pickle-free checkpoints for machine-learning training.

    import cairn
    cairn.save("runs/job", {"model": model.state_dict(), "step": 100}, step=100)
    state = cairn.load("runs/job", framework="torch")

    with cairn.CheckpointManager("runs/job", keep=cairn.KeepLast(3)) as mgr:
        for step in range(start, steps):
            ...
            mgr.on_step(step, {"model": model.state_dict(), "optim": opt.state_dict()})
"""

from ._api import (
    Cadence,
    CheckpointInfo,
    CheckpointManager,
    DamagedCheckpointWarning,
    PruneReport,
    as_directory,
    copy,
    from_bytes,
    list_checkpoints,
    load,
    prune,
    register_scheme,
    save,
    to_bytes,
    torch_all_gather,
    unregister_scheme,
)
from ._policy import Every, KeepBest, KeepEvery, KeepLast
from ._tree import Piece, Shard
from ._cairn import __version__
from ._errors import (
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
from ._state_dict import LoadReport, Mismatch, StateDictMismatchError, load_state_dict

__all__ = [
    "AlreadyExistsError",
    "Cadence",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DamagedCheckpointWarning",
    "Every",
    "IncompatibleError",
    "InvalidArgumentError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "LoadReport",
    "Mismatch",
    "PermissionDeniedError",
    "PruneReport",
    "Piece",
    "Shard",
    "StateDictMismatchError",
    "StorageFullError",
    "UnavailableError",
    "__version__",
    "as_directory",
    "copy",
    "from_bytes",
    "list_checkpoints",
    "load",
    "load_state_dict",
    "prune",
    "register_scheme",
    "save",
    "to_bytes",
    "torch_all_gather",
    "unregister_scheme",
]
