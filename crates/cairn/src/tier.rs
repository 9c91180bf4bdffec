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
//!
//! In a multi-rank job each rank's local tier is its own: it holds that rank's part of
//! each checkpoint ([`parts::save_part`]). An upload is then a multi-rank save into the
//! durable run ([`upload_part`]): every rank reads its part back and the ranks save
//! together, coordinated through the durable store, each box written once and rank 0
//! committing, as a save straight to the durable run would.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use crate::dist::{self, Ranks};
use crate::error::{Error, ErrorKind, Result};
use crate::format::layout;
use crate::info::CheckpointInfo;
use crate::parts;
use crate::policy::{Retention, SavePolicy};
use crate::progress::Stage;
use crate::run::{CheckpointRef, Run};
use crate::runtime::block_on;
use crate::save::{put_file, SaveOptions};
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

    /// The local tier of rank `rank` of a multi-rank job: its own run `rank-<rank>` inside
    /// this one (ranks that share the folder never touch each other's parts).
    pub fn for_rank(mut self, rank: u32) -> Result<LocalTier> {
        let own = self.run.location().child(&format!("rank-{rank:05}"));
        if let Some(dir) = own.local_dir() {
            crate::store::create_dirs_durably(dir).map_err(|e| {
                Error::from_io(e, "creating the rank's local tier", &format!("dir=`{}`", dir.display()))
            })?;
        }
        self.run = Run::at(own);
        Ok(self)
    }

    /// Sets the preemption grace for uploads.
    pub fn with_upload_grace(mut self, grace: Duration) -> LocalTier {
        self.upload_grace = grace;
        self
    }
}

/// Whether the runs `a` and `b` are one run, or one lies inside the other: the same URI,
/// or local folders that resolve (symlinks and `..` followed) to the same folder or to
/// one inside the other.
pub(crate) fn overlapping(a: &Run, b: &Run) -> bool {
    if a.location().uri() == b.location().uri() {
        return true;
    }
    let resolved = |run: &Run| {
        let dir = run.location().local_dir()?;
        Some(std::fs::canonicalize(dir).unwrap_or_else(|_| std::path::absolute(dir).unwrap_or(dir.to_path_buf())))
    };
    match (resolved(a), resolved(b)) {
        (Some(a), Some(b)) => a.starts_with(&b) || b.starts_with(&a),
        _ => false,
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

/// Uploads `step` as rank `ranks.rank` of a multi-rank job: reads this rank's part from
/// `local` and saves it into `durable` together with the other ranks' (see the module
/// docs) with `template`'s sizes, each rank checking every byte it wrote there before the
/// commit (a mismatch on any rank commits nothing). A rank whose part
/// cannot be read (gone, damaged), or that has none (`missing`: its save of that step
/// failed), takes part to fail the upload on every rank at once instead of leaving the
/// others waiting. Returns what was committed and the event that reports it.
pub(crate) fn upload_part(
    local: &Run,
    durable: &Run,
    step: u64,
    ranks: Ranks,
    template: &SaveOptions,
    missing: Option<&Error>,
) -> (Result<CheckpointInfo>, Event) {
    let started = Instant::now();
    let mut opts = SaveOptions { verify_written: true, incremental: false, snapshot_time: None, ..template.clone() }
        .with_step(step);
    let mut bytes = 0;
    let part = match missing {
        // Never saved: the step can never be uploaded, whatever the reason was.
        Some(why) => {
            Err(Error::not_found(format!("rank {} has no part of step {step}: {}", ranks.rank, why.message())))
        }
        None => local.checkpoint(step).and_then(|src| {
            let manifest = src.manifest();
            opts.temporary = manifest.temporary;
            opts.metrics = manifest.metrics.clone();
            opts.metadata = manifest.metadata.clone();
            parts::load_part(&src)
        }),
    };
    let saved = match part {
        Ok(state) => {
            bytes = state.tensors().map(|(_, t)| t.data().len() as u64).sum::<u64>()
                + state.pieces().values().flatten().map(|p| p.tensor.data().len() as u64).sum::<u64>();
            dist::save_as_rank(durable.location(), &state, &opts, ranks, None)
        }
        Err(why) => Err(dist::refuse_as_rank(durable.location(), &opts, ranks, None, &why)),
    };
    let copying = started.elapsed();
    let outcome = saved;
    let event = Event::new(Operation::Upload, Tier::Durable, step, durable.step_location(step).uri())
        .with_phase(Phase::Upload, copying)
        .with_phase(Phase::Verify, started.elapsed().saturating_sub(copying))
        .with_bytes(bytes)
        .with_outcome(&outcome);
    (outcome, event)
}

/// Whether an upload that failed this way can never succeed from this local copy (it is
/// gone or damaged, or the durable run holds another save's checkpoint of the step; with
/// several `ranks`, also when a rank's part is, as its refusal says, or when a rank never
/// showed up: its part was never saved, or it is not uploading that step), so that its
/// marker is dropped instead of kept for a later try.
pub(crate) fn hopeless(err: &Error, ranks: bool) -> bool {
    matches!(err.kind(), ErrorKind::NotFound | ErrorKind::Corrupt | ErrorKind::AlreadyExists | ErrorKind::Incompatible)
        || (ranks && dist::is_ranks_missing(err))
}

/// What one rank of a multi-rank job with local tiers can restore from, as it tells the
/// other ranks before they agree on a step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Holding {
    /// The step the rank was asked to restore (`None`: the newest).
    step: Option<u64>,
    /// Why this rank cannot restore at all (an earlier save's failure it reports).
    refused: Option<(ErrorKind, String)>,
    /// The steps of its local parts.
    local: BTreeSet<u64>,
    /// The steps it found in the durable run (`None`: it could not list them).
    durable: Option<BTreeSet<u64>>,
}

impl Holding {
    /// A rank asked to restore `step` that cannot restore, and why.
    pub(crate) fn refused(step: Option<u64>, err: &Error) -> Holding {
        Holding { step, refused: Some((err.kind(), err.full_message())), local: BTreeSet::new(), durable: None }
    }

    /// A rank asked to restore `step`, holding the committed parts `local`, finding
    /// `durable` in the durable run.
    pub(crate) fn of(step: Option<u64>, local: &[CheckpointRef], durable: Option<&[CheckpointRef]>) -> Holding {
        Holding {
            step,
            refused: None,
            local: local.iter().map(|c| c.step).collect(),
            durable: durable.map(|d| d.iter().map(|c| c.step).collect()),
        }
    }

    /// Whether the rank holds a local part of `step`.
    pub(crate) fn has_local(&self, step: u64) -> bool {
        self.local.contains(&step)
    }
}

/// The steps a multi-rank restore tries, newest first, each with whether the durable run
/// has it: those of `step` (all of them when `None`) that every rank can load, from its
/// own local part or from the durable run (as any rank found it there). Fails, naming
/// the rank, when a rank cannot restore at all or ranks were asked for different steps.
/// Pure: every rank computes the same from the same gathered holdings.
pub(crate) fn agreed_steps(all: &[Holding]) -> Result<Vec<(u64, bool)>> {
    if let Some((r, (kind, why))) = all.iter().enumerate().find_map(|(r, h)| Some((r, h.refused.clone()?))) {
        return Err(Error::new(kind, format!("rank {r} cannot restore: {why}")));
    }
    let step = all.first().and_then(|h| h.step);
    if let Some((r, other)) = all.iter().enumerate().find(|(_, h)| h.step != step) {
        let shown = |s: Option<u64>| s.map_or("the newest step".to_string(), |s| format!("step {s}"));
        return Err(Error::invalid(format!(
            "ranks restore different steps: rank 0 {}, rank {r} {}",
            shown(step),
            shown(other.step)
        )));
    }
    let durable: BTreeSet<u64> = all.iter().filter_map(|h| h.durable.as_ref()).flatten().copied().collect();
    let seen: BTreeSet<u64> = all.iter().flat_map(|h| h.local.iter()).chain(&durable).copied().collect();
    Ok(seen
        .into_iter()
        .rev()
        .filter(|s| step.is_none_or(|wanted| wanted == *s))
        .filter(|s| durable.contains(s) || all.iter().all(|h| h.has_local(*s)))
        .map(|s| (s, durable.contains(&s)))
        .collect())
}

/// How one rank's try of an agreed step went, as it tells the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Verdict {
    /// Loaded.
    Loaded,
    /// No copy of it could be loaded (gone or damaged): an older step may serve.
    Skip,
    /// A copy could not be reached, or the load failed for the caller's own reason:
    /// every rank stops (kind and message).
    Stop(ErrorKind, String),
}

/// The first rank whose verdict stops the restore, with its error's kind and message.
pub(crate) fn stopped(verdicts: &[Verdict]) -> Option<(usize, ErrorKind, String)> {
    verdicts.iter().enumerate().find_map(|(r, v)| match v {
        Verdict::Stop(kind, message) => Some((r, *kind, message.clone())),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(local: &[u64], durable: Option<&[u64]>) -> Holding {
        Holding {
            step: None,
            refused: None,
            local: local.iter().copied().collect(),
            durable: durable.map(|d| d.iter().copied().collect()),
        }
    }

    #[test]
    fn ranks_agree_on_steps_every_rank_can_load() {
        // Step 30: only rank 0 has its part and the durable run lacks it; step 20: every
        // part; step 10: durable (seen by rank 1 only) and one part.
        let all = [holding(&[10, 20, 30], None), holding(&[20], Some(&[10]))];
        assert_eq!(agreed_steps(&all).unwrap(), vec![(20, false), (10, true)]);
        let asked = |step| all.clone().map(|h| Holding { step: Some(step), ..h });
        assert_eq!(agreed_steps(&asked(10)).unwrap(), vec![(10, true)]);
        assert!(agreed_steps(&asked(30)).unwrap().is_empty());
        // Ranks asked for different steps all fail alike (none waits for the others).
        let mut differ = asked(10);
        differ[1].step = Some(20);
        assert!(agreed_steps(&differ).unwrap_err().to_string().contains("rank 1 step 20"));
        let full = Holding::refused(None, &Error::new(ErrorKind::StorageFull, "disk full"));
        let refused = [holding(&[20], None), full];
        let err = agreed_steps(&refused).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::StorageFull);
        assert!(err.message().contains("rank 1"), "{err}");
    }

    #[test]
    fn the_first_stopping_rank_stops_every_rank() {
        let verdicts = [Verdict::Loaded, Verdict::Skip, Verdict::Stop(ErrorKind::Unavailable, "down".into())];
        assert_eq!(stopped(&verdicts), Some((2, ErrorKind::Unavailable, "down".into())));
        assert_eq!(stopped(&verdicts[..2]), None);
    }
}
