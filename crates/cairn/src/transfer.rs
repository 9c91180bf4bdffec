//! Moving checkpoints: copy a checkpoint or a whole run between any two stores (verified
//! at the destination, resumable), pack a checkpoint into one self-contained byte bundle
//! and back, and materialize any checkpoint as a local read-only directory (cached).
//!
//! Every copy follows the commit protocol: data files first, the manifest last with a
//! create-only write, so an interrupted copy is invisible and can simply be run again.

use std::io::Read;
use std::path::PathBuf;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use crate::commit::{self, Owner};
use crate::error::{escape_control, Error, ErrorKind, Result, Untrusted};
use crate::format::layout::{self, MANIFEST_FILE};
use crate::format::manifest::{Manifest, MAX_MANIFEST_BYTES};
use crate::info::CheckpointInfo;
use crate::load::Checkpoint;
use crate::progress::{Progress, Stage};
use crate::run::Run;
use crate::runtime::block_on;
use crate::save::{put_file, DEFAULT_MULTIPART_BYTES, DEFAULT_PART_BYTES};
use crate::store::Location;

/// Copies `src` into the checkpoint folder `dst` and verifies every byte there. The copy
/// stands alone: data `src` refers to in other checkpoints of its run (an incremental
/// save's) is copied into the copy's own folder.
///
/// Resumable: data files already present at `dst` with the right size are kept, and a
/// destination already committed by the same save (same `save_id`) is accepted as done.
/// A destination committed by another save is [`ErrorKind::AlreadyExists`].
///
/// `progress` is told the bytes of the data files as they are copied
/// ([`Stage::Copying`]; files already at the destination count at once), then as they
/// are verified there ([`Stage::Verifying`]); pass [`crate::progress::quiet`] to ignore.
pub fn copy_checkpoint(src: &Checkpoint, dst: &Location, progress: Progress<'_>) -> Result<CheckpointInfo> {
    block_on(copy_async(src, dst, progress))
}

async fn copy_async(src: &Checkpoint, dst: &Location, progress: Progress<'_>) -> Result<CheckpointInfo> {
    let manifest = &src.manifest().standalone()?;
    let copied_before = match commit::manifest_owner(dst, &manifest.save_id).await {
        Owner::Us => true,
        Owner::Nobody => false,
        Owner::Other => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("destination holds another checkpoint dir=`{}`", dst.uri()),
            ))
        }
        Owner::Unknown(kind) => {
            return Err(Error::new(
                kind,
                format!("cannot read the destination's manifest to tell whose it is dir=`{}`", dst.uri()),
            ))
        }
    };
    if !copied_before {
        for (file, record) in &src.manifest().files {
            let (folder, inner) = src.data_file(file)?;
            let present = dst.store().head(&dst.path(&inner)).await.is_ok_and(|m| m.size == record.size);
            if present {
                progress(Stage::Copying, record.size);
                continue;
            }
            let data = read_whole(&folder, &inner, record.size, &|n| progress(Stage::Copying, n)).await?;
            let part =
                (dst.local_dir().is_none() && record.size >= DEFAULT_MULTIPART_BYTES).then_some(DEFAULT_PART_BYTES);
            put_file(dst, &inner, vec![data], part).await?;
        }
        commit::create_manifest(dst, manifest, manifest.step).await?;
    } else {
        progress(Stage::Copying, manifest.files.values().map(|f| f.size).sum());
    }
    let copied = Checkpoint::open_async(dst.clone()).await?;
    let problems = copied.verify_async_with(progress).await?;
    if let Some(first) = problems.into_iter().next() {
        return Err(Error::corrupt(format!("copy failed verification at the destination: {}", first.message())));
    }
    Ok(copied.info())
}

/// The whole data file `file` of `size` bytes (as the manifest says), telling `read`
/// the bytes as they arrive (a local file's all at once).
async fn read_whole(loc: &Location, file: &str, size: u64, read: &(dyn Fn(u64) + Sync)) -> Result<Bytes> {
    let shown = format!("file=`{}/{file}`", loc.uri());
    let got = loc.store().get(&loc.path(file)).await.map_err(|e| Error::from_store(e, "reading", &shown))?;
    if got.meta.size != size {
        return Err(Error::corrupt(format!("data file has {} bytes, manifest says {size} {shown}", got.meta.size)));
    }
    if loc.local_dir().is_some() {
        // One read of the whole file: a local file's stream comes in 8 KiB chunks, each
        // read on the blocking pool, and would then be joined by a second copy.
        let data = got.bytes().await.map_err(|e| Error::from_store(e, "reading", &shown))?;
        read(data.len() as u64);
        return Ok(data);
    }
    let mut body = got.into_stream();
    let mut chunks = Vec::new();
    while let Some(chunk) = body.try_next().await.map_err(|e| Error::from_store(e, "reading", &shown))? {
        read(chunk.len() as u64);
        chunks.push(chunk);
    }
    if chunks.len() == 1 {
        return Ok(chunks.pop().unwrap_or_default());
    }
    Ok(Bytes::from(chunks.concat()))
}

/// Copies every committed checkpoint of `src` into `dst` (same step folders), each
/// verified; returns what was copied. Re-running after an interruption resumes.
/// `progress` as for [`copy_checkpoint`], over all of them.
pub fn copy_run(src: &Run, dst: &Run, progress: Progress<'_>) -> Result<Vec<CheckpointInfo>> {
    src.list()?.iter().map(|c| copy_checkpoint(&c.open()?, &dst.step_location(c.step), progress)).collect()
}

/// Packs a checkpoint into one self-contained byte bundle (a tar archive of its folder,
/// manifest last; data it refers to in other checkpoints included, as by
/// [`copy_checkpoint`]), e.g. to send it over the wire or keep it in a database.
pub fn to_bytes(src: &Checkpoint) -> Result<Vec<u8>> {
    block_on(async {
        let standalone = src.manifest().standalone()?;
        let mut archive = tar::Builder::new(Vec::new());
        for (file, record) in &src.manifest().files {
            let (folder, inner) = src.data_file(file)?;
            let data = read_whole(&folder, &inner, record.size, &|_| {}).await?;
            append(&mut archive, &inner, &data)?;
        }
        append(&mut archive, MANIFEST_FILE, &standalone.encode()?)?;
        archive.into_inner().map_err(|e| Error::invalid("cannot finish bundle").with_source(e))
    })
}

fn append(archive: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    archive
        .append_data(&mut header, name, data)
        .map_err(|e| Error::invalid(format!("cannot add to bundle entry=`{name}`")).with_source(e))
}

/// Longest entry name shown in an error (longer ones are never valid shard names).
const MAX_SHOWN_NAME: usize = 256;

/// Unpacks a bundle made by [`to_bytes`] into the checkpoint folder `dst`, commits it and
/// verifies it. The bundle is untrusted: only `manifest.json` and valid shard names are
/// accepted, and every byte is checked against the manifest.
pub fn from_bytes(bundle: &[u8], dst: &Location) -> Result<CheckpointInfo> {
    let mut manifest_bytes = None;
    let mut files: Vec<(String, Bytes)> = Vec::new();
    let mut archive = tar::Archive::new(bundle);
    let entries =
        archive.entries().map_err(|e| Error::corrupt("bundle is not a cairn bundle").with_source(Untrusted::of(&e)))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::corrupt("bundle is damaged").with_source(Untrusted::of(&e)))?;
        let name = entry
            .path()
            .map_err(|e| Error::corrupt("bundle entry has an invalid name").with_source(Untrusted::of(&e)))?
            .to_string_lossy()
            .chars()
            .take(MAX_SHOWN_NAME)
            .collect::<String>();
        let name = escape_control(&name).into_owned();
        let size = entry.size();
        if size > bundle.len() as u64 {
            return Err(Error::corrupt(format!("bundle entry claims {size} bytes entry=`{name}`")));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut data).map_err(|e| {
            Error::corrupt(format!("bundle entry is truncated entry=`{name}`")).with_source(Untrusted::of(&e))
        })?;
        if name == MANIFEST_FILE {
            if size > MAX_MANIFEST_BYTES {
                return Err(Error::corrupt("bundle manifest exceeds the size limit"));
            }
            manifest_bytes = Some(data);
        } else if layout::is_valid_shard_file(&name) {
            files.push((name, Bytes::from(data)));
        } else {
            return Err(Error::corrupt(format!("unexpected entry in bundle entry=`{name}`")));
        }
    }
    let manifest_bytes = manifest_bytes.ok_or_else(|| Error::corrupt("bundle has no manifest.json"))?;
    let manifest = Manifest::decode(&manifest_bytes, "bundle:manifest.json")?;
    if manifest.has_references() {
        // A bundle stands alone (`to_bytes` writes no reference): one that refers to the
        // destination's neighbours would read, and keep alive, data that is not its own.
        return Err(Error::corrupt("bundle manifest refers to other checkpoints' files"));
    }
    block_on(async {
        if commit::is_committed(dst).await? {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("destination already committed dir=`{}`", dst.uri()),
            ));
        }
        for (name, data) in files {
            if !manifest.files.contains_key(&name) {
                return Err(Error::corrupt(format!("bundle holds a file its manifest does not list entry=`{name}`")));
            }
            put_file(dst, &name, vec![data], None).await?;
        }
        commit::create_manifest(dst, &manifest, manifest.step).await?;
        let copied = Checkpoint::open_async(dst.clone()).await?;
        if let Some(first) = copied.verify_async().await?.into_iter().next() {
            return Err(first);
        }
        Ok(copied.info())
    })
}

/// A local directory holding the checkpoint at `location` (a checkpoint folder, or a
/// run's latest): the checkpoint's own folder when it is on local disk, else a copy
/// downloaded once into `cache_dir` (keyed by save id). Safe when several processes ask
/// at once: each downloads into a private folder and renames it into place; the first
/// rename wins and the others use it.
pub fn as_directory(location: Location, cache_dir: &std::path::Path) -> Result<PathBuf> {
    let ckpt = crate::open_at(location)?;
    // A local checkpoint is handed out as it is, unless it refers to other folders.
    let own_folder = (ckpt.location().local_dir(), ckpt.location().local_root(), ckpt.manifest().has_references());
    if let (Some(dir), Some(root), false) = own_folder {
        // The caller reads this folder with its own tools, which follow symlinks: hand it
        // out only if every data file is a regular file inside it.
        for file in ckpt.manifest().files.keys() {
            let shown = format!("file=`{}/{file}`", ckpt.location().uri());
            root.open_regular(&ckpt.location().path(file))
                .map_err(|e| Error::from_io(e, "checking data file", &shown))?;
        }
        return Ok(dir.to_path_buf());
    }
    let target = cache_dir.join(&ckpt.manifest().save_id);
    if target.join(MANIFEST_FILE).is_file() {
        return Ok(target);
    }
    let staging = cache_dir.join(format!(".partial-{}", uuid::Uuid::new_v4().simple()));
    let staging_uri = staging.to_str().ok_or_else(|| Error::invalid("cache directory is not valid utf-8"))?;
    copy_checkpoint(&ckpt, &Location::create(staging_uri)?, &crate::progress::quiet)?;
    match std::fs::rename(&staging, &target) {
        Ok(()) => Ok(target),
        Err(_) if target.join(MANIFEST_FILE).is_file() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(target)
        }
        Err(e) => Err(Error::new(
            ErrorKind::Unavailable,
            format!("cannot place cached checkpoint dir=`{}`", target.display()),
        )
        .with_source(e)),
    }
}
