//! The exception classes and the one mapping of Cairn errors (and panics) to them.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use cairn::ErrorKind;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(cairn._cairn, CheckpointError, PyException, "Base class of every Cairn error.");

create_exception!(cairn._cairn, InvalidArgumentError, CheckpointError, "The call passed something unusable.");
create_exception!(cairn._cairn, CheckpointNotFoundError, CheckpointError, "The run, checkpoint or key does not exist.");
create_exception!(
    cairn._cairn,
    AlreadyExistsError,
    CheckpointError,
    "The step is already committed; nothing was overwritten."
);
create_exception!(
    cairn._cairn,
    CorruptCheckpointError,
    CheckpointError,
    "Stored bytes are damaged (checksum, truncation, impossible header)."
);
create_exception!(
    cairn._cairn,
    IncompatibleError,
    CheckpointError,
    "Well-formed data this version of Cairn cannot use."
);
create_exception!(cairn._cairn, PermissionDeniedError, CheckpointError, "The store refused access.");
create_exception!(
    cairn._cairn,
    StorageFullError,
    CheckpointError,
    "The store is out of space; free some and save again."
);
create_exception!(
    cairn._cairn,
    UnavailableError,
    CheckpointError,
    "The store failed or timed out; retrying may succeed."
);

/// A duration given in seconds as the argument `name`; negative or non-finite is invalid.
pub(crate) fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| InvalidArgumentError::new_err(format!("invalid {name}={value}")))
}

pub(crate) fn to_py_err(err: cairn::Error) -> PyErr {
    let message = err.full_message();
    match err.kind() {
        ErrorKind::Invalid => InvalidArgumentError::new_err(message),
        ErrorKind::NotFound => CheckpointNotFoundError::new_err(message),
        ErrorKind::AlreadyExists => AlreadyExistsError::new_err(message),
        ErrorKind::Corrupt => CorruptCheckpointError::new_err(message),
        ErrorKind::Incompatible => IncompatibleError::new_err(message),
        ErrorKind::Permission => PermissionDeniedError::new_err(message),
        ErrorKind::StorageFull => StorageFullError::new_err(message),
        ErrorKind::Unavailable => UnavailableError::new_err(message),
        ErrorKind::Internal => CheckpointError::new_err(format!("internal error in cairn (please report): {message}")),
        _ => CheckpointError::new_err(message),
    }
}

/// The kind of a Python exception raised where Cairn expects its own errors: that of its
/// `CheckpointError` subclass; anything else counts as the caller's error (`Invalid`).
pub(crate) fn error_kind(py: Python<'_>, err: &PyErr) -> ErrorKind {
    let kinds = [
        (err.is_instance_of::<CorruptCheckpointError>(py), ErrorKind::Corrupt),
        (err.is_instance_of::<IncompatibleError>(py), ErrorKind::Incompatible),
        (err.is_instance_of::<UnavailableError>(py), ErrorKind::Unavailable),
        (err.is_instance_of::<PermissionDeniedError>(py), ErrorKind::Permission),
        (err.is_instance_of::<CheckpointNotFoundError>(py), ErrorKind::NotFound),
        (err.is_instance_of::<StorageFullError>(py), ErrorKind::StorageFull),
        (err.is_instance_of::<AlreadyExistsError>(py), ErrorKind::AlreadyExists),
    ];
    kinds.into_iter().find(|(is, _)| *is).map_or(ErrorKind::Invalid, |(_, kind)| kind)
}

/// Runs `f`, turning a Rust panic into a `CheckpointError` instead of letting it out.
pub(crate) fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(CheckpointError::new_err(format!("internal error in cairn (please report): {what}")))
    })
}
