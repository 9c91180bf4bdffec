//! `CheckpointManager`: the one object a training loop calls every step. It asks the save
//! policy whether to save, snapshots the state, writes in the background with a bounded
//! number of saves in flight, applies retention after each commit, and resumes a run.
//!
//! Thread-safety: all methods take `&self` and may be called from any thread. One
//! background worker runs saves and deletions in order. A background failure is kept and
//! returned by the next call to `on_step`, `save`, `restore` or `wait`. A rank of a job
//! still takes part in the save of the call that reports it (every rank joins every save
//! the policy gives it, or the others would wait for it), and a rank that cannot make its
//! state joins that save to fail it on every rank (its own call reports its reason).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cadence::Cadence;
use crate::dist::{self, AllGather, CallbackExchange, Ranks};
use crate::error::{Error, ErrorKind, Result};
use crate::info::CheckpointInfo;
use crate::load::LoadOptions;
use crate::policy::{self, Candidate, Decision, Retention, SaveContext, SavePolicy};
use crate::preemption::Preemption;
use crate::run::Run;
use crate::save::SaveOptions;
use crate::snapshot::ArenaPool;
use crate::state::{State, Value};
use crate::telemetry::{Event, EventSink, Operation, Phase, Sinks, Tier};
use crate::tier::{self, LocalTier};

/// A source of elapsed time, injectable so time-based policies are testable.
pub trait Clock: Send + Sync {
    /// Time elapsed since an arbitrary fixed origin.
    fn now(&self) -> Duration;
}

/// The real monotonic clock.
#[derive(Debug)]
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock that moves only when told to (for tests and simulations).
#[derive(Debug, Default)]
pub struct ManualClock(Mutex<Duration>);

impl ManualClock {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        if let Ok(mut now) = self.0.lock() {
            *now += by;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        self.0.lock().map_or(Duration::ZERO, |now| *now)
    }
}

/// How a manager behaves.
#[derive(Clone)]
pub struct ManagerOptions {
    /// When to save (default: every 500 steps until 5,000, then every 1,000, as in Python).
    pub policy: SavePolicy,
    /// What to keep (default: everything).
    pub retention: Retention,
    /// Write in the background after snapshotting (`true`), or inside the call.
    pub async_save: bool,
    /// Saves queued or running at once; the next save waits for a slot.
    pub max_in_flight: usize,
    /// With async saving, copy a live state ([`Handover::Copy`]) on a background thread:
    /// `on_step` and `save` return before the copy is done, so that it overlaps what the
    /// loop does next (a GPU step, the next batch), and the caller must leave the state's
    /// buffers unchanged until [`CheckpointManager::wait_snapshot`] returns (before the
    /// optimizer's update, say). As torch DCP's asynchronous staging. Every call still
    /// waits for a free save slot and for the last save's copy. Off by default: the call
    /// then returns once the copy is done. A preemption save always copies inside the
    /// call. The snapshot time a save records (and an automatic interval goes by) is the
    /// copy's, although the caller was not blocked for it.
    pub background_snapshot: bool,
    /// Signal that requests a preemption save (SIGTERM by default; `None` for none).
    pub preemption_signal: Option<i32>,
    /// Clock for time-based policies.
    pub clock: Arc<dyn Clock>,
    /// Template for every save (shard size, concurrency); incremental by default (see
    /// [`SaveOptions::incremental`]).
    pub save: SaveOptions,
    /// This process's rank in a multi-rank job (0 for a single process).
    pub rank: u32,
    /// Number of ranks saving each checkpoint together (1 for a single process). With
    /// more than one, saves are coordinated through `all_gather` if set, else through the
    /// store; only rank 0 deletes.
    pub world_size: u32,
    /// How long a store-coordinated save waits for the other ranks.
    pub coordination_timeout: Duration,
    /// The job's own collective for coordinating multi-rank saves (e.g. over a
    /// `torch.distributed` group). Saves run one at a time on one thread, so every rank
    /// calls it in the same order; the training loop must not use the same collective
    /// concurrently from another thread.
    pub all_gather: Option<AllGather>,
    /// On open, the leading rank removes in the background what unfinished saves left in
    /// the run once it is older than this (`None`: never; see [`Run::prune_orphans`]).
    pub orphan_grace: Option<Duration>,
    /// A fast local tier: saves go there first (by its own policy and retention), and
    /// those the manager's `policy` selects are then uploaded in the background to the
    /// manager's run, which keeps them by `retention` (see [`crate::tier`]). One process
    /// only.
    pub local: Option<LocalTier>,
    /// Where the manager's events go (see [`crate::telemetry`]).
    pub events: Vec<EventSink>,
}

/// Leftovers of unfinished saves younger than this are left alone when a manager opens:
/// another process may still be writing them.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(3600);

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            policy: SavePolicy::default(),
            retention: Retention::default(),
            async_save: true,
            max_in_flight: 1,
            background_snapshot: false,
            preemption_signal: Some(signal_hook::consts::SIGTERM),
            clock: Arc::new(SystemClock::default()),
            save: SaveOptions::default().with_incremental(true),
            rank: 0,
            world_size: 1,
            coordination_timeout: Duration::from_secs(600),
            all_gather: None,
            orphan_grace: Some(DEFAULT_ORPHAN_GRACE),
            local: None,
            events: Vec::new(),
        }
    }
}

impl ManagerOptions {
    /// Sets the save policy.
    pub fn with_policy(mut self, policy: SavePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the retention policy (keep-best's metric is the one recorded for ranking).
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Chooses background (`true`) or inline saving.
    pub fn with_async_save(mut self, async_save: bool) -> Self {
        self.async_save = async_save;
        self
    }

    /// Sets how many saves may be in flight.
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Copies live states on a background thread (see
    /// [`background_snapshot`](Self::background_snapshot)).
    pub fn with_background_snapshot(mut self, background: bool) -> Self {
        self.background_snapshot = background;
        self
    }

    /// Sets the clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Makes this manager rank `rank` of `world_size` ranks that save together.
    pub fn with_ranks(mut self, rank: u32, world_size: u32) -> Self {
        self.rank = rank;
        self.world_size = world_size.max(1);
        self
    }

    /// Coordinates multi-rank saves through `all_gather` (the job's collectives) instead
    /// of the store.
    pub fn with_all_gather(mut self, all_gather: AllGather) -> Self {
        self.all_gather = Some(all_gather);
        self
    }

    /// Sets how long a store-coordinated save waits for the other ranks.
    pub fn with_coordination_timeout(mut self, timeout: Duration) -> Self {
        self.coordination_timeout = timeout;
        self
    }

    /// Sets (or, with `None`, turns off) the age past which leftovers of unfinished saves
    /// are removed when the manager opens.
    pub fn with_orphan_grace(mut self, grace: Option<Duration>) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// Adds a fast local tier in front of the manager's run.
    pub fn with_local_tier(mut self, local: LocalTier) -> Self {
        self.local = Some(local);
        self
    }

    /// Sends the manager's events to `sink` too.
    pub fn with_event_sink(mut self, sink: EventSink) -> Self {
        self.events.push(sink);
        self
    }

    /// Sets (or disables) the preemption signal.
    pub fn with_preemption_signal(mut self, signal: Option<i32>) -> Self {
        self.preemption_signal = signal;
        self
    }
}

/// Per-save details beyond the state.
#[derive(Debug, Clone, Default)]
pub struct SaveRequest {
    /// Save even if the policy would not (e.g. the final step).
    pub force: bool,
    /// Mark the checkpoint temporary (explicit saves only).
    pub temporary: bool,
    /// Metrics to record (numbers).
    pub metrics: BTreeMap<String, Value>,
    /// User metadata to record.
    pub metadata: serde_json::Value,
}

/// How the state of a save reaches the manager.
#[derive(Debug)]
pub enum Handover<'s> {
    /// The caller's live state: an async save copies it before the call returns (the
    /// caller may change its buffers afterwards).
    Copy(&'s State),
    /// A state whose buffers are the manager's to keep until written (e.g. tensors just
    /// copied off a GPU): no copy.
    Give(State),
}

impl Handover<'_> {
    /// The state handed over.
    fn state(&self) -> &State {
        match self {
            Handover::Copy(state) => state,
            Handover::Give(state) => state,
        }
    }
}

/// Whether a save goes on to the durable tier, and how urgently.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upload {
    /// No (or the manager has no local tier).
    No,
    /// After the uploads already queued.
    Queue,
    /// Before them: a preemption save, which has only the grace period.
    First,
}

/// Which call a save came from.
#[derive(Clone, Copy)]
enum Call {
    /// `on_step`: the policy decides; a step already saved is skipped.
    OnStep,
    /// `save`: always saves; a step already saved is an error.
    Save,
}

enum Job {
    Save {
        step: u64,
        state: State,
        opts: SaveOptions,
        /// Whether the durable tier gets a copy once it is committed.
        upload: Upload,
    },
    Retain,
    /// Take part in the other ranks' save without a state (see [`Shared::refuse`]).
    Refuse {
        opts: SaveOptions,
        reason: Error,
        upload: Upload,
    },
    /// Remove leftovers of unfinished saves older than this.
    Prune(Duration),
}

/// A save whose live state the snapshot thread copies before it is queued.
struct Behind {
    step: u64,
    /// The caller's state, sharing its buffers.
    live: State,
    opts: SaveOptions,
    upload: Upload,
    /// When the save was booked (its snapshot time runs from there).
    started: Duration,
    /// The policies' facts before the booking and as it set them.
    before: Facts,
    booked: Facts,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Job>,
    /// Jobs queued or running (a save whose state the snapshot thread holds included).
    busy: usize,
    /// Save jobs queued or running.
    saves_in_flight: usize,
    /// A live state handed to the snapshot thread, and whether it is copying one now.
    behind: Option<Behind>,
    snapshotting: bool,
    writing: BTreeSet<u64>,
    reading: BTreeMap<u64, usize>,
    /// What retention knows of each committed checkpoint.
    known: BTreeMap<u64, Candidate>,
    error: Option<Error>,
    /// Problems of the cleanup after committed saves, newest last (see
    /// [`CheckpointManager::take_cleanup_errors`]).
    cleanup_errors: VecDeque<Error>,
    last_step: Option<u64>,
    last_save_at: Duration,
    shutdown: bool,
    /// What saves cost, when the policy chooses its interval from it.
    cadence: Option<Cadence>,
    /// With a local tier: the steps owed to the durable tier (their markers exist), the
    /// ones queued for the uploader and the one it copies now, what the durable tier's
    /// retention knows, and the last step its policy selected and when.
    owed: BTreeSet<u64>,
    uploads: VecDeque<u64>,
    uploading: Option<u64>,
    /// Owed steps the store refused in a way retrying in this process will not mend
    /// (credentials, say): left for the next manager, not queued again here.
    held: BTreeSet<u64>,
    /// In a multi-rank job with a local tier: steps the other ranks upload that this rank
    /// has no part of (its save failed, why): it joins their upload only to fail it.
    refusals: BTreeMap<u64, Error>,
    durable_known: BTreeMap<u64, Candidate>,
    durable_last: (Option<u64>, Duration),
}

/// What the save policies go by: the last step saved and when, for the manager's own
/// policy (with a local tier, the local policy's), and for the durable tier's.
#[derive(Clone, Copy, PartialEq)]
struct Facts {
    last_step: Option<u64>,
    last_save_at: Duration,
    durable: (Option<u64>, Duration),
}

impl Inner {
    fn facts(&self) -> Facts {
        Facts { last_step: self.last_step, last_save_at: self.last_save_at, durable: self.durable_last }
    }

    /// Gives back the step and the slot of a save that will not be written, and the
    /// policies' facts as they were `before` its booking set them to `booked` (unless a
    /// later booking moved them on meanwhile).
    fn unbook(&mut self, step: u64, before: Facts, booked: Facts) {
        if self.last_step == booked.last_step {
            self.last_step = before.last_step;
        }
        if self.last_save_at == booked.last_save_at {
            self.last_save_at = before.last_save_at;
        }
        if self.durable_last == booked.durable {
            self.durable_last = before.durable;
        }
        self.writing.remove(&step);
        self.saves_in_flight -= 1;
    }

    /// Whether uploads are queued or running.
    fn uploads_busy(&self) -> bool {
        !self.uploads.is_empty() || self.uploading.is_some()
    }
}

/// The durable tier of a manager with a local tier.
struct Durable {
    run: Run,
    /// The manager's save options (sizes, concurrency) for uploads that save anew (with
    /// several ranks).
    save: SaveOptions,
    /// Leftovers of unfinished uploads older than this are removed when the uploader
    /// starts (see [`ManagerOptions::orphan_grace`]).
    orphan_grace: Option<Duration>,
    retention: Retention,
    upload_grace: Duration,
    /// The step the durable run's `LATEST` hint names, as this manager last wrote it.
    hinted: Mutex<Option<u64>>,
}

struct Shared {
    /// The run saves go to (the local tier's, if the manager has one).
    run: Run,
    /// What to keep of `run`.
    retention: Retention,
    /// The tier uploads go to, with a local tier.
    durable: Option<Durable>,
    sinks: Sinks,
    /// The step the `LATEST` hint names, as this manager last wrote it.
    hinted: Mutex<Option<u64>>,
    rank: u32,
    world_size: u32,
    coordination_timeout: Duration,
    all_gather: Option<AllGather>,
    /// The manager's clock (save costs are measured with it).
    clock: Arc<dyn Clock>,
    /// Memory for snapshots, reused from one async save to the next.
    snapshots: ArenaPool,
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Saves and commits one checkpoint: alone, or together with the other ranks.
    fn save(&self, state: &State, opts: &SaveOptions) -> Result<CheckpointInfo> {
        if self.parted() {
            return crate::parts::save_part(self.run.location(), state, opts, self.rank, self.world_size);
        }
        self.with_ranks(|ranks, exchange| dist::save_as_rank(self.run.location(), state, opts, ranks, exchange))
    }

    /// Takes part in the other ranks' save of `opts.step` with this rank's `reason` for
    /// having no state: they fail it at once instead of waiting for this rank. Returns
    /// the error every rank gets, naming this one (this rank reports its own reason).
    /// With a local tier of its own (see [`Shared::parted`]) each rank saves alone: the
    /// save of the others is not failed, but their upload of the step (per `upload`) is.
    fn refuse(&self, opts: &SaveOptions, reason: &Error, upload: Upload) -> Error {
        if self.parted() {
            if let Some(step) = opts.step {
                self.refuse_upload(step, reason, upload);
            }
            return Error::new(reason.kind(), reason.full_message());
        }
        self.with_ranks(|ranks, exchange| dist::refuse_as_rank(self.run.location(), opts, ranks, exchange, reason))
    }

    /// Queues, per `upload`, this rank's part in the other ranks' upload of `step`, which
    /// it cannot upload (`reason`): it joins only to fail it on every rank at once.
    fn refuse_upload(&self, step: u64, reason: &Error, upload: Upload) {
        let mut inner = self.lock();
        match upload {
            Upload::No => return,
            Upload::Queue => inner.uploads.push_back(step),
            Upload::First => inner.uploads.push_front(step),
        }
        inner.refusals.insert(step, Error::new(reason.kind(), reason.full_message()));
        self.changed.notify_all();
    }

    /// This manager's rank, how many ranks there are, and how long they wait for each other.
    fn ranks(&self) -> Ranks {
        Ranks { rank: self.rank, world_size: self.world_size, timeout: self.coordination_timeout }
    }

    /// Calls `f` with this manager's ranks and the exchange of the job's collectives, if any.
    fn with_ranks<T>(&self, f: impl FnOnce(Ranks, Option<&mut dyn dist::Exchange>) -> T) -> T {
        let ranks = self.ranks();
        match &self.all_gather {
            Some(all_gather) => {
                let mut exchange = CallbackExchange::new(self.rank, self.world_size, |payload| all_gather(payload));
                f(ranks, Some(&mut exchange))
            }
            None => f(ranks, None),
        }
    }

    /// Whether this process deletes checkpoints and writes the hint of the run it shares
    /// with the other ranks (rank 0 only).
    fn leads(&self) -> bool {
        self.rank == 0
    }

    /// Whether each rank saves its own part into a local tier of its own (a multi-rank job
    /// with a local tier): the ranks then save together only into the durable tier, when
    /// they upload.
    fn parted(&self) -> bool {
        self.durable.is_some() && self.world_size > 1
    }

    /// Whether this process deletes checkpoints from and writes the hint of the run saves
    /// go to: the one it shares with the other ranks when it leads, its own local tier
    /// always.
    fn owns_run(&self) -> bool {
        self.leads() || self.parted()
    }

    /// The tier saves go to.
    fn save_tier(&self) -> Tier {
        match self.durable {
            Some(_) => Tier::Local,
            None => Tier::Durable,
        }
    }

    /// Writes the booked save of `step` and does what follows, the one path of sync and
    /// async saves alike: the state is dropped (its memory free for the next snapshot),
    /// then the booking is released, even if the save panics; on a commit retention learns
    /// of the checkpoint, when it is the newest the run's `LATEST` hint names it (a
    /// failure of the hint is a cleanup problem, never the save's), and with `upload` it
    /// is queued for the durable tier (its marker written before the save began). A
    /// synchronous save gives the clock time it was booked at (`sync_since`): the loop
    /// stalled from then until it is written.
    fn write(
        &self,
        step: u64,
        state: Handover<'_>,
        opts: &SaveOptions,
        upload: Upload,
        sync_since: Option<Duration>,
    ) -> Result<()> {
        let booking = Release { shared: self, step };
        let started = self.clock.now();
        let timer = Instant::now();
        // Owed from before its marker exists: local retention never takes it meanwhile.
        let marked = match upload {
            Upload::No => Ok(()),
            _ => {
                self.lock().owed.insert(step);
                tier::mark(&self.run, step)
            }
        };
        let result = marked.and_then(|()| self.save(state.state(), opts));
        let writing = self.clock.now().saturating_sub(started);
        drop(state);
        drop(booking);
        let cost = match sync_since {
            Some(booked) => {
                let stall = self.clock.now().saturating_sub(booked);
                Some((stall, stall))
            }
            None => opts.snapshot_time.map(|stall| (stall, stall + writing)),
        };
        let outcome = self.committed(step, result.as_ref().ok(), cost);
        if upload != Upload::No && !outcome {
            // Nothing committed: nothing is owed.
            self.lock().owed.remove(&step);
            drop(tier::unmark(&self.run, step));
            if let (true, Err(err)) = (self.parted(), &result) {
                self.refuse_upload(step, err, upload);
            }
        }
        if self.durable.is_some() {
            let mut inner = self.lock();
            match (upload, outcome) {
                (Upload::First, true) => inner.uploads.push_front(step),
                (Upload::Queue, true) => inner.uploads.push_back(step),
                _ => {}
            }
            // What an earlier upload could not do (the store was down) is tried again: a
            // committed step, not one being saved, queued or uploaded, nor one the store
            // refused in a way time will not mend (the next manager tries those).
            let retry: Vec<u64> = inner
                .owed
                .iter()
                .copied()
                .filter(|s| {
                    inner.known.contains_key(s)
                        && !inner.writing.contains(s)
                        && !inner.held.contains(s)
                        && Some(*s) != inner.uploading
                        && !inner.uploads.contains(s)
                })
                .collect();
            inner.uploads.extend(retry);
            self.changed.notify_all();
        }
        if self.sinks.active() {
            let mut event = self.save_event(step, &result, opts.snapshot_time, timer.elapsed());
            event.interval = self.lock().cadence.and_then(|c| c.interval());
            self.sinks.emit(event);
        }
        result.map(drop)
    }

    /// What follows a save of `step`: when committed (`info`), retention learns of it, its
    /// cost (`(stall, until written)`) is recorded, and the `LATEST` hint names it when it
    /// is the newest. Returns whether it committed.
    fn committed(&self, step: u64, info: Option<&CheckpointInfo>, cost: Option<(Duration, Duration)>) -> bool {
        let Some(info) = info else { return false };
        let newest = {
            let mut inner = self.lock();
            if let (Some(cadence), Some((stall, written))) = (inner.cadence.as_mut(), cost) {
                cadence.record(stall, written);
            }
            inner.known.insert(step, Candidate::from_info(info, self.retention.metric()));
            // Saved after all (a `save` of a step whose earlier save failed): its own upload.
            inner.refusals.remove(&step);
            inner.known.keys().next_back() == Some(&step)
        };
        if newest && self.owns_run() {
            self.hint(&self.run, &self.hinted, info);
        }
        true
    }

    /// Points `run`'s `LATEST` hint at `info` unless it names a newer step already
    /// (`hinted` is the step it names, as this manager last wrote it).
    fn hint(&self, run: &Run, hinted: &Mutex<Option<u64>>, info: &CheckpointInfo) {
        // Hints are written one at a time and never name an older step than the last.
        let mut hinted = hinted.lock().unwrap_or_else(|p| p.into_inner());
        if hinted.is_none_or(|h| h < info.step) {
            match retried(|| run.write_latest_hint(info)) {
                Ok(()) => *hinted = Some(info.step),
                Err(err) => self.cleanup_failed(err),
            }
        }
    }

    /// The event of the save of `step` that ended with `result`, `total` after it began
    /// (after a snapshot of `snapshot`, for an asynchronous save).
    fn save_event(
        &self,
        step: u64,
        result: &Result<CheckpointInfo>,
        snapshot: Option<Duration>,
        total: Duration,
    ) -> Event {
        let mut event = Event::new(Operation::Save, self.save_tier(), step, self.run.step_location(step).uri());
        if let Some(snapshot) = snapshot {
            event = event.with_phase(Phase::Snapshot, snapshot);
        }
        // The save measured its own writing; the rest is the commit and the hint.
        let info = result.as_ref().ok();
        event = match info.and_then(|i| i.timings).map(|t| Duration::from_millis(t.write_ms)) {
            Some(write) => event.with_phase(Phase::Write, write).with_phase(Phase::Commit, total.saturating_sub(write)),
            None => event.with_phase(Phase::Write, total),
        };
        event.with_bytes(info.map_or(0, |i| i.written_bytes)).with_outcome(result)
    }

    /// Uploads `step` to the durable tier (retrying what the store may fix), then applies
    /// the durable tier's retention and hint; the step is then no longer owed, unless the
    /// upload failed in a way a later try may mend (its marker stays; the next manager on
    /// this local run tries again).
    fn upload(&self, durable: &Durable, step: u64) {
        let missing = self.lock().refusals.remove(&step);
        let (result, event) = match self.parted() {
            // Not retried here: every rank would have to retry together (the ranks retry
            // after their next saves, in step).
            true => tier::upload_part(&self.run, &durable.run, step, self.ranks(), &durable.save, missing.as_ref()),
            false => {
                let mut last = None;
                let result = retried(|| {
                    let (result, event) = tier::upload(&self.run, &durable.run, step);
                    last = Some(event);
                    result
                });
                let event = last.unwrap_or_else(|| {
                    Event::new(Operation::Upload, Tier::Durable, step, durable.run.step_location(step).uri())
                        .with_outcome(&result)
                });
                (result, event)
            }
        };
        self.sinks.emit(event);
        if missing.is_some() {
            // This rank's failed save was reported by the save itself.
            return;
        }
        let settled = match &result {
            Ok(info) => {
                let newest = {
                    let mut inner = self.lock();
                    inner.durable_known.insert(step, Candidate::from_info(info, durable.retention.metric()));
                    inner.durable_known.keys().next_back() == Some(&step)
                };
                if newest && self.leads() {
                    self.hint(&durable.run, &durable.hinted, info);
                }
                true
            }
            Err(e) => tier::hopeless(e, self.parted()),
        };
        if let Err(e) = &result {
            if !settled && !matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::StorageFull) {
                self.lock().held.insert(step);
            }
        }
        if let Err(err) = result {
            let shown = format!("uploading to the durable tier failed step={step}: {}", err.full_message());
            self.cleanup_failed(Error::new(err.kind(), shown));
        }
        if settled {
            match retried(|| tier::unmark(&self.run, step)) {
                Ok(()) => {
                    let mut inner = self.lock();
                    inner.owed.remove(&step);
                    inner.held.remove(&step);
                }
                Err(err) => self.cleanup_failed(err),
            }
        }
        if self.leads() {
            self.apply_durable_retention(durable);
        }
    }

    /// Deletes from the durable tier what its retention no longer keeps.
    fn apply_durable_retention(&self, durable: &Durable) {
        let (doomed, latest) = {
            let inner = self.lock();
            let candidates: Vec<Candidate> = inner.durable_known.values().cloned().collect();
            let protected: BTreeSet<u64> = inner.reading.keys().copied().collect();
            (
                policy::to_delete(&durable.retention, &candidates, &protected),
                inner.durable_known.keys().next_back().copied(),
            )
        };
        for step in doomed.into_iter().filter(|s| Some(*s) != latest) {
            if self.lock().reading.contains_key(&step) {
                continue;
            }
            if self.delete(&durable.run, Tier::Durable, step) {
                self.lock().durable_known.remove(&step);
            }
        }
    }

    /// Deletes `step` from `run` (retried), reporting it; returns whether it is gone.
    fn delete(&self, run: &Run, tier: Tier, step: u64) -> bool {
        let timer = Instant::now();
        let stored = match self.sinks.active() {
            true => run.checkpoint(step).map_or(0, |c| c.info().written_bytes),
            false => 0,
        };
        let result = retried(|| run.delete(step));
        self.sinks.emit(
            Event::new(Operation::Delete, tier, step, run.step_location(step).uri())
                .with_phase(Phase::Retention, timer.elapsed())
                .with_bytes(stored)
                .with_outcome(&result),
        );
        match result {
            Ok(()) => true,
            Err(err) => {
                self.cleanup_failed(err);
                false
            }
        }
    }

    /// Waits with `inner` until no live state is waiting to be copied or being copied.
    fn snapshots_done<'a>(&'a self, mut inner: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        while inner.behind.is_some() || inner.snapshotting {
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner
    }

    /// Queues `job` for the worker.
    fn enqueue(&self, job: Job) {
        let mut inner = self.lock();
        inner.busy += 1;
        inner.queue.push_back(job);
        self.changed.notify_all();
    }

    /// Records a cleanup problem (the checkpoints themselves are committed); the oldest
    /// are dropped past [`MAX_CLEANUP_ERRORS`].
    fn cleanup_failed(&self, err: Error) {
        let mut inner = self.lock();
        if inner.cleanup_errors.len() == MAX_CLEANUP_ERRORS {
            inner.cleanup_errors.pop_front();
        }
        inner.cleanup_errors.push_back(err);
    }
}

/// Releases the booking of a save that started (written or failed, or panicked) when
/// dropped: the step is no longer being written and its slot is free.
struct Release<'a> {
    shared: &'a Shared,
    step: u64,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.writing.remove(&self.step);
        inner.saves_in_flight -= 1;
        self.shared.changed.notify_all();
    }
}

/// The booking of a save between the decision and the hand-over to the writer: dropped
/// before [`Booking::hand_over`] (the state could not be made, or a panic), it gives the
/// step and the slot back and the policy sees the last save as before.
struct Booking<'a> {
    shared: &'a Shared,
    step: u64,
    /// The policies' facts (the last step and save time of the manager's own policy,
    /// then of the durable tier's) before the booking, and as the booking set them.
    before: Facts,
    booked: Facts,
    armed: bool,
}

impl Booking<'_> {
    /// The writer takes the booking over (it releases it once the save is done).
    fn hand_over(mut self) {
        self.armed = false;
    }

    /// When dropped, gives back the step and the slot but leaves the policy's facts as
    /// booked (the step counts as saved: the other ranks of a job saved it).
    fn keep_decision(&mut self) {
        self.before = self.booked;
    }
}

impl Drop for Booking<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.shared.lock().unbook(self.step, self.before, self.booked);
        self.shared.changed.notify_all();
    }
}

thread_local! {
    /// Set while a save's state is being made on this thread: a `make` that saves through
    /// a manager again would wait for the slot it holds itself.
    static MAKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Cleanup problems kept for [`CheckpointManager::take_cleanup_errors`].
const MAX_CLEANUP_ERRORS: usize = 16;
/// Attempts of one cleanup step (a deletion, the hint) that the store failed.
const CLEANUP_ATTEMPTS: u32 = 3;

/// Runs an idempotent cleanup step, again (with backoff) while the store reports a
/// failure that retrying may fix.
fn retried<T>(mut op: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match op() {
            Err(e) if e.kind() == ErrorKind::Unavailable && attempt < CLEANUP_ATTEMPTS => {
                std::thread::sleep(Duration::from_millis(100 << attempt));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Decides when to save, saves in the background, keeps what retention says, resumes.
///
/// ```
/// use cairn::manager::{CheckpointManager, ManagerOptions};
/// use cairn::policy::{Every, SavePolicy};
/// use cairn::{DType, State, Tensor};
///
/// let opts = ManagerOptions::default().with_policy(SavePolicy::steps(vec![Every::new(10)]).unwrap());
/// let manager = CheckpointManager::open("memory://doc-manager/run", opts).unwrap();
/// let mut state = State::new();
/// state.insert_tensor("w", Tensor::new(DType::U8, vec![1], vec![0]).unwrap());
/// for step in 1..=30 {
///     manager.on_step(step, &state, Default::default()).unwrap();
/// }
/// manager.wait().unwrap();
/// assert_eq!(manager.latest_step().unwrap(), Some(30));
/// ```
pub struct CheckpointManager {
    shared: Arc<Shared>,
    policy: SavePolicy,
    async_save: bool,
    max_in_flight: usize,
    clock: Arc<dyn Clock>,
    save_template: SaveOptions,
    preempted: Arc<AtomicBool>,
    /// The hold on the preemption signal, released on close.
    preemption: Mutex<Option<Preemption>>,
    worker: Option<JoinHandle<()>>,
    /// With [`ManagerOptions::background_snapshot`], the thread that copies live states.
    snapshotter: Option<JoinHandle<()>>,
    /// With a local tier: when to save locally (`policy` then selects the uploads), and
    /// the thread that uploads.
    local_policy: Option<SavePolicy>,
    uploader: Option<JoinHandle<()>>,
    /// Set by a preemption save: uploads are not waited for past it.
    upload_deadline: Mutex<Option<Instant>>,
}

/// One copy of a checkpoint a restore may read.
struct CheckpointCopy {
    step: u64,
    tier: Tier,
    run: Run,
}

/// Retention keeps off a step while a `Reading` of it lives.
struct Reading<'a> {
    shared: &'a Shared,
    step: u64,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        if let Some(count) = inner.reading.get_mut(&self.step) {
            *count -= 1;
            if *count == 0 {
                inner.reading.remove(&self.step);
            }
        }
    }
}

/// What [`CheckpointManager::restore_reporting`] restored, and the copies it passed over.
#[derive(Debug)]
pub struct Restored<T = State> {
    /// The state loaded.
    pub state: T,
    /// The checkpoint it came from (its `uri` says which tier).
    pub info: CheckpointInfo,
    /// Why each newer copy (or the same step's copy on the other tier) could not be
    /// restored, newest first.
    pub passed_over: Vec<Error>,
}

impl CheckpointManager {
    /// Opens (or creates) the run at `uri`. Existing checkpoints are read so that the
    /// manager resumes where the run stopped, and retention is applied to them in the
    /// background (this removes a stale temporary checkpoint left by an earlier run).
    pub fn open(uri: &str, opts: ManagerOptions) -> Result<CheckpointManager> {
        CheckpointManager::with_run(Run::create(uri)?, opts)
    }

    /// Like [`open`](Self::open), over an already opened run.
    pub fn with_run(run: Run, opts: ManagerOptions) -> Result<CheckpointManager> {
        if opts.world_size > 1 && opts.policy.has_time_interval() {
            return Err(Error::invalid(
                "a time-based save interval cannot be used with several ranks: ranks' clocks would disagree on when to save",
            ));
        }
        if opts.rank >= opts.world_size {
            return Err(Error::invalid(format!("rank {} is not below world_size {}", opts.rank, opts.world_size)));
        }
        if let Some(local) = &opts.local {
            if opts.world_size > 1 && (local.policy.has_time_interval() || local.policy.auto_interval_mtbf().is_some())
            {
                return Err(Error::invalid(
                    "a time-based or automatic local save interval cannot be used with several ranks: their parts would land on different steps",
                ));
            }
            if opts.policy.auto_interval_mtbf().is_some() {
                return Err(Error::invalid(
                    "an automatic interval measures the saves it times: with a local tier, give it to the local tier's policy",
                ));
            }
            if tier::overlapping(&local.run, &run) {
                return Err(Error::invalid(format!(
                    "the local tier is the run itself, or inside it or around it: give it a folder of its own run=`{}` local=`{}`",
                    run.location().uri(),
                    local.run.location().uri()
                )));
            }
        }
        let local = match opts.local {
            Some(local) if opts.world_size > 1 => Some(local.for_rank(opts.rank)?),
            local => local,
        };
        let (run, retention, durable, local_policy) = match local {
            Some(local) => {
                let durable = Durable {
                    run,
                    save: opts.save.clone(),
                    orphan_grace: opts.orphan_grace,
                    retention: opts.retention,
                    upload_grace: local.upload_grace,
                    hinted: Mutex::new(None),
                };
                (local.run, local.retention, Some(durable), Some(local.policy))
            }
            None => (run, opts.retention, None, None),
        };
        let mut known = BTreeMap::new();
        for info in run.infos()? {
            known.insert(info.step, Candidate::from_info(&info, retention.metric()));
        }
        let mut durable_known = BTreeMap::new();
        let mut uploads = VecDeque::new();
        let mut owed = BTreeSet::new();
        let mut refusals = BTreeMap::new();
        let mut cleanup_errors = VecDeque::new();
        if let Some(durable) = &durable {
            // An unreachable durable store does not stop a run that saves locally: its
            // retention then knows only what this manager uploads.
            match durable.run.infos() {
                Ok(infos) => {
                    for info in infos {
                        durable_known.insert(info.step, Candidate::from_info(&info, durable.retention.metric()));
                    }
                }
                Err(err) => cleanup_errors.push_back(err),
            }
            // Uploads the last process owed: again, if its local save committed. With
            // several ranks, a rank whose save never committed still joins the others'
            // upload of that step, to fail it at once.
            for step in tier::marked(&run)? {
                match known.contains_key(&step) {
                    true => {
                        owed.insert(step);
                        uploads.push_back(step);
                    }
                    false => {
                        tier::unmark(&run, step)?;
                        if opts.world_size > 1 {
                            refusals.insert(step, Error::not_found("its save of that step never committed"));
                            uploads.push_back(step);
                        }
                    }
                }
            }
        }
        let preempted = Arc::new(AtomicBool::new(false));
        let preemption =
            opts.preemption_signal.map(|signal| Preemption::install(signal, preempted.clone())).transpose()?;
        let mtbf = local_policy.as_ref().unwrap_or(&opts.policy).auto_interval_mtbf();
        let durable_last = durable_known.keys().next_back().copied();
        let inner = Inner {
            last_step: known.keys().next_back().copied().max(durable_last),
            last_save_at: opts.clock.now(),
            known,
            cadence: mtbf.map(Cadence::new),
            owed,
            uploads,
            refusals,
            durable_known,
            durable_last: (durable_last, opts.clock.now()),
            cleanup_errors,
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            run,
            retention,
            durable,
            sinks: Sinks::new(opts.events),
            hinted: Mutex::new(None),
            rank: opts.rank,
            world_size: opts.world_size,
            coordination_timeout: opts.coordination_timeout,
            all_gather: opts.all_gather.clone(),
            clock: opts.clock.clone(),
            snapshots: ArenaPool::default(),
            inner: Mutex::new(inner),
            changed: Condvar::new(),
        });
        let spawn = |name: &str, work: fn(&Shared)| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || work(&shared))
                .map_err(|e| Error::new(ErrorKind::Unavailable, format!("cannot start thread {name}")).with_source(e))
        };
        let worker = spawn("cairn-manager", work)?;
        let snapshotter = match opts.background_snapshot && opts.async_save {
            true => Some(spawn("cairn-snapshot", snapshot_work)?),
            false => None,
        };
        let uploader = match shared.durable.is_some() {
            true => Some(spawn("cairn-upload", upload_work)?),
            false => None,
        };
        let manager = CheckpointManager {
            shared,
            policy: opts.policy,
            async_save: opts.async_save,
            max_in_flight: opts.max_in_flight.max(1),
            clock: opts.clock,
            save_template: opts.save,
            preempted,
            preemption: Mutex::new(preemption),
            worker: Some(worker),
            snapshotter,
            local_policy,
            uploader,
            upload_deadline: Mutex::new(None),
        };
        manager.shared.enqueue(Job::Retain);
        if let Some(grace) = opts.orphan_grace.filter(|_| manager.shared.owns_run()) {
            manager.shared.enqueue(Job::Prune(grace));
        }
        Ok(manager)
    }

    /// The run this manager was opened on (with a local tier, the durable one).
    pub fn run(&self) -> &Run {
        self.shared.durable.as_ref().map_or(&self.shared.run, |d| &d.run)
    }

    /// The local tier's run, if the manager has one.
    pub fn local_run(&self) -> Option<&Run> {
        self.shared.durable.as_ref().map(|_| &self.shared.run)
    }

    /// The runs of the manager's tiers: the local one first, if any.
    fn tiers(&self) -> Vec<(Tier, &Run)> {
        match &self.shared.durable {
            Some(durable) => vec![(Tier::Local, &self.shared.run), (Tier::Durable, &durable.run)],
            None => vec![(Tier::Durable, &self.shared.run)],
        }
    }

    /// Saves queued or being written right now (never more than `max_in_flight`).
    pub fn saves_in_flight(&self) -> usize {
        self.shared.lock().saves_in_flight
    }

    /// Whether a preemption signal has arrived (the loop should stop after this step).
    pub fn preempted(&self) -> bool {
        self.preempted.load(Ordering::SeqCst)
    }

    /// Called every step: saves if the policy says so (or `req.force`, or after a
    /// preemption signal) and returns whether it saved. Returns once the state is
    /// snapshotted (with [`ManagerOptions::background_snapshot`], once the state is
    /// handed over: see [`wait_snapshot`](Self::wait_snapshot)); after a preemption save
    /// it also waits until everything is durable.
    /// A step already committed (or being written) is never saved again, forced or not:
    /// `on_step` returns `false` (use [`save`](Self::save) to be told with an error).
    pub fn on_step(&self, step: u64, state: &State, req: SaveRequest) -> Result<bool> {
        self.on_step_with(step, req, |_| Ok(Handover::Copy(state)))
    }

    /// Like [`on_step`](Self::on_step), but the state is made by `make` only when the
    /// step is saved, and only once a save slot is free: a caller whose state costs
    /// something to gather (tensors copied off a GPU) never holds more than
    /// `max_in_flight` copies, and pays nothing on the steps that save nothing. `make`
    /// may also fill in the request's metrics and metadata (costly to read, e.g. a loss
    /// still on the GPU).
    pub fn on_step_with<'s>(
        &self,
        step: u64,
        req: SaveRequest,
        make: impl FnOnce(&mut SaveRequest) -> Result<Handover<'s>>,
    ) -> Result<bool> {
        self.step(step, req, Call::OnStep, make)
    }

    /// Saves `state` as `step` now, whatever the policy. Fails with
    /// [`ErrorKind::AlreadyExists`] if the step is already committed or being written.
    /// With async saving it returns once `state` is copied (the caller may then change
    /// its buffers; with [`ManagerOptions::background_snapshot`], once the state is
    /// handed over); otherwise once the checkpoint is committed.
    pub fn save(&self, step: u64, state: &State, req: SaveRequest) -> Result<()> {
        self.save_with(step, req, |_| Ok(Handover::Copy(state)))
    }

    /// Like [`save`](Self::save), with the state made by `make` once a save slot is free.
    pub fn save_with<'s>(
        &self,
        step: u64,
        req: SaveRequest,
        make: impl FnOnce(&mut SaveRequest) -> Result<Handover<'s>>,
    ) -> Result<()> {
        self.step(step, req, Call::Save, make).map(drop)
    }

    /// The one path of every save: decide (for `on_step`), wait for a slot, book the
    /// step, make the state, then write it inline or hand it to the worker.
    fn step<'s>(
        &self,
        step: u64,
        mut req: SaveRequest,
        call: Call,
        make: impl FnOnce(&mut SaveRequest) -> Result<Handover<'s>>,
    ) -> Result<bool> {
        if MAKING.get() {
            return Err(Error::invalid(format!(
                "a state being made for a save cannot itself save through a manager step={step}"
            )));
        }
        refuse_in_sink("on_step and save")?;
        let preempted = self.preempted();
        // A rank of a job takes part in every save the policy gives it, even when this
        // call reports an earlier background failure (the other ranks would wait for it
        // otherwise, or pair their collectives with its next save): the failure is
        // returned once the save is under way. Alone, the call stops at the failure.
        let together = self.shared.world_size > 1;
        // A save never starts while the last one's state is still being copied: saves
        // reach the worker in the order they were called.
        let mut inner = self.shared.snapshots_done(self.shared.lock());
        let mut earlier = inner.error.take();
        if let Some(err) = earlier.take_if(|_| !together) {
            return Err(err);
        }
        let report = |earlier: Option<Error>, saved: bool| earlier.map_or(Ok(saved), Err);
        let taken = |inner: &Inner| {
            inner.known.contains_key(&step) || inner.writing.contains(&step) || inner.durable_known.contains_key(&step)
        };
        if matches!(call, Call::OnStep) && taken(&inner) {
            return report(earlier, false);
        }
        let (temporary, upload) = match call {
            Call::Save => (req.temporary, self.shared.durable.is_some()),
            Call::OnStep => match self.decide(&inner, step, req.force, preempted) {
                (Decision::Skip, _) => return report(earlier, false),
                (Decision::Save { temporary }, upload) => (temporary, upload),
            },
        };
        let upload = match (upload, preempted) {
            (false, _) => Upload::No,
            (true, false) => Upload::Queue,
            (true, true) => Upload::First,
        };
        while inner.saves_in_flight >= self.max_in_flight && (together || inner.error.is_none()) {
            inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(err) = inner.error.take() {
            if !together {
                return Err(err);
            }
            earlier.get_or_insert(err);
        }
        // Already committed or being written: nothing new to save, even when forced.
        if taken(&inner) {
            return match call {
                Call::OnStep => report(earlier, false),
                Call::Save => Err(earlier.unwrap_or_else(|| {
                    Error::new(
                        ErrorKind::AlreadyExists,
                        format!("checkpoint already saved step={step} run=`{}`", self.shared.run.location().uri()),
                    )
                })),
            };
        }
        let before = inner.facts();
        inner.last_step = Some(inner.last_step.map_or(step, |s| s.max(step)));
        inner.last_save_at = self.clock.now();
        if upload != Upload::No {
            inner.durable_last = (Some(inner.durable_last.0.map_or(step, |s| s.max(step))), inner.last_save_at);
        }
        inner.writing.insert(step);
        inner.saves_in_flight += 1;
        let booked = inner.facts();
        let started = inner.last_save_at;
        drop(inner);
        let mut booking = Booking { shared: &self.shared, step, before, booked, armed: true };

        MAKING.set(true);
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make(&mut req)));
        MAKING.set(false);
        let mut opts = self.save_template.clone();
        opts.step = Some(step);
        opts.temporary = temporary;
        let handover = match made {
            Ok(Ok(handover)) => handover,
            Ok(Err(err)) => {
                if together {
                    // The other ranks save this step: they must not wait for this one,
                    // and their policy counts it as saved, so this rank's does too. In
                    // turn with the saves before it (their collectives run in order).
                    booking.keep_decision();
                    let reason = Error::new(err.kind(), err.full_message());
                    match self.async_save {
                        true => self.shared.enqueue(Job::Refuse { opts, reason, upload }),
                        false => drop(self.shared.refuse(&opts, &reason, upload)),
                    }
                    if let Some(earlier) = earlier {
                        self.shared.lock().error.get_or_insert(earlier);
                    }
                }
                return Err(err);
            }
            Err(panic) => std::panic::resume_unwind(panic),
        };
        opts.metrics = req.metrics;
        opts.metadata = req.metadata;
        if self.async_save {
            match handover {
                Handover::Copy(state) if self.snapshotter.is_some() && !preempted => {
                    // Another thread's save may have handed its state over meanwhile.
                    let mut inner = self.shared.snapshots_done(self.shared.lock());
                    inner.busy += 1;
                    let (before, booked) = (booking.before, booking.booked);
                    inner.behind = Some(Behind { step, live: state.clone(), opts, upload, started, before, booked });
                    self.shared.changed.notify_all();
                }
                handover => {
                    let state = match handover {
                        Handover::Copy(state) => state.snapshot_in(&self.shared.snapshots),
                        Handover::Give(state) => state,
                    };
                    opts.snapshot_time = Some(self.clock.now().saturating_sub(started));
                    self.shared.enqueue(Job::Save { step, state, opts, upload });
                }
            }
            booking.hand_over();
        } else {
            booking.hand_over();
            let written = self.shared.write(step, handover, &opts, upload, Some(started));
            self.shared.enqueue(Job::Retain);
            written?;
        }
        if preempted && matches!(call, Call::OnStep) {
            // Uploads go on for the grace period after the preemption save is written, no
            // longer.
            if let Some(durable) = &self.shared.durable {
                let mut inner = self.shared.lock();
                while inner.busy > 0 {
                    inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
                }
                drop(inner);
                let mut deadline = self.upload_deadline.lock().unwrap_or_else(|p| p.into_inner());
                deadline.get_or_insert_with(|| Instant::now() + durable.upload_grace);
            }
            self.wait()?;
        }
        report(earlier, true)
    }

    /// What the policies say of `step` at this moment: whether to save, and whether the
    /// save goes on to the durable tier (with a local tier: the local policy and the
    /// manager's own one each decide; it is temporary only if neither keeps it).
    fn decide(&self, inner: &Inner, step: u64, force: bool, preempted: bool) -> (Decision, bool) {
        // Unmeasured, the first automatic save is due at once, unless a save is under way
        // (its cost will be known when it is written).
        let unmeasured = if inner.saves_in_flight > 0 { Duration::MAX } else { Duration::ZERO };
        let ctx = SaveContext {
            step,
            now: self.clock.now(),
            last_step: inner.last_step,
            last_save_at: inner.last_save_at,
            force,
            preempted,
            auto_interval: inner.cadence.map(|c| c.interval().unwrap_or(unmeasured)),
        };
        let Some(local_policy) = &self.local_policy else {
            return (policy::should_save(&self.policy, &ctx), false);
        };
        let (last_step, last_save_at) = inner.durable_last;
        let local = policy::should_save(local_policy, &ctx);
        let durable = policy::should_save(&self.policy, &SaveContext { last_step, last_save_at, ..ctx });
        let temporary = |d: Decision| !matches!(d, Decision::Save { temporary: false });
        match (local, durable) {
            (Decision::Skip, Decision::Skip) => (Decision::Skip, false),
            (local, durable) => {
                (Decision::Save { temporary: temporary(local) && temporary(durable) }, durable != Decision::Skip)
            }
        }
    }

    /// What recent saves cost and the interval chosen from it, when the policy has an
    /// automatic interval ([`SavePolicy::with_auto_interval`]).
    pub fn cadence(&self) -> Option<Cadence> {
        self.shared.lock().cadence
    }

    /// Blocks until the state handed to the last save has been copied (at once unless
    /// [`ManagerOptions::background_snapshot`] is on): the caller may change its buffers
    /// afterwards. Errors of the save itself are reported as for any async save.
    pub fn wait_snapshot(&self) {
        drop(self.shared.snapshots_done(self.shared.lock()));
    }

    /// Blocks until every queued save, deletion and upload is done (after a preemption
    /// save, uploads only until the local tier's upload grace has passed); returns the
    /// first background error of a save since the last call, if any. An upload's failure
    /// is a cleanup problem ([`take_cleanup_errors`](Self::take_cleanup_errors)): its
    /// checkpoint is committed locally, and the upload is tried again by the next manager.
    pub fn wait(&self) -> Result<()> {
        refuse_in_sink("wait")?;
        let deadline = *self.upload_deadline.lock().unwrap_or_else(|p| p.into_inner());
        let mut inner = self.shared.lock();
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if inner.busy > 0 {
                inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
            } else if !inner.uploads_busy() || left == Some(Duration::ZERO) {
                break;
            } else if let Some(left) = left {
                inner = self.shared.changed.wait_timeout(inner, left).unwrap_or_else(|p| p.into_inner()).0;
            } else {
                inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
            }
        }
        match inner.error.take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// The steps still owed to the durable tier (queued, uploading, or failed and kept
    /// for a later try), in step order; empty without a local tier.
    pub fn pending_uploads(&self) -> Vec<u64> {
        self.shared.lock().owed.iter().copied().collect()
    }

    /// Waits for everything in flight (returning its error, as [`wait`](Self::wait)) and
    /// stops handling the preemption signal: after closing, the signal does what it did
    /// before the manager opened (SIGTERM ends the process again). Saving after closing
    /// still works, without preemption handling.
    pub fn close(&self) -> Result<()> {
        let waited = self.wait();
        if let Some(mut preemption) = self.preemption.lock().unwrap_or_else(|p| p.into_inner()).take() {
            preemption.release();
        }
        waited
    }

    /// The problems of the cleanup that follows committed saves (retention's deletions,
    /// the `LATEST` hint) since the last call, oldest first. They never fail a save: the
    /// checkpoints were committed, each failed step was retried with backoff, and
    /// retention tries deletions again after the next save.
    pub fn take_cleanup_errors(&self) -> Vec<Error> {
        self.shared.lock().cleanup_errors.drain(..).collect()
    }

    /// Loads the checkpoint of `step`, or when `None` the latest committed one (highest
    /// step) once this manager's saves in flight are over, with this rank's own plain
    /// values unless `opts.rank` says otherwise. A copy that cannot be read (gone,
    /// damaged, its store unreachable) is passed over for the same step on the other
    /// tier, then (without a `step`) for older ones (see
    /// [`restore_reporting`](Self::restore_reporting) to learn which).
    /// [`ErrorKind::NotFound`] when there is none. Retention never deletes a checkpoint
    /// while it is being read.
    pub fn restore(&self, step: Option<u64>, opts: &LoadOptions) -> Result<(State, CheckpointInfo)> {
        self.restore_reporting(step, opts).map(|r| (r.state, r.info))
    }

    /// [`restore`](Self::restore), also saying which copies it passed over and why.
    pub fn restore_reporting(&self, step: Option<u64>, opts: &LoadOptions) -> Result<Restored> {
        // Each rank gets back the plain values it saved.
        let opts = LoadOptions { rank: opts.rank.or(Some(self.shared.rank)), ..opts.clone() };
        self.restore_with(step, |checkpoint| checkpoint.load(&opts))
    }

    /// [`restore_reporting`](Self::restore_reporting) with the caller's own load of each
    /// copy tried (a load into a target the caller holds, say): `load` is given the
    /// opened checkpoint, kept from retention meanwhile; its errors are judged as a
    /// load's (a damaged copy is passed over, the caller's error is returned).
    pub fn restore_with<T>(
        &self,
        step: Option<u64>,
        mut load: impl FnMut(&crate::load::Checkpoint) -> Result<T>,
    ) -> Result<Restored<T>> {
        refuse_in_sink("restore")?;
        if let (true, Some(all_gather)) = (self.shared.parted(), self.shared.all_gather.clone()) {
            return self.restore_together(step, &all_gather, load);
        }
        self.take_error()?;
        if step.is_none() {
            self.settle()?;
        }
        let (copies, mut passed_over) = self.copies(step)?;
        // Once a copy's store could not be reached, only the same step's other copy may
        // stand in: an older step would silently lose progress over a passing outage.
        let mut only_step = None;
        for copy in copies {
            if only_step.is_some_and(|s| s != copy.step) {
                continue;
            }
            let err = match self.try_copy(&copy, &mut load, &passed_over) {
                Ok((state, info)) => {
                    self.forget_parts_after(info.step, step);
                    return Ok(Restored { state, info, passed_over });
                }
                Err((CopyFailure::Caller, err)) => return Err(err),
                Err((CopyFailure::Unreachable, err)) => {
                    only_step = Some(copy.step);
                    err
                }
                Err((CopyFailure::Damaged, err)) => err,
                Err((CopyFailure::Gone, _)) => continue,
            };
            passed_over.push(err);
        }
        Err(self.none_restored(step, passed_over))
    }

    /// Loads `copy` with `load`, kept from retention meanwhile, and reports it (with the
    /// copies `passed_over` before it); on failure says what the failure means for the
    /// other copies.
    fn try_copy<T>(
        &self,
        copy: &CheckpointCopy,
        load: &mut impl FnMut(&crate::load::Checkpoint) -> Result<T>,
        passed_over: &[Error],
    ) -> std::result::Result<(T, CheckpointInfo), (CopyFailure, Error)> {
        let reading = self.begin_reading(copy.step);
        let timer = Instant::now();
        let (opening, part, result) = match copy.run.checkpoint(copy.step) {
            Ok(c) => (false, c.manifest().part.is_some(), load(&c).map(|state| (state, c.info()))),
            Err(e) => (true, false, Err(e)),
        };
        drop(reading);
        let mut event = Event::new(Operation::Load, copy.tier, copy.step, copy.run.step_location(copy.step).uri())
            .with_phase(Phase::Read, timer.elapsed())
            .with_bytes(result.as_ref().map_or(0, |(_, info)| info.tensor_bytes))
            .with_outcome(&result);
        let messages: Vec<String> = passed_over.iter().map(Error::full_message).collect();
        event.detail =
            (!messages.is_empty() && result.is_ok()).then(|| format!("passed over: {}", messages.join("; ")));
        self.shared.sinks.emit(event);
        result.map_err(|err| match err.kind() {
            // A rank's part lacks what this load asks for (whole tensors, say): not damage,
            // only not a copy that serves it.
            ErrorKind::Incompatible if part => (CopyFailure::Gone, err),
            _ => (copy_failure(&err, opening, &copy.run, copy.step), err),
        })
    }

    /// A restore in a multi-rank job whose ranks each have a local tier of their own: the
    /// ranks agree through the job's collectives on the newest step every rank can load
    /// (from its own part, or from the durable run), each loads it, local part first; if
    /// a rank cannot, every rank passes over that step together, so that all of them
    /// resume from the same one. A copy that cannot be reached stops the restore on every
    /// rank, never stepping back past it (as alone).
    fn restore_together<T>(
        &self,
        step: Option<u64>,
        all_gather: &AllGather,
        mut load: impl FnMut(&crate::load::Checkpoint) -> Result<T>,
    ) -> Result<Restored<T>> {
        // A rank that cannot restore still joins every round, so that none waits for it.
        let ready = self.take_error().and_then(|()| if step.is_none() { self.settle() } else { Ok(()) });
        let mut passed_over = Vec::new();
        let durable = self.run();
        let mine = match &ready {
            Err(err) => tier::Holding::refused(step, err),
            Ok(()) => {
                let local = self.shared.run.list().unwrap_or_else(|err| {
                    passed_over.push(err);
                    Vec::new()
                });
                let listed = durable.list().map_err(|err| passed_over.push(err)).ok();
                tier::Holding::of(step, &local, listed.as_deref())
            }
        };
        let all: Vec<tier::Holding> = gather(all_gather, self.shared.world_size, &mine)?;
        ready?;
        let candidates = tier::agreed_steps(&all)?;
        let rank = self.shared.rank as usize;
        for (s, durable_has) in candidates {
            let copies =
                [(Tier::Local, &self.shared.run, all[rank].has_local(s)), (Tier::Durable, durable, durable_has)];
            let mut verdict = tier::Verdict::Skip;
            let mut loaded = None;
            for (tier, run, _) in copies.into_iter().filter(|(_, _, held)| *held) {
                let copy = CheckpointCopy { step: s, tier, run: run.clone() };
                match self.try_copy(&copy, &mut load, &passed_over) {
                    Ok(done) => {
                        loaded = Some(done);
                        verdict = tier::Verdict::Loaded;
                        break;
                    }
                    Err((CopyFailure::Gone, _)) => {}
                    Err((CopyFailure::Damaged, err)) => passed_over.push(err),
                    Err((CopyFailure::Unreachable | CopyFailure::Caller, err)) => {
                        verdict = tier::Verdict::Stop(err.kind(), err.full_message());
                        passed_over.push(err);
                        break;
                    }
                }
            }
            let verdicts: Vec<tier::Verdict> = gather(all_gather, self.shared.world_size, &verdict)?;
            if let Some((r, kind, message)) = tier::stopped(&verdicts) {
                if r == rank {
                    return Err(passed_over.pop().unwrap_or_else(|| Error::new(kind, message)));
                }
                return Err(Error::new(kind, format!("rank {r} could not restore step={s}: {message}")));
            }
            match (loaded, verdicts.iter().all(|v| *v == tier::Verdict::Loaded)) {
                (Some((state, info)), true) => {
                    self.forget_parts_after(s, step);
                    return Ok(Restored { state, info, passed_over });
                }
                // This rank could load the step, other ranks could not: say why it resumes
                // from an older one.
                (Some(_), false) => {
                    let missing: Vec<usize> = verdicts
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| **v != tier::Verdict::Loaded)
                        .map(|(r, _)| r)
                        .collect();
                    passed_over.push(Error::new(
                        ErrorKind::Corrupt,
                        format!("step {s} passed over by every rank: ranks {missing:?} could not load it"),
                    ));
                }
                (None, _) => {}
            }
        }
        Err(self.none_restored(step, passed_over))
    }

    /// With local tiers of each rank's own, after a restore of the newest step (`asked`
    /// none) resumed from `step`: removes this rank's parts of later steps, with their
    /// owed uploads (an upload of one already running is let finish first). They belong
    /// to a timeline the job just left; kept, a later save would skip their steps and an
    /// upload or restore could mix them with another rank's new parts. A restore of a
    /// step asked for (to evaluate it, say) removes nothing. A failure to remove one is
    /// a cleanup problem.
    fn forget_parts_after(&self, step: u64, asked: Option<u64>) {
        if !self.shared.parted() || asked.is_some() {
            return;
        }
        let newer: Vec<u64> = self.shared.lock().known.range(step + 1..).map(|(s, _)| *s).collect();
        for s in newer {
            let mut inner = self.shared.lock();
            inner.uploads.retain(|&queued| queued != s);
            inner.refusals.remove(&s);
            while inner.uploading == Some(s) {
                inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
            }
            inner.owed.remove(&s);
            inner.held.remove(&s);
            drop(inner);
            let removed =
                retried(|| tier::unmark(&self.shared.run, s)).and_then(|()| retried(|| self.shared.run.delete(s)));
            let mut inner = self.shared.lock();
            match removed {
                Ok(()) => drop(inner.known.remove(&s)),
                Err(err) => {
                    drop(inner);
                    self.shared.cleanup_failed(err);
                }
            }
        }
    }

    /// The error of a restore that found nothing to load (`passed_over`: why each copy
    /// tried failed, newest first).
    fn none_restored(&self, step: Option<u64>, passed_over: Vec<Error>) -> Error {
        let shown = self.run().location().uri();
        let asked = step.map_or(String::new(), |s| format!(" step={s}"));
        let mut failures = passed_over.into_iter();
        match failures.next() {
            None => Error::not_found(format!("no committed checkpoint{asked} run=`{shown}`")),
            Some(newest) if failures.len() == 0 => newest,
            Some(newest) => Error::new(
                newest.kind(),
                format!(
                    "no copy could be restored ({} more failed){asked} run=`{shown}`: {}",
                    failures.len(),
                    newest.full_message()
                ),
            ),
        }
    }

    /// The copies a restore tries, in order: those of `step` (one per tier), or every
    /// committed checkpoint, newest first, of one step the local copy first; and the
    /// tiers that could not be listed (the other may still serve).
    fn copies(&self, step: Option<u64>) -> Result<(Vec<CheckpointCopy>, Vec<Error>)> {
        let mut copies = Vec::new();
        let mut unlisted = Vec::new();
        let mut tiers = self.tiers();
        // Ranks with local tiers of their own and no collectives to agree through: only
        // the durable tier, where every rank finds the same checkpoints.
        if self.shared.parted() {
            tiers.retain(|(tier, _)| *tier == Tier::Durable);
        }
        for &(tier, run) in &tiers {
            match step {
                Some(step) => copies.push(CheckpointCopy { step, tier, run: run.clone() }),
                None => match run.list() {
                    Ok(listed) => copies.extend(listed.into_iter().map(|c| CheckpointCopy {
                        step: c.step,
                        tier,
                        run: run.clone(),
                    })),
                    Err(e) if tiers.len() > 1 => unlisted.push(e),
                    Err(e) => return Err(e),
                },
            }
        }
        copies.sort_by_key(|c| (std::cmp::Reverse(c.step), c.tier != Tier::Local));
        Ok((copies, unlisted))
    }

    /// Keeps retention (of either tier) off `step` until the guard is dropped.
    fn begin_reading(&self, step: u64) -> Reading<'_> {
        *self.shared.lock().reading.entry(step).or_default() += 1;
        Reading { shared: &self.shared, step }
    }

    /// Waits until this manager's saves in flight and queued work are over; returns the
    /// error of a failed one (the worker records it before it counts the job done).
    fn settle(&self) -> Result<()> {
        let mut inner = self.shared.lock();
        while inner.saves_in_flight > 0 || inner.busy > 0 {
            inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        match inner.error.take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// The highest committed step on any tier, if any (read from the stores, not from a
    /// hint); with a local tier of each rank's own (several ranks), the durable run's,
    /// which every rank shares.
    pub fn latest_step(&self) -> Result<Option<u64>> {
        if self.shared.parted() {
            // Each rank's local parts are its own: the durable run is what all ranks share.
            return Ok(self.run().latest()?.map(|c| c.manifest().step));
        }
        let mut latest = None;
        for (_, run) in self.tiers() {
            latest = latest.max(run.latest()?.map(|c| c.manifest().step));
        }
        Ok(latest)
    }

    /// The highest committed step once this manager's saves in flight and queued work
    /// are over (each rank's save returns only once rank 0 committed or failed it, so
    /// every rank of a job then finds the same step); returns the error of a failed one.
    pub fn settled_latest_step(&self) -> Result<Option<u64>> {
        self.settle()?;
        self.latest_step()
    }

    /// Every committed checkpoint, in step order; with a local tier, those of both tiers
    /// (the local copy of a step first; `uri` tells them apart).
    pub fn list(&self) -> Result<Vec<CheckpointInfo>> {
        let mut all = Vec::new();
        for (_, run) in self.tiers() {
            all.extend(run.infos()?);
        }
        all.sort_by_key(|info| info.step);
        Ok(all)
    }

    /// Deletes every checkpoint of the run, on every tier (after waiting for work in
    /// flight), and forgets the uploads owed.
    pub fn reset(&self) -> Result<()> {
        self.wait()?;
        *self.shared.hinted.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(durable) = &self.shared.durable {
            *durable.hinted.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        for (_, run) in self.tiers() {
            for c in run.list()? {
                run.delete(c.step)?;
            }
            run.remove_latest_hint()?;
        }
        if self.shared.durable.is_some() {
            for step in tier::marked(&self.shared.run)? {
                tier::unmark(&self.shared.run, step)?;
            }
        }
        let mut inner = self.shared.lock();
        inner.known.clear();
        inner.durable_known.clear();
        inner.owed.clear();
        inner.held.clear();
        inner.uploads.clear();
        inner.refusals.clear();
        inner.last_step = None;
        inner.durable_last.0 = None;
        Ok(())
    }

    fn take_error(&self) -> Result<()> {
        match self.shared.lock().error.take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

impl Drop for CheckpointManager {
    /// Flushes: waits for saves and deletions in flight, releases the preemption signal,
    /// then stops the worker.
    fn drop(&mut self) {
        let _ = self.close();
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        // The snapshot thread first: it queues what it copies for the worker.
        if let Some(snapshotter) = self.snapshotter.take() {
            let _ = snapshotter.join();
        }
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        // An upload still running past a preemption's grace is left to finish on its own
        // (the process is about to end; its marker lets the next manager finish it).
        if let Some(uploader) = self.uploader.take().filter(|_| !self.shared.lock().uploads_busy()) {
            let _ = uploader.join();
        }
    }
}

/// What a restore's failure on one copy says.
enum CopyFailure {
    /// The copy is not there (deleted, or never on this tier): no damage to report.
    Gone,
    /// The copy is damaged or of an unknown format: any other copy may serve.
    Damaged,
    /// Its store could not be reached or refused access: the same step's other copy may
    /// serve, an older step may not.
    Unreachable,
    /// The caller's own error (a key the checkpoint lacks, bad options): reported.
    Caller,
}

/// Every rank's `mine`, in rank order, through the job's collective.
fn gather<M: serde::Serialize + serde::de::DeserializeOwned>(
    all_gather: &AllGather,
    world_size: u32,
    mine: &M,
) -> Result<Vec<M>> {
    let bytes = serde_json::to_vec(mine)
        .map_err(|e| Error::invalid("cannot encode a message for the other ranks").with_source(e))?;
    let all = all_gather(bytes)?;
    if all.len() != world_size as usize {
        return Err(Error::invalid(format!("the collective gathered {} messages from {world_size} ranks", all.len())));
    }
    all.iter()
        .enumerate()
        .map(|(r, b)| {
            serde_json::from_slice(b)
                .map_err(|e| Error::corrupt(format!("unreadable message from rank {r}")).with_source(e))
        })
        .collect()
}

/// Refuses a call into the manager from one of its event sinks (the sink runs on a
/// thread the call may wait for).
fn refuse_in_sink(call: &str) -> Result<()> {
    match crate::telemetry::in_sink() {
        true => Err(Error::invalid(format!(
            "an event sink cannot call the manager's {call}: it runs on the manager's own threads"
        ))),
        false => Ok(()),
    }
}

/// Classifies a restore's failure `err` on the copy of `step` in `run`, met while
/// `opening` it or while loading it.
fn copy_failure(err: &Error, opening: bool, run: &Run, step: u64) -> CopyFailure {
    match err.kind() {
        ErrorKind::Corrupt | ErrorKind::Incompatible => CopyFailure::Damaged,
        ErrorKind::Unavailable | ErrorKind::Permission => CopyFailure::Unreachable,
        ErrorKind::NotFound if opening => CopyFailure::Gone,
        // Deleted while it was read, not a missing key: what opening it again says.
        ErrorKind::NotFound => match run.checkpoint(step).map_err(|e| e.kind()) {
            Ok(_) => CopyFailure::Caller,
            Err(ErrorKind::NotFound) => CopyFailure::Gone,
            Err(ErrorKind::Unavailable | ErrorKind::Permission) => CopyFailure::Unreachable,
            Err(_) => CopyFailure::Damaged,
        },
        _ => CopyFailure::Caller,
    }
}

/// The snapshot thread of a manager with [`ManagerOptions::background_snapshot`]: copies
/// each live state handed to it, then queues its save (already counted as busy).
fn snapshot_work(shared: &Shared) {
    loop {
        let Behind { step, live, mut opts, upload, started, before, booked } = {
            let mut inner = shared.lock();
            loop {
                if let Some(behind) = inner.behind.take() {
                    inner.snapshotting = true;
                    break behind;
                }
                if inner.shutdown {
                    return;
                }
                inner = shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
            }
        };
        let copied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (live.snapshot_in(&shared.snapshots), shared.clock.now().saturating_sub(started))
        }));
        // The caller's buffers are let go before it is told the copy is done, and outside
        // the lock: releasing a Python caller's buffers takes the GIL (every wait for a
        // snapshot is made with the GIL released).
        drop(live);
        let mut inner = shared.lock();
        inner.snapshotting = false;
        match copied {
            Ok((state, took)) => {
                opts.snapshot_time = Some(took);
                inner.queue.push_back(Job::Save { step, state, opts, upload });
            }
            // Nothing to write: the save fails, its step and slot are free again (alone,
            // the policy sees the last save as before; in a job the step counts as saved,
            // as on the other ranks, which are told at once rather than left waiting).
            Err(_) => {
                let reason =
                    || Error::new(ErrorKind::Internal, format!("copying the state to save panicked step={step}"));
                if shared.world_size > 1 {
                    inner.unbook(step, booked, booked);
                    inner.queue.push_back(Job::Refuse { opts, reason: reason(), upload });
                } else {
                    inner.unbook(step, before, booked);
                    inner.busy -= 1;
                }
                inner.error.get_or_insert(reason());
            }
        }
        shared.changed.notify_all();
    }
}

fn work(shared: &Shared) {
    loop {
        let job = {
            let mut inner = shared.lock();
            loop {
                if let Some(job) = inner.queue.pop_front() {
                    break job;
                }
                if inner.shutdown {
                    return;
                }
                inner = shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
            }
        };
        let saved = match job {
            Job::Save { step, state, opts, upload } => shared.write(step, Handover::Give(state), &opts, upload, None),
            Job::Retain => Ok(()),
            // The refusing rank's call already reported its reason.
            Job::Refuse { opts, reason, upload } => {
                drop(shared.refuse(&opts, &reason, upload));
                Ok(())
            }
            Job::Prune(grace) => {
                if let Err(err) = retried(|| shared.run.prune_orphans(grace)) {
                    shared.cleanup_failed(err);
                }
                Ok(())
            }
        };
        if saved.is_ok() {
            apply_retention(shared);
        }
        let mut inner = shared.lock();
        if let Err(err) = saved {
            inner.error.get_or_insert(err);
        }
        inner.busy -= 1;
        shared.changed.notify_all();
    }
}

/// Deletes what retention no longer keeps; a deletion the store keeps failing is a
/// cleanup problem, tried again the next time retention runs.
fn apply_retention(shared: &Shared) {
    if !shared.owns_run() {
        return;
    }
    let (doomed, known_latest) = {
        let inner = shared.lock();
        let candidates: Vec<Candidate> = inner.known.values().cloned().collect();
        // A local checkpoint still owed to the durable tier stays until it is uploaded.
        let protected: BTreeSet<u64> =
            inner.writing.iter().chain(inner.reading.keys()).chain(&inner.owed).copied().collect();
        (policy::to_delete(&shared.retention, &candidates, &protected), inner.known.keys().next_back().copied())
    };
    for step in doomed {
        if Some(step) == known_latest || shared.lock().reading.contains_key(&step) {
            continue;
        }
        if shared.delete(&shared.run, shared.save_tier(), step) {
            shared.lock().known.remove(&step);
        }
    }
}

/// The uploader of a manager with a local tier: uploads the steps queued, one at a time,
/// until the manager shuts down.
fn upload_work(shared: &Shared) {
    let Some(durable) = &shared.durable else { return };
    // What unfinished uploads left in the durable run, removed before this uploader
    // resumes any (they may resume from files an earlier try left) and by the rank that
    // coordinates them.
    if let Some(grace) = durable.orphan_grace.filter(|_| shared.leads()) {
        if let Err(err) = retried(|| durable.run.prune_orphans(grace)) {
            shared.cleanup_failed(err);
        }
    }
    loop {
        let step = {
            let mut inner = shared.lock();
            loop {
                if inner.shutdown {
                    return;
                }
                if let Some(step) = inner.uploads.pop_front() {
                    // Queued twice, or no longer owed (a reset): nothing to do.
                    let wanted = inner.owed.contains(&step) || inner.refusals.contains_key(&step);
                    if !wanted || inner.uploading == Some(step) {
                        continue;
                    }
                    inner.uploading = Some(step);
                    break step;
                }
                inner = shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
            }
        };
        shared.upload(durable, step);
        // The local tier's retention may now drop the uploaded checkpoint: queued in the
        // same breath as the upload ends, so that waiting sees one or the other.
        let mut inner = shared.lock();
        inner.uploading = None;
        inner.busy += 1;
        inner.queue.push_back(Job::Retain);
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_judges_each_failure_by_what_it_says_of_the_copy() {
        let run = Run::create("memory://copy-failure/run").unwrap();
        let judged = |kind, opening| copy_failure(&Error::new(kind, "x"), opening, &run, 1);
        assert!(matches!(judged(ErrorKind::Corrupt, false), CopyFailure::Damaged));
        assert!(matches!(judged(ErrorKind::Incompatible, true), CopyFailure::Damaged));
        assert!(matches!(judged(ErrorKind::Unavailable, false), CopyFailure::Unreachable));
        assert!(matches!(judged(ErrorKind::Permission, true), CopyFailure::Unreachable));
        assert!(matches!(judged(ErrorKind::NotFound, true), CopyFailure::Gone));
        // Not found while loading a checkpoint that is no longer there: deleted meanwhile.
        assert!(matches!(judged(ErrorKind::NotFound, false), CopyFailure::Gone));
        let mut state = State::new();
        state.insert_tensor("w", crate::Tensor::new(crate::DType::U8, vec![1], vec![7]).unwrap());
        run.save(&state, &SaveOptions::default().with_step(1)).unwrap();
        // ... while it is still there: a key the caller asked for and it lacks.
        assert!(matches!(judged(ErrorKind::NotFound, false), CopyFailure::Caller));
        assert!(matches!(judged(ErrorKind::Invalid, false), CopyFailure::Caller));
        assert!(matches!(judged(ErrorKind::Internal, true), CopyFailure::Caller));
    }
}
