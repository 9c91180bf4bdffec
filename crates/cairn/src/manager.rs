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
            preemption_signal: Some(signal_hook::consts::SIGTERM),
            clock: Arc::new(SystemClock::default()),
            save: SaveOptions::default().with_incremental(true),
            rank: 0,
            world_size: 1,
            coordination_timeout: Duration::from_secs(600),
            all_gather: None,
            orphan_grace: Some(DEFAULT_ORPHAN_GRACE),
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
    },
    Retain,
    /// Take part in the other ranks' save without a state (see [`Shared::refuse`]).
    Refuse {
        opts: SaveOptions,
        reason: Error,
    },
    /// Remove leftovers of unfinished saves older than this.
    Prune(Duration),
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Job>,
    /// Jobs queued or running.
    busy: usize,
    /// Save jobs queued or running.
    saves_in_flight: usize,
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
    /// How long each asynchronous save in flight stalled the loop, until it is written.
    stalls: BTreeMap<u64, Duration>,
}

struct Shared {
    run: Run,
    retention: Retention,
    /// The step the `LATEST` hint names, as this manager last wrote it.
    hinted: Mutex<Option<u64>>,
    rank: u32,
    world_size: u32,
    coordination_timeout: Duration,
    all_gather: Option<AllGather>,
    /// The manager's clock (save costs are measured with it).
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Saves and commits one checkpoint: alone, or together with the other ranks.
    fn save(&self, state: &State, opts: &SaveOptions) -> Result<CheckpointInfo> {
        self.with_ranks(|ranks, exchange| dist::save_as_rank(self.run.location(), state, opts, ranks, exchange))
    }

    /// Takes part in the other ranks' save of `opts.step` with this rank's `reason` for
    /// having no state: they fail it at once instead of waiting for this rank. Returns
    /// the error every rank gets, naming this one (this rank reports its own reason).
    fn refuse(&self, opts: &SaveOptions, reason: &Error) -> Error {
        self.with_ranks(|ranks, exchange| dist::refuse_as_rank(self.run.location(), opts, ranks, exchange, reason))
    }

    /// Calls `f` with this manager's ranks and the exchange of the job's collectives, if any.
    fn with_ranks<T>(&self, f: impl FnOnce(Ranks, Option<&mut dyn dist::Exchange>) -> T) -> T {
        let ranks = Ranks { rank: self.rank, world_size: self.world_size, timeout: self.coordination_timeout };
        match &self.all_gather {
            Some(all_gather) => {
                let mut exchange = CallbackExchange::new(self.rank, self.world_size, |payload| all_gather(payload));
                f(ranks, Some(&mut exchange))
            }
            None => f(ranks, None),
        }
    }

    /// Whether this process deletes checkpoints and writes the hint (rank 0 only).
    fn leads(&self) -> bool {
        self.rank == 0
    }

    /// Writes the booked save of `step` and does what follows, the one path of sync and
    /// async saves alike: the state is dropped (its memory free for the next snapshot),
    /// then the booking is released, even if the save panics; on a commit retention learns
    /// of the checkpoint and, when it is the newest, the run's `LATEST` hint names it (a
    /// failure of the hint is a cleanup problem, never the save's).
    fn write(&self, step: u64, state: Handover<'_>, opts: &SaveOptions) -> Result<()> {
        let booking = Release { shared: self, step };
        let started = self.clock.now();
        let result = self.save(state.state(), opts);
        let writing = self.clock.now().saturating_sub(started);
        drop(state);
        drop(booking);
        let stall = self.lock().stalls.remove(&step);
        let info = result?;
        let newest = {
            let mut inner = self.lock();
            // An asynchronous save's cost: its stall, and the write that followed.
            if let (Some(cadence), Some(stall)) = (inner.cadence.as_mut(), stall) {
                cadence.record(stall, stall + writing);
            }
            inner.known.insert(step, Candidate::from_info(&info, self.retention.metric()));
            inner.known.keys().next_back() == Some(&step)
        };
        if newest && self.leads() {
            // Hints are written one at a time and never name an older step than the last.
            let mut hinted = self.hinted.lock().unwrap_or_else(|p| p.into_inner());
            if hinted.is_none_or(|h| h < step) {
                match retried(|| self.run.write_latest_hint(&info)) {
                    Ok(()) => *hinted = Some(step),
                    Err(err) => self.cleanup_failed(err),
                }
            }
        }
        Ok(())
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
    /// The policy's facts before the booking, and as the booking set them.
    before: (Option<u64>, Duration),
    booked: (Option<u64>, Duration),
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
        let mut inner = self.shared.lock();
        // Restored unless a later booking moved them on meanwhile.
        if inner.last_step == self.booked.0 {
            inner.last_step = self.before.0;
        }
        if inner.last_save_at == self.booked.1 {
            inner.last_save_at = self.before.1;
        }
        inner.writing.remove(&self.step);
        inner.saves_in_flight -= 1;
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
    /// Memory for snapshots, reused from one async save to the next.
    snapshots: ArenaPool,
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
        let mut known = BTreeMap::new();
        for info in run.infos()? {
            known.insert(info.step, Candidate::from_info(&info, opts.retention.metric()));
        }
        let preempted = Arc::new(AtomicBool::new(false));
        let preemption =
            opts.preemption_signal.map(|signal| Preemption::install(signal, preempted.clone())).transpose()?;
        let inner = Inner {
            last_step: known.keys().next_back().copied(),
            last_save_at: opts.clock.now(),
            known,
            cadence: opts.policy.auto_interval_mtbf().map(Cadence::new),
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            run,
            retention: opts.retention.clone(),
            hinted: Mutex::new(None),
            rank: opts.rank,
            world_size: opts.world_size,
            coordination_timeout: opts.coordination_timeout,
            all_gather: opts.all_gather.clone(),
            clock: opts.clock.clone(),
            inner: Mutex::new(inner),
            changed: Condvar::new(),
        });
        let worker_shared = shared.clone();
        let worker = std::thread::Builder::new()
            .name("cairn-manager".into())
            .spawn(move || work(&worker_shared))
            .map_err(|e| Error::new(ErrorKind::Unavailable, "cannot start manager thread").with_source(e))?;
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
            snapshots: ArenaPool::default(),
        };
        manager.enqueue(Job::Retain);
        if let Some(grace) = opts.orphan_grace.filter(|_| manager.shared.leads()) {
            manager.enqueue(Job::Prune(grace));
        }
        Ok(manager)
    }

    /// The run this manager writes.
    pub fn run(&self) -> &Run {
        &self.shared.run
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
    /// snapshotted; after a preemption save it also waits until everything is durable.
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
    /// its buffers); otherwise once the checkpoint is committed.
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
        let preempted = self.preempted();
        // A rank of a job takes part in every save the policy gives it, even when this
        // call reports an earlier background failure (the other ranks would wait for it
        // otherwise, or pair their collectives with its next save): the failure is
        // returned once the save is under way. Alone, the call stops at the failure.
        let together = self.shared.world_size > 1;
        let mut inner = self.shared.lock();
        let mut earlier = inner.error.take();
        if let Some(err) = earlier.take_if(|_| !together) {
            return Err(err);
        }
        let report = |earlier: Option<Error>, saved: bool| earlier.map_or(Ok(saved), Err);
        let taken = |inner: &Inner| inner.known.contains_key(&step) || inner.writing.contains(&step);
        if matches!(call, Call::OnStep) && taken(&inner) {
            return report(earlier, false);
        }
        let temporary = match call {
            Call::Save => req.temporary,
            Call::OnStep => match self.decide(&inner, step, req.force, preempted) {
                Decision::Skip => return report(earlier, false),
                Decision::Save { temporary } => temporary,
            },
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
        let before = (inner.last_step, inner.last_save_at);
        inner.last_step = Some(inner.last_step.map_or(step, |s| s.max(step)));
        inner.last_save_at = self.clock.now();
        inner.writing.insert(step);
        inner.saves_in_flight += 1;
        let booked = (inner.last_step, inner.last_save_at);
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
                        true => self.enqueue(Job::Refuse { opts, reason }),
                        false => drop(self.shared.refuse(&opts, &reason)),
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
        let stalled = || self.clock.now().saturating_sub(started);
        if self.async_save {
            let state = match handover {
                Handover::Copy(state) => state.snapshot_in(&self.snapshots),
                Handover::Give(state) => state,
            };
            let stall = stalled();
            let mut inner = self.shared.lock();
            if inner.cadence.is_some() {
                inner.stalls.insert(step, stall);
            }
            drop(inner);
            self.enqueue(Job::Save { step, state, opts });
            booking.hand_over();
        } else {
            booking.hand_over();
            let written = self.shared.write(step, handover, &opts);
            if written.is_ok() {
                // A synchronous save stalls the loop for all of it.
                let stall = stalled();
                if let Some(cadence) = self.shared.lock().cadence.as_mut() {
                    cadence.record(stall, stall);
                }
            }
            self.enqueue(Job::Retain);
            written?;
        }
        if preempted && matches!(call, Call::OnStep) {
            self.wait()?;
        }
        report(earlier, true)
    }

    /// What the policy says of `step` at this moment.
    fn decide(&self, inner: &Inner, step: u64, force: bool, preempted: bool) -> Decision {
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
        policy::should_save(&self.policy, &ctx)
    }

    /// What recent saves cost and the interval chosen from it, when the policy has an
    /// automatic interval ([`SavePolicy::with_auto_interval`]).
    pub fn cadence(&self) -> Option<Cadence> {
        self.shared.lock().cadence
    }

    /// Blocks until every queued save and deletion is done; returns the first background
    /// error since the last call, if any.
    pub fn wait(&self) -> Result<()> {
        let mut inner = self.shared.lock();
        while inner.busy > 0 {
            inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        match inner.error.take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
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
    /// values unless `opts.rank` says otherwise.
    /// [`ErrorKind::NotFound`] when there is none. Retention never deletes a checkpoint
    /// while it is being read.
    pub fn restore(&self, step: Option<u64>, opts: &LoadOptions) -> Result<(State, CheckpointInfo)> {
        self.take_error()?;
        let step = match step {
            Some(step) => step,
            None => self.settled_latest_step()?.ok_or_else(|| {
                Error::not_found(format!("no committed checkpoint run=`{}`", self.shared.run.location().uri()))
            })?,
        };
        // Each rank gets back the plain values it saved.
        let opts = LoadOptions { rank: opts.rank.or(Some(self.shared.rank)), ..opts.clone() };
        *self.shared.lock().reading.entry(step).or_default() += 1;
        let result = self.shared.run.checkpoint(step).and_then(|c| Ok((c.load(&opts)?, c.info())));
        let mut inner = self.shared.lock();
        if let Some(count) = inner.reading.get_mut(&step) {
            *count -= 1;
            if *count == 0 {
                inner.reading.remove(&step);
            }
        }
        result
    }

    /// The highest committed step, if any (read from the store, not from a hint).
    pub fn latest_step(&self) -> Result<Option<u64>> {
        Ok(self.shared.run.latest()?.map(|c| c.manifest().step))
    }

    /// The highest committed step once this manager's saves in flight and queued work
    /// are over (each rank's save returns only once rank 0 committed or failed it, so
    /// every rank of a job then finds the same step); returns the error of a failed one
    /// (the worker records it before it counts the job done).
    pub fn settled_latest_step(&self) -> Result<Option<u64>> {
        let mut inner = self.shared.lock();
        while inner.saves_in_flight > 0 || inner.busy > 0 {
            inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(err) = inner.error.take() {
            return Err(err);
        }
        drop(inner);
        self.latest_step()
    }

    /// Every committed checkpoint, in step order.
    pub fn list(&self) -> Result<Vec<CheckpointInfo>> {
        self.shared.run.infos()
    }

    /// Deletes every checkpoint of the run (after waiting for work in flight).
    pub fn reset(&self) -> Result<()> {
        self.wait()?;
        let run = &self.shared.run;
        for c in run.list()? {
            run.delete(c.step)?;
        }
        run.remove_latest_hint()?;
        let mut inner = self.shared.lock();
        inner.known.clear();
        inner.last_step = None;
        Ok(())
    }

    fn take_error(&self) -> Result<()> {
        match self.shared.lock().error.take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    fn enqueue(&self, job: Job) {
        let mut inner = self.shared.lock();
        inner.busy += 1;
        inner.queue.push_back(job);
        self.shared.changed.notify_all();
    }
}

impl Drop for CheckpointManager {
    /// Flushes: waits for saves and deletions in flight, releases the preemption signal,
    /// then stops the worker.
    fn drop(&mut self) {
        let _ = self.close();
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
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
            Job::Save { step, state, opts } => shared.write(step, Handover::Give(state), &opts),
            Job::Retain => Ok(()),
            // The refusing rank's call already reported its reason.
            Job::Refuse { opts, reason } => {
                drop(shared.refuse(&opts, &reason));
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
    if !shared.leads() {
        return;
    }
    let (doomed, known_latest) = {
        let inner = shared.lock();
        let candidates: Vec<Candidate> = inner.known.values().cloned().collect();
        let protected: BTreeSet<u64> = inner.writing.iter().chain(inner.reading.keys()).copied().collect();
        (policy::to_delete(&shared.retention, &candidates, &protected), inner.known.keys().next_back().copied())
    };
    for step in doomed {
        if Some(step) == known_latest || shared.lock().reading.contains_key(&step) {
            continue;
        }
        match retried(|| shared.run.delete(step)) {
            Ok(()) => {
                shared.lock().known.remove(&step);
            }
            Err(err) => shared.cleanup_failed(err),
        }
    }
}
