//! Two tiers: a manager with a local tier saves into a fast local run, and copies the
//! checkpoints its durable policy selects into the durable run in the background (see
//! [`crate::manager::ManagerOptions::local`]). This module holds what the manager needs
//! for that: the upload of one checkpoint, and the record of uploads still owed.
//!
//! An owed upload is a marker file `.cairn-uploads/step-<n>` in the local run, written
//! durably before the local save starts and removed once the durable copy is committed
//! and verified. A restarted manager finds the markers and uploads again what the
//! previous process had not finished: a marker whose local checkpoint never committed (a
//! save killed midway) is dropped. Retention of the local tier keeps a checkpoint while
//! its marker exists. The copy itself is [`transfer::copy_checkpoint`]: data files
//! first, the manifest last, create-only, then every byte verified at the destination;
//! it resumes from the files already there, and a copy already committed by the same
//! save is accepted as done.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use crate::error::{Error, ErrorKind, Result};
use crate::format::layout;
use crate::info::CheckpointInfo;
use crate::policy::{Retention, SavePolicy};
use crate::progress::Stage;
use crate::run::Run;
use crate::runtime::block_on;
use crate::save::put_file;
use crate::store::Location;
use crate::telemetry::{Event, Operation, Phase, Tier};
use crate::transfer;

/// Folder of a local run that holds the markers of uploads still owed.
pub const UPLOADS_DIR: &str = ".cairn-uploads";

/// How long a preempted manager goes on uploading after its preemption save, by default.
pub const DEFAULT_UPLOAD_GRACE: Duration = Duration::from_secs(30);

/// The fast tier of a two-tier manager.
#[derive(Clone)]
pub struct LocalTier {
    /// The local run saves go to first.
    pub run: Run,
    /// When to save locally (the manager's own policy says which of these saves, and
    /// which further steps, also go to the durable run).
    pub policy: SavePolicy,
    /// What to keep locally; a checkpoint whose upload is still owed is always kept.
    pub retention: Retention,
    /// After a preemption save, how long uploads go on before the manager returns (what
    /// is left is uploaded by the next manager opened on the same local run).
    pub upload_grace: Duration,
}

impl LocalTier {
    /// A local tier on `run` saving by `policy`, keeping `retention`.
    pub fn new(run: Run, policy: SavePolicy, retention: Retention) -> LocalTier {
        LocalTier { run, policy, retention, upload_grace: DEFAULT_UPLOAD_GRACE }
    }

    /// Sets the preemption grace for uploads.
    pub fn with_upload_grace(mut self, grace: Duration) -> LocalTier {
        self.upload_grace = grace;
        self
    }
}

fn markers(local: &Run) -> Location {
    local.location().child(UPLOADS_DIR)
}

/// Records durably that `step` is owed to the durable tier.
pub(crate) fn mark(local: &Run, step: u64) -> Result<()> {
    block_on(put_file(&markers(local), &layout::step_dir(step), vec![bytes::Bytes::new()], None))
}

/// Forgets that `step` is owed (it was uploaded, or will never be).
pub(crate) fn unmark(local: &Run, step: u64) -> Result<()> {
    let loc = markers(local);
    let name = layout::step_dir(step);
    block_on(async {
        match loc.store().delete(&loc.path(&name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::from_store(e, "removing upload marker", &format!("file=`{}/{name}`", loc.uri()))),
        }
    })
}

/// The steps owed to the durable tier, as the markers in `local` say (names that are not
/// markers are ignored).
pub(crate) fn marked(local: &Run) -> Result<BTreeSet<u64>> {
    let loc = markers(local);
    let listed: Vec<object_store::ObjectMeta> = block_on(async {
        loc.store()
            .list(Some(loc.prefix()))
            .try_collect()
            .await
            .map_err(|e| Error::from_store(e, "listing upload markers", &format!("dir=`{}`", loc.uri())))
    })?;
    Ok(listed.iter().filter_map(|m| m.location.filename().and_then(layout::parse_step_dir)).collect())
}

/// Copies the committed checkpoint of `step` from `local` to `durable` and verifies it
/// there; returns what was committed, and the event that reports it.
pub(crate) fn upload(local: &Run, durable: &Run, step: u64) -> (Result<CheckpointInfo>, Event) {
    let dst = durable.step_location(step);
    let started = Instant::now();
    // When the last bytes were copied (verifying follows), and how many.
    let copied: Mutex<(Duration, u64)> = Mutex::new((Duration::ZERO, 0));
    let progress = |stage: Stage, bytes: u64| {
        if stage == Stage::Copying {
            let mut copied = copied.lock().unwrap_or_else(|p| p.into_inner());
            *copied = (started.elapsed(), copied.1 + bytes);
        }
    };
    let outcome = local.checkpoint(step).and_then(|src| transfer::copy_checkpoint(&src, &dst, &progress));
    let total = started.elapsed();
    let (copying, bytes) = copied.into_inner().unwrap_or_else(|p| p.into_inner());
    let event = Event::new(Operation::Upload, Tier::Durable, step, dst.uri())
        .with_phase(Phase::Upload, copying)
        .with_phase(Phase::Verify, total.saturating_sub(copying))
        .with_bytes(bytes)
        .with_outcome(&outcome);
    (outcome, event)
}

/// Whether an upload that failed this way can never succeed from this local copy (it is
/// gone or damaged, or the durable run holds another save's checkpoint of the step), so
/// that its marker is dropped instead of kept for a later try.
pub(crate) fn hopeless(err: &Error) -> bool {
    matches!(err.kind(), ErrorKind::NotFound | ErrorKind::Corrupt | ErrorKind::AlreadyExists | ErrorKind::Incompatible)
}
