//! The local-disk store: object_store's `LocalFileSystem`, confined to the folder it was
//! opened on (a run, or a checkpoint named directly).
//!
//! That folder is resolved once, when it is opened, so a run may itself be a symlink (onto
//! a bigger disk, say). Below it nothing is followed, so nothing outside it is ever read,
//! listed, written or deleted:
//! - a file is opened component by component from the root (`openat` with `O_NOFOLLOW`),
//!   and only a regular file is read; it is opened non-blocking, so a FIFO never hangs;
//! - listing never descends into a symlink and skips whatever is not a regular file or a
//!   folder, and names that are not UTF-8 or not valid store paths (they are not Cairn's);
//! - deletion opens the parent folders the same way and unlinks inside the last one, then
//!   syncs it (a deleted manifest stays deleted before its data goes), then removes the
//!   folders it emptied, never the root;
//! - a write first checks that no existing folder on its path is a symlink, then hands
//!   over to `LocalFileSystem` (fsync on).
//!
//! A symlinked step folder or `shards` folder is therefore not part of the run: listing
//! skips it, retention and prune leave it alone, reading through it is refused. Reads and
//! deletes check and act on the same open folders; a write's check could be raced by a
//! concurrent process replacing a folder inside the run, a symlink left in a run cannot.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// Deepest folder nesting listed below the root; deeper folders are not Cairn's.
const MAX_LIST_DEPTH: usize = 16;

/// Why the local store refused a path (classified as corrupt: the run holds something
/// Cairn never writes).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// A component of the path is a symlink.
    #[error("symlink inside the run is not followed path=`{0}`")]
    Symlink(String),
    /// The path is a FIFO, socket or device, not a regular file.
    #[error("not a regular file path=`{0}`")]
    NotRegular(String),
}

/// `LocalFileSystem` rooted at `root`, never following a symlink below it.
#[derive(Debug)]
pub(crate) struct LocalStore {
    root: Arc<Root>,
    inner: LocalFileSystem,
}

/// The confined folder; what blocking tasks take with them.
#[derive(Debug)]
pub(crate) struct Root(PathBuf);

impl fmt::Display for LocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalStore({})", self.root.0.display())
    }
}

impl LocalStore {
    /// The store of the existing, canonical folder `root`.
    pub(crate) fn new(root: PathBuf) -> Result<LocalStore> {
        let inner = LocalFileSystem::new_with_prefix(&root)?.with_fsync(true).with_automatic_cleanup(true);
        Ok(LocalStore { root: Arc::new(Root(root)), inner })
    }

    /// The confined folder.
    pub(crate) fn root(&self) -> &Arc<Root> {
        &self.root
    }

    /// Checks the folders on the way to the file `location` (see [`Root::check_folder`]).
    fn check(&self, location: &Path) -> Result<()> {
        let parts = components(location);
        let dirs = parts.split_last().map_or(&[][..], |(_, dirs)| dirs);
        self.root.check_dirs(dirs, location).map_err(|e| store_error(e, location))
    }
}

impl Root {
    /// Opens the regular file at `location` for reading without following any symlink
    /// below the root and without blocking on special files.
    pub(crate) fn open_regular(&self, location: &Path) -> io::Result<File> {
        let parts = components(location);
        let Some((name, dirs)) = parts.split_last() else {
            return Err(io::Error::new(io::ErrorKind::NotFound, "the root is not a file"));
        };
        let chain = self.open_dirs(dirs, location)?;
        let parent = &chain[chain.len() - 1];
        // Look before opening: opening a device or FIFO can have effects of its own.
        if let Some(mode) = stat_at(parent, name)? {
            if mode != libc::S_IFREG && mode != libc::S_IFDIR && mode != libc::S_IFLNK {
                return Err(io::Error::other(Refused::NotRegular(location.to_string())));
            }
        }
        let fd = openat(parent, name, libc::O_RDONLY | libc::O_NONBLOCK, location)?;
        let file = File::from(fd);
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("is a folder path=`{location}`")));
        }
        if !meta.is_file() {
            return Err(io::Error::other(Refused::NotRegular(location.to_string())));
        }
        Ok(file)
    }

    /// Checks that no existing component of the folder `folder` is a symlink (missing
    /// ones are fine: a write creates them).
    pub(crate) fn check_folder(&self, folder: &Path) -> io::Result<()> {
        self.check_dirs(&components(folder), folder)
    }

    fn check_dirs(&self, dirs: &[&str], location: &Path) -> io::Result<()> {
        match self.open_dirs(dirs, location) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map(drop),
        }
    }

    /// Opens the root, then each of `dirs` inside the previous one, refusing symlinks.
    /// Returns every opened folder, the root first.
    fn open_dirs(&self, dirs: &[&str], location: &Path) -> io::Result<Vec<OwnedFd>> {
        let mut chain = vec![OwnedFd::from(File::open(&self.0)?)];
        for dir in dirs {
            let next = openat(&chain[chain.len() - 1], dir, libc::O_RDONLY | libc::O_DIRECTORY, location)?;
            chain.push(next);
        }
        Ok(chain)
    }

    /// Removes the folder `folder` if it holds nothing but (nested) empty folders and was
    /// last changed at least `min_age` ago; returns whether it did. Nothing is followed:
    /// each folder is opened inside its parent with `O_NOFOLLOW` and removed from it.
    pub(crate) fn remove_empty_folder(&self, folder: &Path, min_age: std::time::Duration) -> io::Result<bool> {
        let parts = components(folder);
        let Some((name, dirs)) = parts.split_last() else { return Ok(false) };
        let chain = self.open_dirs(dirs, folder)?;
        let parent = &chain[chain.len() - 1];
        let target = openat(parent, name, libc::O_RDONLY | libc::O_DIRECTORY, folder)?;
        let changed = File::from(target).metadata()?.modified()?;
        if changed.elapsed().unwrap_or_default() < min_age {
            return Ok(false);
        }
        remove_if_empty(parent, name, &self.0.join(folder.as_ref()), folder, 0)
    }

    fn get_blocking(&self, location: &Path, options: &GetOptions) -> Result<GetResult> {
        let file = self.open_regular(location).map_err(|e| store_error(e, location))?;
        let meta = object_meta(&file.metadata().map_err(|e| store_error(e, location))?, location.clone());
        options.check_preconditions(&meta)?;
        let range = match &options.range {
            Some(r) => r.as_range(meta.size).map_err(|e| generic(e.into()))?,
            None => 0..meta.size,
        };
        let path = self.0.join(location.as_ref());
        Ok(GetResult {
            payload: GetResultPayload::File(file, path),
            meta,
            range,
            attributes: Default::default(),
            extensions: Default::default(),
        })
    }

    fn get_ranges_blocking(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let file = self.open_regular(location).map_err(|e| store_error(e, location))?;
        let size = file.metadata().map_err(|e| store_error(e, location))?.len();
        ranges
            .iter()
            .map(|r| {
                if r.start > r.end || r.end > size {
                    return Err(generic(format!("range {r:?} outside a {size}-byte file path=`{location}`").into()));
                }
                let mut buf = vec![0u8; (r.end - r.start) as usize];
                file.read_exact_at(&mut buf, r.start).map_err(|e| store_error(e, location))?;
                Ok(Bytes::from(buf))
            })
            .collect()
    }

    fn delete_blocking(&self, location: &Path) -> Result<()> {
        let parts = components(location);
        let Some((name, dirs)) = parts.split_last() else {
            return Err(generic("cannot delete the store's root".into()));
        };
        let chain = self.open_dirs(dirs, location).map_err(|e| store_error(e, location))?;
        let parent = &chain[chain.len() - 1];
        let cname = c_name(name).map_err(|e| store_error(e, location))?;
        // SAFETY: `parent` is an open folder and `cname` a NUL-terminated name.
        if unsafe { libc::unlinkat(parent.as_raw_fd(), cname.as_ptr(), 0) } != 0 {
            return Err(store_error(io::Error::last_os_error(), location));
        }
        File::from(parent.try_clone().map_err(|e| store_error(e, location))?)
            .sync_all()
            .map_err(|e| store_error(e, location))?;
        // Remove the folders this left empty, deepest first; stop at the first that is not.
        for depth in (1..chain.len()).rev() {
            let Ok(dir) = c_name(dirs[depth - 1]) else { break };
            // SAFETY: `chain[depth - 1]` is an open folder and `dir` a NUL-terminated name.
            if unsafe { libc::unlinkat(chain[depth - 1].as_raw_fd(), dir.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
                break;
            }
        }
        Ok(())
    }

    /// Every regular file below `prefix`, without following symlinks. An entry that
    /// vanishes while it is listed is skipped; any other failure to read one is an error
    /// (a silently missing manifest would make a committed checkpoint look unfinished).
    fn list_blocking(&self, prefix: &Path) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let Some(start) = self.real_dir(prefix).map_err(|e| store_error(e, prefix))? else { return Ok(out) };
        let mut pending = vec![(start, prefix.clone(), 0usize)];
        while let Some((dir, location, depth)) = pending.pop() {
            let listed = match read_folder(&dir, &location) {
                Ok(listed) => listed,
                // A folder below the start removed while listing (a deletion emptied it).
                Err(e) if e.kind() == io::ErrorKind::NotFound && depth > 0 => continue,
                Err(e) => return Err(store_error(e, &location)),
            };
            for listed in listed {
                match listed {
                    Listed::Folder(path, child) if depth < MAX_LIST_DEPTH => pending.push((path, child, depth + 1)),
                    Listed::Folder(..) => {}
                    Listed::File(meta) => out.push(meta),
                }
            }
        }
        Ok(out)
    }

    /// The files and folders directly below `prefix`, without following symlinks.
    fn list_one_level(&self, prefix: &Path) -> Result<ListResult> {
        let mut result =
            ListResult { common_prefixes: Vec::new(), objects: Vec::new(), extensions: Default::default() };
        let Some(dir) = self.real_dir(prefix).map_err(|e| store_error(e, prefix))? else { return Ok(result) };
        for listed in read_folder(&dir, prefix).map_err(|e| store_error(e, prefix))? {
            match listed {
                Listed::Folder(_, child) => result.common_prefixes.push(child),
                Listed::File(meta) => result.objects.push(meta),
            }
        }
        Ok(result)
    }

    /// The filesystem folder of `prefix` if every component is a real folder (opened
    /// without following symlinks); `None` if one is missing or is not a folder.
    fn real_dir(&self, prefix: &Path) -> io::Result<Option<PathBuf>> {
        match self.open_dirs(&components(prefix), prefix) {
            Ok(_) => Ok(Some(self.0.join(prefix.as_ref()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound || refused(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// An entry of a listed folder that the store shows.
enum Listed {
    /// A real folder (not a symlink): its filesystem path and store path.
    Folder(PathBuf, Path),
    /// A regular file.
    File(ObjectMeta),
}

/// The folders and regular files directly in `dir` (store path `location`): symlinks,
/// special files and names that are not valid store paths are not the store's and are
/// skipped, as are entries removed while listing.
fn read_folder(dir: &std::path::Path, location: &Path) -> io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let Some(child) = child_path(location, &entry.file_name()) else { continue };
        let kind = match entry.file_type() {
            Ok(kind) => kind,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if kind.is_dir() {
            out.push(Listed::Folder(entry.path(), child));
        } else if kind.is_file() {
            match entry.metadata() {
                Ok(meta) => out.push(Listed::File(object_meta(&meta, child))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

/// Whether `err` is the local store refusing a path (a symlink or special file).
fn refused(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<Refused>())
}

/// Removes the folder `name` inside `parent` if it holds only empty folders (removed
/// first); whether it did. Never follows a symlink; stops below [`MAX_LIST_DEPTH`].
fn remove_if_empty(
    parent: &OwnedFd,
    name: &str,
    folder_path: &std::path::Path,
    location: &Path,
    depth: usize,
) -> io::Result<bool> {
    if depth > MAX_LIST_DEPTH {
        return Ok(false);
    }
    let dir = openat(parent, name, libc::O_RDONLY | libc::O_DIRECTORY, location)?;
    // What the folder holds is read by path; what is removed is removed through the open
    // folders (`unlinkat`), which only ever removes an empty folder inside the run.
    for entry in std::fs::read_dir(folder_path)? {
        let entry = entry?;
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let Some(child) = entry.file_name().to_str().map(str::to_string) else { return Ok(false) };
        if !is_dir || !remove_if_empty(&dir, &child, &entry.path(), location, depth + 1)? {
            return Ok(false);
        }
    }
    let cname = c_name(name)?;
    // SAFETY: `parent` is an open folder and `cname` a NUL-terminated name.
    Ok(unsafe { libc::unlinkat(parent.as_raw_fd(), cname.as_ptr(), libc::AT_REMOVEDIR) } == 0)
}

/// Opens `name` inside the folder `dir` with `flags`, never following a symlink.
fn openat(dir: &OwnedFd, name: &str, flags: libc::c_int, location: &Path) -> io::Result<OwnedFd> {
    let cname = c_name(name)?;
    // SAFETY: `dir` is an open folder and `cname` a NUL-terminated name; the returned fd
    // is owned by the `OwnedFd` below.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), cname.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: `fd` was just opened and is owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::NotFound {
        return Err(err);
    }
    match stat_at(dir, name)? {
        Some(libc::S_IFLNK) => Err(io::Error::other(Refused::Symlink(location.to_string()))),
        // A file or special file where a folder belongs: not a layout Cairn writes.
        Some(mode) if flags & libc::O_DIRECTORY != 0 && mode != libc::S_IFDIR => {
            Err(io::Error::other(Refused::NotRegular(location.to_string())))
        }
        _ => Err(err),
    }
}

/// The file type bits (`S_IFREG`, `S_IFDIR`, `S_IFLNK`, ...) of `name` inside `dir`,
/// without following a symlink; `None` if there is no such entry.
fn stat_at(dir: &OwnedFd, name: &str) -> io::Result<Option<libc::mode_t>> {
    let cname = c_name(name)?;
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `dir` is an open folder, `cname` a NUL-terminated name, and `stat` is
    // written by the call when it succeeds.
    if unsafe { libc::fstatat(dir.as_raw_fd(), cname.as_ptr(), stat.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::NotFound { Ok(None) } else { Err(err) };
    }
    // SAFETY: fstatat succeeded, so `stat` is initialised.
    Ok(Some(unsafe { stat.assume_init() }.st_mode & libc::S_IFMT))
}

/// The names along `location`, root first.
fn components(location: &Path) -> Vec<&str> {
    location.as_ref().split('/').filter(|part| !part.is_empty()).collect()
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a file name"))
}

/// The store path of the entry `name` below `parent`, if `name` is UTF-8 and a valid path
/// segment as it stands (nothing to encode).
fn child_path(parent: &Path, name: &std::ffi::OsStr) -> Option<Path> {
    let name = name.to_str()?;
    let alone = Path::parse(name).ok()?;
    if alone.parts().count() != 1 || alone.as_ref() != name {
        return None;
    }
    // Parsed, not joined: `join` would percent-encode a `#` and name another file.
    match parent.as_ref() {
        "" => Some(alone),
        dir => Path::parse(format!("{dir}/{name}")).ok(),
    }
}

fn object_meta(meta: &std::fs::Metadata, location: Path) -> ObjectMeta {
    let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
    let last_modified =
        chrono::DateTime::from_timestamp(modified.as_secs() as i64, modified.subsec_nanos()).unwrap_or_default();
    let e_tag = format!("\"{:x}-{:x}-{:x}\"", meta.ino(), modified.as_micros(), meta.len());
    ObjectMeta { location, last_modified, size: meta.len(), e_tag: Some(e_tag), version: None }
}

fn generic(source: Box<dyn std::error::Error + Send + Sync>) -> object_store::Error {
    object_store::Error::Generic { store: "LocalStore", source }
}

/// Classifies a filesystem failure on `location` as object_store does.
fn store_error(err: io::Error, location: &Path) -> object_store::Error {
    let path = location.to_string();
    match err.kind() {
        io::ErrorKind::NotFound => object_store::Error::NotFound { path, source: Box::new(err) },
        io::ErrorKind::AlreadyExists => object_store::Error::AlreadyExists { path, source: Box::new(err) },
        io::ErrorKind::PermissionDenied => object_store::Error::PermissionDenied { path, source: Box::new(err) },
        _ => generic(Box::new(err)),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|source| object_store::Error::JoinError { source })?
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.check(location)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.check(location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let (root, location) = (self.root.clone(), location.clone());
        blocking(move || root.get_blocking(&location, &options)).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let (root, location, ranges) = (self.root.clone(), location.clone(), ranges.to_vec());
        blocking(move || root.get_ranges_blocking(&location, &ranges)).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        let root = self.root.clone();
        locations
            .map(move |location| {
                let root = root.clone();
                async move {
                    let location = location?;
                    let deleted = location.clone();
                    blocking(move || root.delete_blocking(&deleted)).await?;
                    Ok(location)
                }
            })
            .buffered(10)
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let (root, prefix) = (self.root.clone(), prefix.cloned().unwrap_or_default());
        stream::once(blocking(move || root.list_blocking(&prefix)))
            .flat_map(|listed| match listed {
                Ok(metas) => stream::iter(metas.into_iter().map(Ok)).boxed(),
                Err(e) => stream::once(async move { Err(e) }).boxed(),
            })
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let (root, prefix) = (self.root.clone(), prefix.cloned().unwrap_or_default());
        blocking(move || root.list_one_level(&prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.check(from)?;
        self.check(to)?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.check(from)?;
        self.check(to)?;
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;

    #[test]
    fn names_that_paths_would_encode_are_listed_and_deleted_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("step")).unwrap();
        for name in ["manifest.json#7", "LATEST#3"] {
            std::fs::write(root.join("step").join(name), b"x").unwrap();
        }
        let store = LocalStore::new(root.clone()).unwrap();
        crate::runtime::block_on(async {
            let listed: Vec<ObjectMeta> = store.list(None).try_collect().await.unwrap();
            let mut names: Vec<String> = listed.iter().map(|m| m.location.as_ref().to_string()).collect();
            names.sort();
            assert_eq!(names, ["step/LATEST#3", "step/manifest.json#7"]);
            for meta in listed {
                store.delete(&meta.location).await.unwrap();
            }
            Ok(())
        })
        .unwrap();
        assert!(!root.join("step").exists(), "emptied folder removed");
    }
}
