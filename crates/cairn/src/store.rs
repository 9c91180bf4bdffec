//! Where checkpoints live: a URI resolved to an `object_store` store plus a prefix.
//!
//! - a plain path or `file://`: the local filesystem, with fsync turned on (a write that
//!   returned is durable, directories included);
//! - `memory://NAME/prefix`: a process-wide in-memory store shared by every call naming
//!   the same `NAME`;
//! - `s3://`, `gs://`, `az://` (`abfs://`, `azure://`), `http(s)://` (read): configured from
//!   the environment the way each cloud's users expect (`AWS_ENDPOINT_URL`,
//!   `AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`, ...), then
//!   from explicit [`StoreOptions`] (object_store configuration keys such as
//!   `aws_endpoint`, `aws_allow_http`); transient failures are retried with backoff;
//! - any prefix registered with [`register_scheme`] (the longest matching prefix wins).
//!
//! There is no second storage abstraction: everything goes through `Arc<dyn ObjectStore>`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;

use crate::error::{Error, Result};
use crate::local_store::{LocalStore, Root};

/// A resolved location: a store, a prefix inside it, and for local disks the directory
/// on the filesystem (used to map files instead of copying them) and the folder the
/// store is confined to.
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    local_dir: Option<PathBuf>,
    local_root: Option<Arc<Root>>,
    uri: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Location").field("uri", &self.uri).finish()
    }
}

/// Explicit store configuration: object_store configuration keys and values (for
/// example `aws_endpoint`, `aws_region`, `aws_allow_http`, `google_service_account`,
/// `azure_storage_account_name`). They override the environment.
pub type StoreOptions = BTreeMap<String, String>;

/// Builds the location of a URI whose prefix was registered with [`register_scheme`].
pub type SchemeFactory = Arc<dyn Fn(&str, &StoreOptions) -> Result<Location> + Send + Sync>;

fn schemes() -> &'static Mutex<BTreeMap<String, SchemeFactory>> {
    static SCHEMES: OnceLock<Mutex<BTreeMap<String, SchemeFactory>>> = OnceLock::new();
    SCHEMES.get_or_init(Default::default)
}

/// Registers `prefix` (e.g. `"mystore://"`): URIs starting with it are resolved by
/// `factory`. Among registered prefixes the longest match wins; registered prefixes win
/// over the built-in schemes. Registering a prefix again replaces its factory.
///
/// ```
/// use std::sync::Arc;
/// cairn::register_scheme("team://", Arc::new(|uri: &str, _opts: &cairn::StoreOptions| {
///     cairn::Location::create(&uri.replacen("team://", "memory://team/", 1))
/// }));
/// assert_eq!(cairn::Location::create("team://runs/a").unwrap().uri(), "memory://team/runs/a");
/// ```
pub fn register_scheme(prefix: impl Into<String>, factory: SchemeFactory) {
    if let Ok(mut map) = schemes().lock() {
        map.insert(prefix.into(), factory);
    }
}

/// Removes a prefix registered with [`register_scheme`]; returns whether it was there.
pub fn unregister_scheme(prefix: &str) -> bool {
    schemes().lock().is_ok_and(|mut map| map.remove(prefix).is_some())
}

fn registered_factory(uri: &str) -> Option<SchemeFactory> {
    let map = schemes().lock().ok()?;
    map.iter()
        .filter(|(prefix, _)| uri.starts_with(prefix.as_str()))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, f)| f.clone())
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
        Location::resolve(uri, false, &StoreOptions::new())
    }

    /// Resolves `uri` for writing: like [`Location::open`], but a missing local directory
    /// is created.
    pub fn create(uri: &str) -> Result<Location> {
        Location::resolve(uri, true, &StoreOptions::new())
    }

    /// Resolves `uri` with explicit store options; `create` makes a missing local
    /// directory.
    pub fn with_options(uri: &str, create: bool, options: &StoreOptions) -> Result<Location> {
        Location::resolve(uri, create, options)
    }

    /// A location over a store the caller built (a wrapper, a store of its own), at the
    /// store's root; `uri` names it in messages.
    pub fn from_store(store: Arc<dyn ObjectStore>, uri: impl Into<String>) -> Location {
        Location { store, prefix: Path::default(), local_dir: None, local_root: None, uri: uri.into() }
    }

    fn resolve(uri: &str, create: bool, options: &StoreOptions) -> Result<Location> {
        if uri.is_empty() {
            return Err(Error::invalid("empty location uri=``"));
        }
        if let Some(factory) = registered_factory(uri) {
            return factory(uri, options);
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
            return Ok(Location {
                store,
                prefix,
                local_dir: None,
                local_root: None,
                uri: uri.trim_end_matches('/').to_string(),
            });
        }
        let path = if uri.starts_with("file://") {
            // Percent-encoded as any URL (`file:///data/my%20run`).
            let url =
                url::Url::parse(uri).map_err(|e| Error::invalid(format!("invalid uri uri=`{uri}`")).with_source(e))?;
            url.to_file_path()
                .map_err(|()| Error::invalid(format!("a file:// uri names an absolute local path uri=`{uri}`")))?
        } else if uri.contains("://") {
            return Location::open_remote(uri, options);
        } else {
            PathBuf::from(uri)
        };
        Location::open_local(path, create)
    }

    fn open_remote(uri: &str, options: &StoreOptions) -> Result<Location> {
        let (store, prefix) = crate::cloud_store::open(uri, options)?;
        Ok(Location { store, prefix, local_dir: None, local_root: None, uri: uri.trim_end_matches('/').to_string() })
    }

    fn open_local(path: PathBuf, create: bool) -> Result<Location> {
        let shown = path.display().to_string();
        if !create && !path.is_dir() {
            return Err(Error::not_found(format!("no such directory dir=`{shown}`")));
        }
        create_dirs_durably(&path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::PermissionDenied {
                crate::ErrorKind::Permission
            } else {
                crate::ErrorKind::Unavailable
            };
            Error::new(kind, format!("cannot create directory dir=`{shown}`")).with_source(e)
        })?;
        let dir = std::fs::canonicalize(&path)
            .map_err(|e| Error::not_found(format!("cannot resolve directory dir=`{shown}`")).with_source(e))?;
        let store = LocalStore::new(dir.clone())
            .map_err(|e| Error::from_store(e, "opening local store", &format!("dir=`{shown}`")))?;
        let local_root = Some(store.root().clone());
        Ok(Location { store: Arc::new(store), prefix: Path::default(), local_dir: Some(dir), local_root, uri: shown })
    }

    /// The location `name` below this one (`name` is one or more `/`-separated segments
    /// produced by Cairn, never user data).
    pub fn child(&self, name: &str) -> Location {
        let prefix = name.split('/').fold(self.prefix.clone(), |p, part| p.join(part));
        Location {
            store: self.store.clone(),
            prefix,
            local_dir: self.local_dir.as_ref().map(|d| d.join(name)),
            local_root: self.local_root.clone(),
            uri: format!("{}/{}", self.uri, name),
        }
    }

    /// The location that holds this one (a checkpoint folder's run): the same store one
    /// level up; for a local folder opened directly (at its store's root), its parent
    /// folder opened as a store of its own, confined to it like any local run. `None` at
    /// the root of a store, or when the parent cannot be opened.
    pub fn parent(&self) -> Option<Location> {
        let mut parts: Vec<_> = self.prefix.parts().collect();
        if parts.pop().is_none() {
            let parent = self.local_dir.as_deref()?.parent()?;
            return Location::open_local(parent.to_path_buf(), false).ok();
        }
        let uri = self.uri.trim_end_matches('/');
        Some(Location {
            store: self.store.clone(),
            prefix: Path::from_iter(parts),
            local_dir: self.local_dir.as_deref().and_then(std::path::Path::parent).map(std::path::Path::to_path_buf),
            local_root: self.local_root.clone(),
            uri: uri.rsplit_once('/').map_or(uri, |(parent, _)| parent).to_string(),
        })
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

    /// The folder a local store is confined to (reads and checks that go around
    /// `object_store`, e.g. memory maps, go through it).
    pub(crate) fn local_root(&self) -> Option<&Arc<Root>> {
        self.local_root.as_ref()
    }

    /// The URI (or path) this location was opened from, for messages.
    pub fn uri(&self) -> &str {
        &self.uri
    }
}

/// Creates `path` and its missing ancestors, then fsyncs every directory whose entries
/// changed (each created one and the existing parent of the topmost), so that the run's
/// folder itself survives a power loss, not only what is written inside it.
pub(crate) fn create_dirs_durably(path: &std::path::Path) -> std::io::Result<()> {
    let path = std::path::absolute(path)?;
    let path = path.as_path();
    let mut first_existing = path;
    while !first_existing.exists() {
        match first_existing.parent() {
            Some(parent) => first_existing = parent,
            None => break,
        }
    }
    if first_existing == path {
        return Ok(());
    }
    std::fs::create_dir_all(path)?;
    let mut dir = path;
    loop {
        std::fs::File::open(dir)?.sync_all()?;
        if dir == first_existing {
            return Ok(());
        }
        dir = match dir.parent() {
            Some(parent) => parent,
            None => return Ok(()),
        };
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
    fn file_uris_are_percent_decoded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("my run#1")).unwrap();
        let uri = url::Url::from_directory_path(dir.path().join("my run#1")).unwrap().to_string();
        assert!(uri.contains("my%20run%231"), "{uri}");
        let loc = Location::open(&uri).unwrap();
        assert_eq!(loc.local_dir().unwrap(), dir.path().join("my run#1"));
        let err = Location::open("file://relative/path").unwrap_err();
        assert!(err.to_string().contains("absolute local path"), "{err}");
    }

    #[test]
    fn memory_locations_share_a_store_by_name() {
        let a = Location::open("memory://shared-test/a").unwrap();
        let b = Location::open("memory://shared-test/b").unwrap();
        assert!(Arc::ptr_eq(a.store(), b.store()));
        assert_eq!(b.prefix().as_ref(), "b");
    }

    #[test]
    fn longest_registered_prefix_wins() {
        register_scheme("lp://", Arc::new(|_: &str, _: &StoreOptions| Location::create("memory://lp-short/x")));
        register_scheme("lp://deep/", Arc::new(|_: &str, _: &StoreOptions| Location::create("memory://lp-long/x")));
        assert_eq!(Location::open("lp://deep/a").unwrap().uri(), "memory://lp-long/x");
        assert_eq!(Location::open("lp://other").unwrap().uri(), "memory://lp-short/x");
        assert!(unregister_scheme("lp://deep/"));
        assert_eq!(Location::open("lp://deep/a").unwrap().uri(), "memory://lp-short/x");
    }

    #[test]
    fn unknown_scheme_is_invalid() {
        let err = Location::open("ftp://x/y").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Invalid);
        assert!(err.to_string().contains("ftp"));
    }

    #[test]
    fn parent_undoes_child_and_a_local_folder_opened_directly_has_its_own() {
        let run = Location::open("memory://store-parent/run").unwrap();
        let parent = run.child("step-000000000001").parent().unwrap();
        assert_eq!((parent.prefix(), parent.uri()), (run.prefix(), run.uri()));
        assert!(Location::open("memory://store-parent").unwrap().parent().is_none());
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("step-000000000001");
        std::fs::create_dir(&inner).unwrap();
        let opened = Location::open(inner.to_str().unwrap()).unwrap();
        let parent = opened.parent().unwrap();
        assert_eq!(parent.local_dir().unwrap(), std::fs::canonicalize(dir.path()).unwrap());
        assert_eq!(parent.prefix().parts().count(), 0);
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
