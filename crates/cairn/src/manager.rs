//! `CheckpointManager`: the one object a training loop calls every step. It asks the save
//! policy whether to save, snapshots the state, writes in the background with a bounded
//! number of saves in flight, applies retention after each commit, and resumes a run.
//!
//! Thread-safety: all methods take `&self` and may be called from any thread. One
//! background worker runs saves and deletions in order. A background failure is kept and
//! returned by the next call to `on_step`, `save`, `restore` or `wait`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use object_store::{ObjectStoreExt, PutPayload};

use crate::dist::{self, StoreExchange};
use crate::error::{Error, ErrorKind, Result};
use crate::format::layout::{self, LATEST_FILE};
use crate::info::CheckpointInfo;
use crate::load::LoadOptions;
use crate::policy::{self, Candidate, Decision, Retention, SaveContext, SavePolicy};
use crate::preemption::Preemption;
use crate::run::Run;
use crate::runtime::block_on;
use crate::save::SaveOptions;
use crate::snapshot::ArenaPool;
use crate::tree::{State, Value};

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
    /// When to save.
    pub policy: SavePolicy,
    /// What to keep.
    pub retention: Retention,
    /// Write in the background after snapshotting (`true`), or inside the call.
    pub async_save: bool,
    /// Saves queued or running at once; the next save waits for a slot.
    pub max_in_flight: usize,
    /// Signal that requests a preemption save (SIGTERM by default; `None` for none).
    pub preemption_signal: Option<i32>,
    /// Clock for time-based policies.
    pub clock: Arc<dyn Clock>,
    /// Template for every save (shard size, concurrency).
    pub save: SaveOptions,
    /// Metric used by keep-best retention.
    pub metric: Option<String>,
    /// This process's rank in a multi-rank job (0 for a single process).
    pub rank: u32,
    /// Number of ranks saving each checkpoint together (1 for a single process). With
    /// more than one, saves are coordinated through the store; only rank 0 deletes.
    pub world_size: u32,
    /// How long a multi-rank save waits for the other ranks.
    pub coordination_timeout: Duration,
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
            save: SaveOptions::default(),
            metric: None,
            rank: 0,
            world_size: 1,
            coordination_timeout: Duration::from_secs(600),
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

    /// Sets the retention policy; keep-best's metric becomes the manager's metric.
    pub fn with_retention(mut self, retention: Retention) -> Self {
        if let Some(best) = &retention.keep_best {
            self.metric = Some(best.metric.clone());
        }
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

enum Job {
    Save {
        step: u64,
        state: State,
        opts: SaveOptions,
    },
    Retain,
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
}

struct Shared {
    run: Run,
    retention: Retention,
    metric: Option<String>,
    rank: u32,
    world_size: u32,
    coordination_timeout: Duration,
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Saves and commits one checkpoint: alone, or together with the other ranks.
    fn save(&self, state: &State, opts: &SaveOptions) -> Result<CheckpointInfo> {
        if self.world_size <= 1 {
            return self.run.save(state, opts);
        }
        let step = opts.step.unwrap_or_default();
        let dest = self.run.location().child(&layout::step_dir(step));
        let mut exchange = StoreExchange::new(&dest, self.rank, self.world_size, self.coordination_timeout);
        dist::save_distributed(&dest, state, step, opts, &mut exchange)
    }

    /// Whether this process deletes checkpoints and writes the hint (rank 0 only).
    fn leads(&self) -> bool {
        self.rank == 0
    }

    /// What follows a committed save: retention learns of it and the `LATEST` hint names
    /// it. A failure here is a cleanup problem, never the save's.
    fn committed(&self, info: &CheckpointInfo) {
        self.lock().known.insert(info.step, Candidate::from_info(info, self.metric.as_deref()));
        if let Err(err) = retried(|| write_latest_hint(self, info)) {
            self.cleanup_failed(err);
        }
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
            known.insert(info.step, Candidate::from_info(&info, opts.metric.as_deref()));
        }
        let preempted = Arc::new(AtomicBool::new(false));
        let preemption =
            opts.preemption_signal.map(|signal| Preemption::install(signal, preempted.clone())).transpose()?;
        let inner = Inner {
            last_step: known.keys().next_back().copied(),
            last_save_at: opts.clock.now(),
            known,
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            run,
            retention: opts.retention.clone(),
            metric: opts.metric.clone(),
            rank: opts.rank,
            world_size: opts.world_size,
            coordination_timeout: opts.coordination_timeout,
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
        self.on_step_with(step, req, |req| self.save(step, state, req))
    }

    /// Like [`on_step`](Self::on_step), but a save takes ownership of `state` without a
    /// snapshot copy (see [`save_owned`](Self::save_owned)).
    pub fn on_step_owned(&self, step: u64, state: State, req: SaveRequest) -> Result<bool> {
        self.on_step_with(step, req, |req| self.save_owned(step, state, req))
    }

    /// Whether [`on_step`](Self::on_step) would save `step` now. Changes nothing; lets a
    /// caller skip gathering a state that costs something to build (tensors on a GPU).
    pub fn due(&self, step: u64, force: bool) -> bool {
        self.decide(step, force, self.preempted()) != Decision::Skip
    }

    fn on_step_with(&self, step: u64, req: SaveRequest, save: impl FnOnce(SaveRequest) -> Result<()>) -> Result<bool> {
        self.take_error()?;
        let preempted = self.preempted();
        match self.decide(step, req.force, preempted) {
            Decision::Skip => Ok(false),
            Decision::Save { temporary } => {
                save(SaveRequest { temporary, ..req })?;
                if preempted {
                    self.wait()?;
                }
                Ok(true)
            }
        }
    }

    /// What the policy says of `step` at this moment.
    fn decide(&self, step: u64, force: bool, preempted: bool) -> Decision {
        let (last_step, last_save_at) = {
            let inner = self.shared.lock();
            // Already committed or being written: nothing new to save, even when forced.
            if inner.known.contains_key(&step) || inner.writing.contains(&step) {
                return Decision::Skip;
            }
            (inner.last_step, inner.last_save_at)
        };
        let ctx = SaveContext { step, now: self.clock.now(), last_step, last_save_at, force, preempted };
        policy::should_save(&self.policy, &ctx)
    }

    /// Saves `state` as `step` now, whatever the policy. Fails with
    /// [`ErrorKind::AlreadyExists`] if the step is already committed or being written.
    /// With async saving it returns once `state` is copied (the caller may then change
    /// its buffers); otherwise once the checkpoint is committed.
    pub fn save(&self, step: u64, state: &State, req: SaveRequest) -> Result<()> {
        let opts = self.admit(step, req)?;
        if self.async_save {
            let snapshot = state.snapshot_in(&self.snapshots);
            self.enqueue(Job::Save { step, state: snapshot, opts });
            return Ok(());
        }
        let result = self.shared.save(state, &opts);
        let mut inner = self.shared.lock();
        inner.writing.remove(&step);
        inner.saves_in_flight -= 1;
        self.shared.changed.notify_all();
        drop(inner);
        self.shared.committed(&result?);
        self.enqueue(Job::Retain);
        Ok(())
    }

    /// Like [`save`](Self::save), but takes ownership of `state` and makes no snapshot
    /// copy: the caller promises not to change the buffers it points at (used when the
    /// caller's copy already is the snapshot, e.g. a tensor just copied off a GPU).
    pub fn save_owned(&self, step: u64, state: State, req: SaveRequest) -> Result<()> {
        if !self.async_save {
            return self.save(step, &state, req);
        }
        let opts = self.admit(step, req)?;
        self.enqueue(Job::Save { step, state, opts });
        Ok(())
    }

    /// Waits for a free save slot, refuses a step already saved or being written, and
    /// books the save; returns its options.
    fn admit(&self, step: u64, req: SaveRequest) -> Result<SaveOptions> {
        self.take_error()?;
        let mut inner = self.free_slot()?;
        if inner.known.contains_key(&step) || inner.writing.contains(&step) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("checkpoint already saved step={step} run=`{}`", self.shared.run.location().uri()),
            ));
        }
        inner.last_step = Some(inner.last_step.map_or(step, |s| s.max(step)));
        inner.last_save_at = self.clock.now();
        inner.writing.insert(step);
        inner.saves_in_flight += 1;
        let mut opts = self.save_template.clone();
        opts.step = Some(step);
        opts.temporary = req.temporary;
        opts.metrics = req.metrics;
        opts.metadata = req.metadata;
        Ok(opts)
    }

    /// Blocks until a save could start without waiting (fewer than `max_in_flight` saves
    /// in flight), so that a caller can prepare a costly state (copy it off a GPU) without
    /// ever holding more copies than that. Returns a background error, if one occurred.
    pub fn wait_for_slot(&self) -> Result<()> {
        self.free_slot().map(drop)
    }

    /// Waits until a save slot is free or a background error is pending; returns the
    /// lock, or takes and returns the error.
    fn free_slot(&self) -> Result<MutexGuard<'_, Inner>> {
        let mut inner = self.shared.lock();
        while inner.saves_in_flight >= self.max_in_flight && inner.error.is_none() {
            inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        match inner.error.take() {
            Some(err) => Err(err),
            None => Ok(inner),
        }
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

    /// Loads the checkpoint of `step`, or the latest committed one (highest step) when
    /// `None`. [`ErrorKind::NotFound`] when there is none. Retention never deletes a
    /// checkpoint while it is being read.
    pub fn restore(&self, step: Option<u64>, opts: &LoadOptions) -> Result<(State, CheckpointInfo)> {
        self.take_error()?;
        let step = match step {
            Some(step) => step,
            None => self.latest_step()?.ok_or_else(|| {
                Error::not_found(format!("no committed checkpoint run=`{}`", self.shared.run.location().uri()))
            })?,
        };
        *self.shared.lock().reading.entry(step).or_default() += 1;
        let result = self.shared.run.checkpoint(step).and_then(|c| Ok((c.load(opts)?, c.info())));
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
        delete_latest_hint(run)?;
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
            Job::Save { step, state, opts } => {
                let result = shared.save(&state, &opts);
                drop(state);
                let mut inner = shared.lock();
                inner.writing.remove(&step);
                inner.saves_in_flight -= 1;
                drop(inner);
                result.map(|info| shared.committed(&info))
            }
            Job::Retain => Ok(()),
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

/// Writes `LATEST` (the URI of the newest checkpoint), like mmengine's `last_checkpoint`.
/// Only a hint for other tools: Cairn itself always lists manifests.
fn write_latest_hint(shared: &Shared, info: &CheckpointInfo) -> Result<()> {
    if !shared.leads() {
        return Ok(());
    }
    let run = &shared.run;
    let loc = run.location();
    if run.list()?.last().is_some_and(|c| c.step > info.step) {
        return Ok(());
    }
    let body = PutPayload::from(format!("{}\n", info.uri).into_bytes());
    block_on(async {
        loc.store()
            .put(&loc.path(LATEST_FILE), body)
            .await
            .map(|_| ())
            .map_err(|e| Error::from_store(e, "writing hint", &format!("file=`{}/{LATEST_FILE}`", loc.uri())))
    })
}

fn delete_latest_hint(run: &Run) -> Result<()> {
    let loc = run.location();
    block_on(async {
        match loc.store().delete(&loc.path(LATEST_FILE)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::from_store(e, "deleting hint", &format!("file=`{}/{LATEST_FILE}`", loc.uri()))),
        }
    })
}
