//! Where checkpoints live: a URI resolved to an `object_store` store plus a prefix.
//!
//! A plain path or `file://` opens the local filesystem with fsync turned on (a write that
//! returned is durable, directories included); `memory://NAME/prefix` opens a process-wide
//! in-memory store shared by every call naming the same `NAME`. There is no second storage
//! abstraction: everything goes through `Arc<dyn ObjectStore>`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;

use crate::error::{Error, Result};

/// A resolved location: a store, a prefix inside it, and for local disks the directory
/// on the filesystem (used to map files instead of copying them).
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    local_dir: Option<PathBuf>,
    uri: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Location").field("uri", &self.uri).finish()
    }
}

fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

impl Location {
    /// Resolves `uri` for reading: a plain path, `file:///abs/path` or
    /// `memory://name/prefix`. A local directory must exist ([`ErrorKind::NotFound`]
    /// otherwise).
    ///
    /// [`ErrorKind::NotFound`]: crate::ErrorKind::NotFound
    ///
    /// ```
    /// let loc = cairn::Location::open("memory://doc/run").unwrap();
    /// assert_eq!(loc.uri(), "memory://doc/run");
    /// ```
    pub fn open(uri: &str) -> Result<Location> {
        Location::resolve(uri, false)
    }

    /// Resolves `uri` for writing: like [`Location::open`], but a missing local directory
    /// is created.
    pub fn create(uri: &str) -> Result<Location> {
        Location::resolve(uri, true)
    }

    /// A location over a store the caller built (a wrapper, a store of its own), at the
    /// store's root; `uri` names it in messages.
    pub fn from_store(store: Arc<dyn ObjectStore>, uri: impl Into<String>) -> Location {
        Location { store, prefix: Path::default(), local_dir: None, uri: uri.into() }
    }

    fn resolve(uri: &str, create: bool) -> Result<Location> {
        if uri.is_empty() {
            return Err(Error::invalid("empty location uri=``"));
        }
        if let Some(rest) = uri.strip_prefix("memory://") {
            let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let store = memory_stores()
                .lock()
                .map_err(|_| Error::invalid("memory store registry poisoned"))?
                .entry(name.to_string())
                .or_insert_with(|| Arc::new(InMemory::new()))
                .clone();
            let prefix = parse_prefix(prefix, uri)?;
            return Ok(Location { store, prefix, local_dir: None, uri: uri.trim_end_matches('/').to_string() });
        }
        let path = if let Some(rest) = uri.strip_prefix("file://") {
            PathBuf::from(rest)
        } else if uri.contains("://") {
            let scheme = uri.split("://").next().unwrap_or_default();
            return Err(Error::invalid(format!("unsupported uri scheme `{scheme}` uri=`{uri}`")));
        } else {
            PathBuf::from(uri)
        };
        Location::open_local(path, create)
    }

    fn open_local(path: PathBuf, create: bool) -> Result<Location> {
        let shown = path.display().to_string();
        if !create && !path.is_dir() {
            return Err(Error::not_found(format!("no such directory dir=`{shown}`")));
        }
        std::fs::create_dir_all(&path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::PermissionDenied {
                crate::ErrorKind::Permission
            } else {
                crate::ErrorKind::Unavailable
            };
            Error::new(kind, format!("cannot create directory dir=`{shown}`")).with_source(e)
        })?;
        let dir = std::fs::canonicalize(&path)
            .map_err(|e| Error::not_found(format!("cannot resolve directory dir=`{shown}`")).with_source(e))?;
        let store = LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| Error::from_store(e, "opening local store", &format!("dir=`{shown}`")))?
            .with_fsync(true)
            .with_automatic_cleanup(true);
        Ok(Location { store: Arc::new(store), prefix: Path::default(), local_dir: Some(dir), uri: shown })
    }

    /// The location `name` below this one (`name` is one or more `/`-separated segments
    /// produced by Cairn, never user data).
    pub fn child(&self, name: &str) -> Location {
        let prefix = name.split('/').fold(self.prefix.clone(), |p, part| p.join(part));
        Location {
            store: self.store.clone(),
            prefix,
            local_dir: self.local_dir.as_ref().map(|d| d.join(name)),
            uri: format!("{}/{}", self.uri, name),
        }
    }

    /// The store path of `name` below this location.
    pub fn path(&self, name: &str) -> Path {
        name.split('/').fold(self.prefix.clone(), |p, part| p.join(part))
    }

    /// The prefix of this location inside its store.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The local directory, when the store is the local filesystem.
    pub fn local_dir(&self) -> Option<&std::path::Path> {
        self.local_dir.as_deref()
    }

    /// The URI (or path) this location was opened from, for messages.
    pub fn uri(&self) -> &str {
        &self.uri
    }
}

fn parse_prefix(prefix: &str, uri: &str) -> Result<Path> {
    Path::parse(prefix.trim_matches('/'))
        .map_err(|e| Error::invalid(format!("invalid path in uri=`{uri}`")).with_source(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_locations_share_a_store_by_name() {
        let a = Location::open("memory://shared-test/a").unwrap();
        let b = Location::open("memory://shared-test/b").unwrap();
        assert!(Arc::ptr_eq(a.store(), b.store()));
        assert_eq!(b.prefix().as_ref(), "b");
    }

    #[test]
    fn unknown_scheme_is_invalid() {
        let err = Location::open("ftp://x/y").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Invalid);
        assert!(err.to_string().contains("ftp"));
    }

    #[test]
    fn child_extends_prefix_and_local_dir() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        assert!(Location::open(dir.path().join("missing").to_str().unwrap()).is_err());
        let child = loc.child("step-000000000001");
        assert_eq!(child.path("manifest.json").as_ref(), "step-000000000001/manifest.json");
        assert!(child.local_dir().unwrap().ends_with("step-000000000001"));
    }
}
