//! The one public error type: a small [`ErrorKind`] a caller can act on, plus a message
//! that ends with the facts (file, tensor, key) and the underlying cause, if any.

use std::fmt;

use crate::local_store::Refused;

/// What went wrong, in terms a caller can act on. New kinds may be added: match with a
/// wildcard arm. Serialised by name (ranks of a multi-rank save exchange them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller passed something unusable (bad URI, bad state, bad option).
    Invalid,
    /// The run, checkpoint, file or key does not exist.
    NotFound,
    /// A checkpoint for this step is already committed; nothing was overwritten.
    AlreadyExists,
    /// Stored bytes are damaged or lie (checksum, truncation, impossible header).
    Corrupt,
    /// The data is well-formed but this version of Cairn cannot use it.
    Incompatible,
    /// The store refused access (permissions, a read-only filesystem).
    Permission,
    /// The store is out of space: free some (e.g. `cairn prune`) and save again.
    StorageFull,
    /// The store failed or timed out; retrying later may succeed.
    Unavailable,
    /// A bug in Cairn (a task panicked): retrying will not help; please report it.
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Incompatible => "incompatible",
            ErrorKind::Permission => "permission denied",
            ErrorKind::StorageFull => "storage full",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal error",
        };
        f.write_str(name)
    }
}

/// A Cairn error: its [`kind`](Error::kind), a lowercase message that names the file,
/// tensor or key involved, and the underlying cause when there is one.
///
/// ```
/// let err = cairn::Error::new(cairn::ErrorKind::NotFound, "no checkpoint run=`/tmp/x`");
/// assert_eq!(err.kind(), cairn::ErrorKind::NotFound);
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with `message` (lowercase, ending with the facts).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the cause chain.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message followed by every cause not already said, joined by `: `.
    pub fn full_message(&self) -> String {
        let mut out = self.message.clone();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            // Wrapping errors often repeat their cause's text (`... : No space left on
            // device (os error 28)`): say each once.
            let text = c.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cause = c.source();
        }
        out
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    pub(crate) fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub(crate) fn incompatible(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Incompatible, message)
    }

    /// Classifies a store failure on `what` (e.g. ``file=`x` ``) into a kind.
    pub(crate) fn from_store(err: object_store::Error, doing: &str, what: &str) -> Self {
        use object_store::Error as E;
        let kind = match &err {
            E::NotFound { .. } => ErrorKind::NotFound,
            E::AlreadyExists { .. } | E::Precondition { .. } => ErrorKind::AlreadyExists,
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => ErrorKind::Permission,
            E::InvalidPath { .. } | E::NotSupported { .. } | E::NotImplemented { .. } => ErrorKind::Invalid,
            E::JoinError { .. } => ErrorKind::Internal,
            _ => io_kind_in(&err).unwrap_or(ErrorKind::Unavailable),
        };
        if let Some(refused) = refused_in(&err) {
            return Self::corrupt(format!("{refused} {what}"));
        }
        Self::new(kind, format!("{doing} failed {what}")).with_source(err)
    }
}

impl Error {
    /// Classifies a local filesystem failure on `what` (e.g. ``file=`x` ``) into a kind.
    pub(crate) fn from_io(err: std::io::Error, doing: &str, what: &str) -> Self {
        if let Some(refused) = refused_in(&err) {
            return Self::corrupt(format!("{refused} {what}"));
        }
        let kind = io_kind_in(&err).unwrap_or(ErrorKind::Unavailable);
        Self::new(kind, format!("{doing} failed {what}")).with_source(err)
    }
}

/// The path the local store refused (a symlink or special file inside a run), if that is
/// what failed: such a run holds what Cairn never writes, so the failure is corrupt.
fn refused_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(c) = cause {
        let inner = c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        if let Some(refused) = c.downcast_ref::<Refused>().or_else(|| inner.and_then(|e| e.downcast_ref())) {
            return Some(refused);
        }
        cause = c.source();
    }
    None
}

/// `text` with control characters (terminal escape sequences among them) escaped, so
/// that names and bytes from a stored file print as data, never as commands to a
/// terminal.
///
/// ```
/// assert_eq!(cairn::error::escape_control("a\x1b[2Jb"), "a\\u{1b}[2Jb");
/// ```
pub fn escape_control(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// A cause whose text came from untrusted bytes, kept printable: control characters
/// escaped and at most [`Untrusted::MAX_CHARS`] characters.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Untrusted(String);

impl Untrusted {
    /// Longest text kept.
    const MAX_CHARS: usize = 160;

    /// The printable form of `err`'s text.
    pub(crate) fn of(err: &dyn std::error::Error) -> Untrusted {
        let text = err.to_string();
        let mut kept: String = escape_control(&text).chars().take(Self::MAX_CHARS).collect();
        if kept.len() < text.len() && text.chars().count() > Self::MAX_CHARS {
            kept.push('…');
        }
        Untrusted(kept)
    }
}

/// Finds an `std::io::Error` in a cause chain and classifies it.
fn io_kind_in(err: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(match io.kind() {
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => ErrorKind::Permission,
                std::io::ErrorKind::StorageFull
                | std::io::ErrorKind::QuotaExceeded
                | std::io::ErrorKind::FileTooLarge => ErrorKind::StorageFull,
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
                _ => ErrorKind::Unavailable,
            });
        }
        cause = c.source();
    }
    None
}
