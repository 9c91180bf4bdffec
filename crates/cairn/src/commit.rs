//! The commit protocol, the one place every writer (a save, a multi-rank save, a copy, a
//! bundle import) and every deleter goes through:
//!
//! - a checkpoint folder is committed if and only if its `manifest.json` exists
//!   ([`is_committed`]);
//! - the commit creates the manifest only if absent ([`create_manifest`]); after any
//!   failure it reads the manifest back: one carrying this save's id is this save's own
//!   commit whose acknowledgement was lost, another's is a conflict (*already exists*), and
//!   none at all means the write did not land, so it is tried again (create-only: it can
//!   never overwrite anyone's);
//! - deletion removes the manifest first (the checkpoint stops existing,
//!   [`remove_manifest`]), then the files Cairn writes in the folder that no committed
//!   checkpoint or save in flight still refers to ([`remove_written_files`], called by
//!   `Run::delete`); a user's own files stay.
//!
//! docs/format.md ("Commit protocol") states the same contract for other implementations.

use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::{Error, ErrorKind, Result};
use crate::format::layout::{self, MANIFEST_FILE};
use crate::format::manifest::Manifest;
use crate::store::Location;

/// Whether the checkpoint folder `dest` holds a manifest now.
pub(crate) async fn is_committed(dest: &Location) -> Result<bool> {
    match dest.store().head(&dest.path(MANIFEST_FILE)).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(Error::from_store(e, "checking for a committed checkpoint", &format!("dir=`{}`", dest.uri()))),
    }
}

/// Create-only commit attempts when the store fails and the manifest is provably absent
/// (a connection reset mid-PUT), or could not be read back to tell: another create-only
/// attempt cannot overwrite anyone's, and is followed by another read-back.
const COMMIT_ATTEMPTS: u32 = 10;

/// The commit: creates `manifest.json` only if absent. After any failure the manifest is
/// read back: one carrying this save's id is our own commit whose acknowledgement was
/// lost (not a conflict); none at all means the write did not land; a read-back that
/// fails tells nothing. In the last two cases the commit is tried again (up to
/// [`COMMIT_ATTEMPTS`] times, with backoff), so that a save whose commit landed is not
/// reported failed because one read failed.
pub(crate) async fn create_manifest(dest: &Location, manifest: &Manifest, step: u64) -> Result<()> {
    let manifest_uri = format!("{}/{MANIFEST_FILE}", dest.uri());
    // The writer holds itself to the reader's rules: what commits can be read back.
    manifest.validate(&manifest_uri).map_err(|e| {
        Error::invalid(format!("{} (a reader would refuse this manifest; nothing was committed)", e.message()))
    })?;
    let payload = PutPayload::from(manifest.encode()?);
    let mut attempt = 1;
    loop {
        let put = PutOptions { mode: PutMode::Create, ..Default::default() };
        let failure = match dest.store().put_opts(&dest.path(MANIFEST_FILE), payload.clone(), put).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        // Whatever the error, the write may have landed (a lost acknowledgement): look.
        match (manifest_owner(dest, &manifest.save_id).await, failure) {
            (Owner::Us, _) => return Ok(()),
            (Owner::Other, object_store::Error::AlreadyExists { .. }) => return Err(already_committed(step, dest)),
            (Owner::Unknown(_), _) if attempt < COMMIT_ATTEMPTS => {
                tokio::time::sleep(std::time::Duration::from_millis(100 << attempt.min(5))).await;
                attempt += 1;
            }
            (Owner::Unknown(_), object_store::Error::AlreadyExists { .. }) => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "commit conflicted but the manifest could not be read back to tell whose it is file=`{manifest_uri}`"
                    ),
                ))
            }
            // The name is taken by something that is not a manifest (a folder, say).
            (Owner::Nobody, object_store::Error::AlreadyExists { .. }) => {
                return Err(Error::corrupt(format!(
                    "something that is not a manifest is in the way of the commit file=`{manifest_uri}`"
                )))
            }
            (Owner::Nobody, _) if attempt < COMMIT_ATTEMPTS => {
                tokio::time::sleep(std::time::Duration::from_millis(100 << attempt.min(5))).await;
                attempt += 1;
            }
            (_, other) => {
                return Err(Error::from_store(other, "committing manifest", &format!("file=`{manifest_uri}`")))
            }
        }
    }
}

pub(crate) fn already_committed(step: u64, dest: &Location) -> Error {
    Error::new(
        ErrorKind::AlreadyExists,
        format!("checkpoint already committed; nothing was overwritten step={step} dir=`{}`", dest.uri()),
    )
}

/// Who wrote the manifest of a checkpoint folder.
pub(crate) enum Owner {
    /// It carries the given save id.
    Us,
    /// It carries another (or cannot be decoded).
    Other,
    /// There is none.
    Nobody,
    /// It could not be read: why (an unreachable store, refused access, ...).
    Unknown(ErrorKind),
}

/// Who wrote the manifest of `dest`, as far as one read can tell.
pub(crate) async fn manifest_owner(dest: &Location, save_id: &str) -> Owner {
    let got = match dest.store().get(&dest.path(MANIFEST_FILE)).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Owner::Nobody,
        Err(e) => return Owner::Unknown(Error::from_store(e, "reading manifest", "").kind()),
    };
    match got.bytes().await {
        Ok(bytes) if Manifest::decode(&bytes, MANIFEST_FILE).is_ok_and(|m| m.save_id == save_id) => Owner::Us,
        Ok(_) => Owner::Other,
        Err(e) => Owner::Unknown(Error::from_store(e, "reading manifest", "").kind()),
    }
}

/// Removes the manifest of the checkpoint folder `dir`: the checkpoint stops existing.
/// The first step of every deletion; a missing manifest is not an error.
pub(crate) async fn remove_manifest(dir: &Location) -> Result<()> {
    match dir.store().delete(&dir.path(MANIFEST_FILE)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::from_store(e, "deleting manifest", &format!("checkpoint=`{}`", dir.uri()))),
    }
}

/// Removes the files Cairn writes in the folder `dir` (see [`layout::is_written_by_cairn`])
/// except those `keep` keeps (given the path inside the folder): a user's own file stays,
/// and with it the folder. Called once the manifest is gone ([`remove_manifest`]).
pub(crate) async fn remove_written_files(dir: &Location, keep: &(dyn Fn(&str) -> bool + Sync)) -> Result<()> {
    let shown = |what: &str| format!("{what}=`{}`", dir.uri());
    let objects: Vec<object_store::ObjectMeta> = dir
        .store()
        .list(Some(dir.prefix()))
        .try_collect()
        .await
        .map_err(|e| Error::from_store(e, "listing checkpoint", &shown("checkpoint")))?;
    let depth = dir.prefix().parts().count();
    let ours = objects.into_iter().filter(|meta| {
        let parts: Vec<_> = meta.location.parts().skip(depth).map(|p| p.as_ref().to_string()).collect();
        let file = parts.join("/");
        layout::is_written_by_cairn(&file) && !keep(&file)
    });
    for meta in ours {
        match dir.store().delete(&meta.location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                return Err(Error::from_store(e, "deleting checkpoint data", &format!("file=`{}`", meta.location)))
            }
        }
    }
    Ok(())
}
