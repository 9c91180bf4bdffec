//! Two tiers: saves go to a local run first, the ones the durable policy selects are
//! uploaded in the background and verified; each tier keeps what its own retention
//! says; restore takes the newest readable copy across tiers and says what it passed
//! over; uploads owed when the durable store is down are done by the next manager; a
//! preempted manager uploads only for its grace period; events come complete and in order.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn::fault::FaultStore;
use cairn::manager::{CheckpointManager, ManagerOptions, SaveRequest};
use cairn::policy::{Every, Retention, SavePolicy};
use cairn::telemetry::{Event, Operation, Phase, Tier};
use cairn::tier::LocalTier;
use cairn::{ErrorKind, LoadOptions, Location, Run, State};
use object_store::memory::InMemory;

fn every(n: u64) -> SavePolicy {
    SavePolicy::steps(vec![Every::new(n)]).unwrap()
}

fn keep_last(n: usize) -> Retention {
    Retention { keep_last: Some(n), ..Default::default() }
}

/// A manager saving into `local` every `local_every` steps (keeping `keep_local`) and
/// uploading every `durable_every` to `durable` (keeping `keep`).
fn tiered(
    local: &Run,
    durable: Run,
    (local_every, keep_local): (u64, usize),
    (durable_every, keep): (u64, usize),
) -> CheckpointManager {
    let opts = ManagerOptions::default()
        .with_policy(every(durable_every))
        .with_retention(keep_last(keep))
        .with_local_tier(LocalTier::new(local.clone(), every(local_every), keep_last(keep_local)))
        .with_preemption_signal(None)
        .with_orphan_grace(None);
    CheckpointManager::with_run(durable, opts).unwrap()
}

fn steps(run: &Run) -> Vec<u64> {
    run.list().unwrap().iter().map(|c| c.step).collect()
}

/// Half of the state is frozen (the local saves refer to it), half changes every step.
fn state_at(step: u64) -> State {
    let mut state = common::model_state(0, 2, 64);
    for (key, tensor) in common::model_state(step, 2, 64).tensors() {
        if key.starts_with("model.layers.1.") || key.starts_with("optim.") {
            state.insert_tensor(key.clone(), tensor.clone());
        }
    }
    state
}

/// A durable run on an in-memory store that a test can take down, make refuse or slow.
fn store_backed_run(name: &str) -> (Arc<FaultStore>, Run) {
    let store = Arc::new(FaultStore::counting(Arc::new(InMemory::new())));
    let run = Run::at(Location::from_store(store.clone(), format!("memory://{name}")).child("run"));
    (store, run)
}

fn local_dir_run(dir: &std::path::Path, name: &str) -> Run {
    Run::create(dir.join(name).to_str().unwrap()).unwrap()
}

#[test]
fn saves_go_local_first_and_the_durable_policy_selects_the_uploads_each_tier_keeping_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let durable = local_dir_run(dir.path(), "durable");
    let manager = tiered(&local, durable.clone(), (2, 2), (6, 2));
    for step in 1..=12 {
        manager.on_step(step, &state_at(step), SaveRequest::default()).unwrap();
    }
    manager.wait().unwrap();
    assert!(manager.take_cleanup_errors().is_empty());
    assert_eq!(steps(&local), [10, 12]);
    assert_eq!(steps(&durable), [6, 12]);
    assert!(manager.pending_uploads().is_empty());
    // The local saves were incremental; each durable copy stands alone, every byte checked.
    assert!(local.checkpoint(12).unwrap().manifest().has_references());
    for step in [6, 12] {
        let copy = durable.checkpoint(step).unwrap();
        assert!(!copy.manifest().has_references(), "step {step}");
        assert!(copy.verify().unwrap().is_empty());
        assert_eq!(copy.load(&LoadOptions::default()).unwrap(), state_at(step));
    }
    assert!(!dir.path().join("local/.cairn-uploads/step-000000000012").exists());
    // Both tiers are listed; the newest is the local copy of step 12.
    let listed: Vec<u64> = manager.list().unwrap().iter().map(|i| i.step).collect();
    assert_eq!(listed, [6, 10, 12, 12]);
    let (state, info) = manager.restore(None, &LoadOptions::default()).unwrap();
    assert_eq!(state, state_at(12));
    assert!(info.uri.starts_with(local.location().uri()), "{}", info.uri);
}

#[test]
fn restore_passes_over_a_missing_corrupt_or_half_written_copy_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let durable = local_dir_run(dir.path(), "durable");
    let manager = tiered(&local, durable.clone(), (1, 10), (2, 10));
    for step in 1..=4 {
        manager.on_step(step, &state_at(step), SaveRequest::default()).unwrap();
    }
    manager.wait().unwrap();
    assert_eq!(steps(&durable), [2, 4]);

    // A half-written newer local checkpoint (a killed save: data, no manifest) is unseen.
    let killed = dir.path().join("local/step-000000000009/shards");
    std::fs::create_dir_all(&killed).unwrap();
    std::fs::write(killed.join("r00000-00000-of-00001-abc.safetensors"), b"partial").unwrap();

    // The local copy of step 4 is corrupt: its durable copy serves.
    let shards = dir.path().join("local/step-000000000004/shards");
    for entry in std::fs::read_dir(&shards).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let restored = manager.restore_reporting(None, &LoadOptions::default()).unwrap();
    assert_eq!(restored.info.step, 4);
    assert!(restored.info.uri.starts_with(durable.location().uri()), "{}", restored.info.uri);
    assert_eq!(restored.state, state_at(4));
    assert_eq!(restored.passed_over.len(), 1);
    assert_eq!(restored.passed_over[0].kind(), ErrorKind::Corrupt);
    assert!(restored.passed_over[0].full_message().contains("step-000000000004"), "{}", restored.passed_over[0]);

    // The durable copy of step 4 gone as well: step 3, local.
    durable.delete(4).unwrap();
    let restored = manager.restore_reporting(None, &LoadOptions::default()).unwrap();
    assert_eq!((restored.info.step, restored.passed_over.len()), (3, 1));
    assert_eq!(restored.state, state_at(3));

    // The local copy of step 3 deleted by hand, folder and all: the durable tier has no
    // step 3, so step 2 (local first).
    std::fs::remove_dir_all(dir.path().join("local/step-000000000003")).unwrap();
    let restored = manager.restore_reporting(None, &LoadOptions::default()).unwrap();
    assert_eq!(restored.info.step, 2);
    assert!(restored.info.uri.starts_with(local.location().uri()));

    // A step asked for: its copies only, never an older step.
    let err = manager.restore(Some(4), &LoadOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    // A key the checkpoint lacks is the caller's error, not a reason to go back in time.
    let opts = LoadOptions { keys: Some(vec!["no.such.key".into()]), ..Default::default() };
    let err = manager.restore(None, &opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("no.such.key"), "{err}");
}

#[test]
fn uploads_owed_while_the_durable_store_is_down_are_done_by_the_next_manager() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let (faulty, durable) = store_backed_run("tiers");

    // Down from the start: the manager opens, saves locally and restores from there.
    faulty.set_down(true);
    let manager = tiered(&local, durable.clone(), (1, 1), (2, 3));
    for step in 1..=4 {
        manager.on_step(step, &state_at(step), SaveRequest::default()).unwrap();
    }
    manager.wait().unwrap();
    // Saving never failed; the uploads did, and are owed. Local retention keeps 1, and
    // also everything still owed.
    let problems = manager.take_cleanup_errors();
    assert!(!problems.is_empty());
    assert!(problems.iter().all(|e| e.kind() == ErrorKind::Unavailable), "{problems:?}");
    assert!(problems.iter().any(|e| e.to_string().contains("durable tier")), "{problems:?}");
    assert_eq!(manager.pending_uploads(), [2, 4]);
    assert_eq!(steps(&local), [2, 4]);
    let restored = manager.restore_reporting(None, &LoadOptions::default()).unwrap();
    assert_eq!((restored.info.step, restored.state), (4, state_at(4)));
    assert_eq!(restored.passed_over.len(), 1, "the durable tier could not be listed");
    drop(manager);

    // The store is back: a new manager on the same local run uploads what was owed.
    faulty.set_down(false);
    let manager = tiered(&local, durable.clone(), (1, 1), (2, 3));
    manager.wait().unwrap();
    assert!(manager.take_cleanup_errors().is_empty());
    assert!(manager.pending_uploads().is_empty());
    assert_eq!(steps(&durable), [2, 4]);
    for step in [2, 4] {
        assert_eq!(durable.checkpoint(step).unwrap().load(&LoadOptions::default()).unwrap(), state_at(step));
    }
    // Uploaded, the older local copy goes.
    assert_eq!(steps(&local), [4]);
    let markers = dir.path().join("local/.cairn-uploads");
    assert!(!markers.exists() || std::fs::read_dir(&markers).unwrap().count() == 0);

    // Down again while this manager runs: what is owed is tried again after the next
    // save, without a restart, once the store is back.
    faulty.set_down(true);
    manager.on_step(6, &state_at(6), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    assert_eq!(manager.pending_uploads(), [6]);
    faulty.set_down(false);
    manager.on_step(7, &state_at(7), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    assert!(manager.pending_uploads().is_empty());
    assert_eq!(steps(&durable), [2, 4, 6]);
    // A step asked for whose local copy retention removed comes from the durable tier,
    // with nothing passed over (a copy that is not there is not a damaged one).
    let restored = manager.restore_reporting(Some(2), &LoadOptions::default()).unwrap();
    assert_eq!((restored.info.step, restored.passed_over.len()), (2, 0));
    assert_eq!(manager.restore(Some(3), &LoadOptions::default()).unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn options_that_cannot_work_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let auto = every(10).with_auto_interval(Duration::from_secs(3600));
    let opts = ManagerOptions::default()
        .with_policy(auto)
        .with_local_tier(LocalTier::new(local.clone(), every(1), keep_last(1)))
        .with_preemption_signal(None);
    let err = CheckpointManager::with_run(local_dir_run(dir.path(), "durable"), opts).err().unwrap();
    assert!(err.kind() == ErrorKind::Invalid && err.to_string().contains("local tier's policy"), "{err}");
    let opts = ManagerOptions::default()
        .with_local_tier(LocalTier::new(local.clone(), every(1), keep_last(1)))
        .with_preemption_signal(None);
    let err = CheckpointManager::with_run(local.clone(), opts).err().unwrap();
    assert!(err.kind() == ErrorKind::Invalid && err.to_string().contains("the run itself"), "{err}");
    // The same folder spelled otherwise, one inside the other, or reached through a
    // symlink: refused alike.
    std::os::unix::fs::symlink(dir.path().join("local"), dir.path().join("alias")).unwrap();
    for (run, tier) in
        [("local", "durable/../local/"), ("durable", "durable/nvme"), ("durable/inner", "durable"), ("local", "alias")]
    {
        let tier = Run::create(dir.path().join(tier).to_str().unwrap()).unwrap();
        let opts = ManagerOptions::default()
            .with_local_tier(LocalTier::new(tier, every(1), keep_last(1)))
            .with_preemption_signal(None);
        let err = CheckpointManager::with_run(local_dir_run(dir.path(), run), opts).err().unwrap();
        assert!(err.kind() == ErrorKind::Invalid && err.to_string().contains("the run itself"), "{run}: {err}");
    }
}

#[test]
fn a_sink_that_panics_or_calls_the_manager_stops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let durable = local_dir_run(dir.path(), "durable");
    let manager: Arc<Mutex<Option<Arc<CheckpointManager>>>> = Arc::default();
    let refused: Arc<Mutex<Vec<String>>> = Arc::default();
    let (handle, seen) = (manager.clone(), refused.clone());
    let opts = ManagerOptions::default()
        .with_policy(every(2))
        .with_local_tier(LocalTier::new(local.clone(), every(1), keep_last(1)))
        .with_preemption_signal(None)
        .with_event_sink(Arc::new(move |e: &Event| {
            if let Some(m) = handle.lock().unwrap().clone() {
                if let Err(err) = m.wait() {
                    seen.lock().unwrap().push(err.to_string());
                }
            }
            if e.operation == Operation::Upload {
                panic!("a broken dashboard");
            }
        }));
    let shared = Arc::new(CheckpointManager::with_run(durable.clone(), opts).unwrap());
    *manager.lock().unwrap() = Some(shared.clone());
    for step in 1..=4 {
        shared.on_step(step, &state_at(step), SaveRequest::default()).unwrap();
    }
    shared.wait().unwrap();
    assert_eq!(steps(&durable), [2, 4]);
    assert!(!refused.lock().unwrap().is_empty());
    assert!(refused.lock().unwrap().iter().all(|e| e.contains("event sink cannot call")));
    manager.lock().unwrap().take();
}

#[test]
fn an_upload_the_store_refuses_is_left_for_the_next_manager_not_retried_after_every_save() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let (faulty, durable) = store_backed_run("refusing");
    let manager = tiered(&local, durable.clone(), (1, 1), (2, 3));
    faulty.set_refusing(true);
    manager.on_step(2, &state_at(2), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    let problems = manager.take_cleanup_errors();
    assert!(problems.iter().any(|e| e.kind() == ErrorKind::Permission), "{problems:?}");
    // Later saves do not try it again (the credentials will not mend themselves)...
    let before = faulty.ops();
    manager.on_step(3, &state_at(3), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    assert_eq!(manager.pending_uploads(), [2]);
    assert!(manager.take_cleanup_errors().is_empty(), "step 2 was uploaded again");
    assert_eq!(faulty.ops(), before, "the refusing store was asked again");
    // ... and the local copy is kept for the next manager, which uploads it.
    assert_eq!(steps(&local), [2, 3]);
    drop(manager);
    faulty.set_refusing(false);
    let manager = tiered(&local, durable.clone(), (1, 1), (2, 3));
    manager.wait().unwrap();
    assert!(manager.pending_uploads().is_empty());
    assert_eq!(steps(&durable), [2]);
}

#[test]
fn a_marker_whose_local_save_never_committed_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let durable = local_dir_run(dir.path(), "durable");
    std::fs::create_dir_all(dir.path().join("local/.cairn-uploads")).unwrap();
    std::fs::write(dir.path().join("local/.cairn-uploads/step-000000000005"), b"").unwrap();
    // Not a marker: left alone.
    std::fs::write(dir.path().join("local/.cairn-uploads/notes.txt"), b"mine").unwrap();
    let manager = tiered(&local, durable.clone(), (1, 1), (2, 3));
    manager.wait().unwrap();
    assert!(manager.pending_uploads().is_empty());
    assert!(steps(&durable).is_empty());
    assert!(!dir.path().join("local/.cairn-uploads/step-000000000005").exists());
    assert!(dir.path().join("local/.cairn-uploads/notes.txt").exists());
}

#[test]
fn a_preempted_manager_uploads_for_the_grace_period_then_returns_and_the_next_one_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let (slow, durable) = store_backed_run("grace");
    let signal = signal_hook::consts::SIGUSR1;
    let grace = Duration::from_millis(300);
    let opts = ManagerOptions::default()
        .with_policy(every(1000))
        .with_local_tier(LocalTier::new(local.clone(), every(1000), keep_last(2)).with_upload_grace(grace))
        .with_preemption_signal(Some(signal))
        .with_orphan_grace(None);
    let manager = CheckpointManager::with_run(durable.clone(), opts.clone()).unwrap();
    let state = state_at(7);
    assert!(!manager.on_step(7, &state, SaveRequest::default()).unwrap());
    slow.set_delay(Duration::from_secs(5));
    signal_hook::low_level::raise(signal).unwrap();
    let started = Instant::now();
    assert!(manager.on_step(8, &state, SaveRequest::default()).unwrap());
    let took = started.elapsed();
    // Committed locally; the upload was given the grace period, not the 5 s it needs.
    assert_eq!(steps(&local), [8]);
    assert!(took >= grace && took < Duration::from_secs(4), "{took:?}");
    assert_eq!(manager.pending_uploads(), [8]);
    let started = Instant::now();
    drop(manager);
    assert!(started.elapsed() < Duration::from_secs(4), "closing waited for the upload");

    slow.set_delay(Duration::ZERO);
    let manager = CheckpointManager::with_run(durable.clone(), opts.with_preemption_signal(None)).unwrap();
    manager.wait().unwrap();
    assert!(manager.pending_uploads().is_empty());
    assert_eq!(steps(&durable), [8]);
    assert_eq!(durable.checkpoint(8).unwrap().load(&LoadOptions::default()).unwrap(), state);
}

#[test]
fn events_are_complete_and_in_order_with_several_saves_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let durable = local_dir_run(dir.path(), "durable");
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let sink = events.clone();
    let log = dir.path().join("events.jsonl");
    let opts = ManagerOptions::default()
        .with_policy(every(4))
        .with_retention(keep_last(1))
        .with_local_tier(LocalTier::new(local.clone(), every(1), keep_last(2)))
        .with_max_in_flight(3)
        .with_preemption_signal(None)
        .with_event_sink(Arc::new(move |e: &Event| sink.lock().unwrap().push(e.clone())))
        .with_event_sink(cairn::telemetry::json_lines(&log).unwrap());
    let manager = CheckpointManager::with_run(durable.clone(), opts).unwrap();
    for step in 1..=12 {
        manager.on_step(step, &state_at(step), SaveRequest::default()).unwrap();
    }
    manager.wait().unwrap();
    manager.restore(None, &LoadOptions::default()).unwrap();
    let events = events.lock().unwrap().clone();
    let of = |op: Operation, tier: Tier| -> Vec<u64> {
        events.iter().filter(|e| e.operation == op && e.tier == tier).map(|e| e.step).collect()
    };
    assert_eq!(of(Operation::Save, Tier::Local), (1..=12).collect::<Vec<_>>());
    assert_eq!(of(Operation::Upload, Tier::Durable), [4, 8, 12]);
    assert_eq!(of(Operation::Delete, Tier::Durable), [4, 8]);
    let mut deleted_locally = of(Operation::Delete, Tier::Local);
    deleted_locally.sort();
    assert_eq!(deleted_locally, (1..=10).collect::<Vec<_>>());
    assert_eq!(of(Operation::Load, Tier::Local), [12]);
    let position = |op: Operation, step: u64| events.iter().position(|e| e.operation == op && e.step == step).unwrap();
    for step in 1..=12 {
        let save = &events[position(Operation::Save, step)];
        assert!(save.error.is_none());
        assert_eq!(
            save.phases.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            [Phase::Snapshot, Phase::Write, Phase::Commit]
        );
        assert!(save.bytes > 0);
        if step % 4 == 0 {
            assert!(position(Operation::Save, step) < position(Operation::Upload, step));
            let upload = &events[position(Operation::Upload, step)];
            assert!(upload.phase(Phase::Upload).is_some() && upload.phase(Phase::Verify).is_some());
            assert_eq!(upload.bytes, durable.checkpoint(step).map_or(upload.bytes, |c| c.info().written_bytes));
        }
        if step <= 10 {
            assert!(position(Operation::Save, step) < position(Operation::Delete, step));
        }
    }
    // The manifest keeps the save's own timings; the log has every event, as JSON.
    let info = local.checkpoint(12).unwrap().info();
    assert!(info.timings.is_some_and(|t| t.snapshot_ms.is_some()));
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(lines.lines().count(), events.len());
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(first["operation"], "save");
}

/// Rank `rank`'s state at `step` in a job of two: a replicated model, its half of a
/// sharded tensor, and a plain value of its own.
fn rank_state(rank: u32, step: u64) -> State {
    let mut state = common::model_state(step, 1, 8);
    let half = vec![(rank as u8 + 1).wrapping_mul(step as u8); 8];
    state.insert_piece(
        "sharded",
        cairn::Piece {
            tensor: cairn::Tensor::new(cairn::DType::U8, vec![2, 4], half).unwrap(),
            offsets: vec![2 * rank as u64, 0],
            global_shape: vec![4, 4],
        },
    );
    state.insert_value("rank", cairn::Value::Int(rank as i64));
    state
}

/// What rank `rank` loads to resume: its own half of the sharded tensor, and the rest.
fn rank_load(rank: u32) -> LoadOptions {
    LoadOptions::default().with_box("sharded", vec![2 * rank as u64, 0], vec![2, 4]).with_rank(rank)
}

/// A two-tier manager of rank `rank` of 2: every rank's local tier inside `local` (each
/// in its own folder), uploads every `durable_every` steps to `durable`.
fn rank_manager(
    rank: u32,
    local: &Run,
    durable: &Run,
    durable_every: u64,
    all_gather: Option<cairn::dist::AllGather>,
) -> CheckpointManager {
    let mut opts = ManagerOptions::default()
        .with_ranks(rank, 2)
        .with_policy(every(durable_every))
        .with_retention(keep_last(2))
        .with_local_tier(LocalTier::new(local.clone(), every(1), keep_last(2)))
        .with_coordination_timeout(Duration::from_secs(120))
        .with_preemption_signal(None)
        .with_orphan_grace(None);
    if let Some(all_gather) = all_gather {
        opts = opts.with_all_gather(all_gather);
    }
    CheckpointManager::with_run(durable.clone(), opts).unwrap()
}

/// Two ranks (managers of `rank_manager`, no collectives) each save their state at
/// `steps` and wait; each rank's cleanup problems and the uploads it still owes.
fn save_on_two_ranks(
    local: &Run,
    durable: &Run,
    steps: std::ops::RangeInclusive<u64>,
) -> Vec<(Vec<cairn::Error>, Vec<u64>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u32)
            .map(|rank| {
                let steps = steps.clone();
                s.spawn(move || {
                    let manager = rank_manager(rank, local, durable, 2, None);
                    for step in steps {
                        manager.on_step(step, &rank_state(rank, step), SaveRequest::default()).unwrap();
                    }
                    manager.wait().unwrap();
                    (manager.take_cleanup_errors(), manager.pending_uploads())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Corrupts every data file of a local checkpoint folder.
fn corrupt_shards(folder: &std::path::Path) {
    for entry in std::fs::read_dir(folder.join("shards")).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
}

#[test]
fn ranks_keep_their_own_parts_locally_upload_together_and_agree_on_what_to_restore() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let durable = local_dir_run(dir.path(), "durable");
    let rank_run = |rank: u32| Run::open(dir.path().join(format!("local/rank-{rank:05}")).to_str().unwrap()).unwrap();

    // Saves every step locally, each rank alone; every second step uploaded together.
    for (problems, owed) in save_on_two_ranks(&local, &durable, 1..=5) {
        assert!(problems.is_empty() && owed.is_empty(), "{problems:?} {owed:?}");
    }
    for rank in 0..2u32 {
        let own = rank_run(rank);
        assert_eq!(steps(&own), [4, 5], "rank {rank}");
        let part = own.checkpoint(5).unwrap();
        assert_eq!(part.manifest().part, Some(rank));
        // A part holds its rank's box, not the other rank's: refused, not zeros.
        let state = part.load(&rank_load(rank)).unwrap();
        assert_eq!(state.tensor("sharded").unwrap().data()[0], (rank as u8 + 1) * 5);
        let err = part.load(&rank_load(1 - rank)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Incompatible, "{err}");
        assert!(err.to_string().contains("sharded"), "{err}");
    }
    // The durable copies are whole checkpoints of both ranks, each box written once.
    assert_eq!(steps(&durable), [2, 4]);
    let copy = durable.checkpoint(4).unwrap();
    assert_eq!((copy.manifest().part, copy.manifest().writer.world_size), (None, 2));
    assert!(copy.verify().unwrap().is_empty());
    let whole = copy.load(&LoadOptions::default()).unwrap();
    assert_eq!(whole.tensor("sharded").unwrap().data().as_ref(), [[4u8; 8], [8u8; 8]].concat());
    for rank in 0..2u32 {
        let theirs = copy.load(&rank_load(rank)).unwrap();
        assert_eq!(theirs.value("rank"), Some(&cairn::Value::Int(rank as i64)));
    }

    // Restores, each rank's from its own part while every part is good.
    let restore_all = |damage: &dyn Fn(), load: fn(u32) -> LoadOptions| -> Vec<cairn::manager::Restored> {
        damage();
        let collective = common::in_process_collective(2);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..2u32)
                .map(|rank| {
                    let (local, durable, all_gather) = (&local, &durable, collective(rank));
                    s.spawn(move || {
                        let manager = rank_manager(rank, local, durable, 2, Some(all_gather));
                        manager.restore_reporting(None, &load(rank)).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let restored = restore_all(&|| {}, rank_load);
    for (rank, r) in restored.iter().enumerate() {
        assert_eq!(r.info.step, 5);
        assert!(r.info.uri.contains(&format!("rank-{rank:05}")), "{}", r.info.uri);
        assert_eq!(r.state.tensor("sharded").unwrap().data()[0], (rank as u8 + 1) * 5);
        assert_eq!(r.state.value("rank"), Some(&cairn::Value::Int(rank as i64)));
    }
    // Rank 1's part of step 5 is damaged and no durable copy of step 5 exists: every rank
    // goes back to step 4 together, rank 1 saying why.
    let restored = restore_all(&|| corrupt_shards(&dir.path().join("local/rank-00001/step-000000000005")), rank_load);
    assert_eq!(restored.iter().map(|r| r.info.step).collect::<Vec<_>>(), [4, 4]);
    assert!(restored[1].passed_over.iter().any(|e| e.kind() == ErrorKind::Corrupt));
    assert!(restored[0].info.uri.contains("rank-00000"));
    // The job left step 5's timeline: no rank keeps a part of it, to be mixed in later.
    assert_eq!((steps(&rank_run(0)), steps(&rank_run(1))), (vec![4], vec![4]));
    // Rank 1's part of step 4 damaged too: it loads step 4 from the durable run.
    let restored = restore_all(&|| corrupt_shards(&dir.path().join("local/rank-00001/step-000000000004")), rank_load);
    assert_eq!(restored.iter().map(|r| r.info.step).collect::<Vec<_>>(), [4, 4]);
    assert!(restored[1].info.uri.starts_with(durable.location().uri()), "{}", restored[1].info.uri);
    assert_eq!(restored[1].state.tensor("sharded").unwrap().data()[0], 8);
    // Whole tensors asked for: no part holds them, so every rank reads the durable copy,
    // and a part that lacks them is not reported as damaged.
    let whole = |rank: u32| LoadOptions::default().with_rank(rank);
    let restored = restore_all(&|| {}, whole);
    for r in &restored {
        assert_eq!(r.info.step, 4);
        assert!(r.info.uri.starts_with(durable.location().uri()) && r.passed_over.is_empty(), "{r:?}");
        assert_eq!(r.state.tensor("sharded").unwrap().data().as_ref(), [[4u8; 8], [8u8; 8]].concat());
    }

    // Without the job's collectives the ranks cannot agree on a local step: the durable
    // tier serves, the same for every rank.
    let alone = rank_manager(0, &local, &durable, 2, None);
    let r = alone.restore_reporting(None, &rank_load(0)).unwrap();
    assert!(r.info.uri.starts_with(durable.location().uri()) && r.info.step == 4, "{}", r.info.uri);
}

#[test]
fn a_rank_without_its_part_fails_the_upload_on_every_rank_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let durable = local_dir_run(dir.path(), "durable");
    let problems: Vec<Vec<cairn::Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u32)
            .map(|rank| {
                let (local, durable) = (&local, &durable);
                s.spawn(move || {
                    let manager = rank_manager(rank, local, durable, 2, None);
                    manager.on_step(1, &rank_state(rank, 1), SaveRequest::default()).unwrap();
                    // Rank 1 cannot make its state for step 2, an upload step.
                    let made = manager.on_step_with(2, SaveRequest::default(), |_| match rank {
                        0 => Ok(cairn::manager::Handover::Give(rank_state(0, 2))),
                        _ => Err(cairn::Error::new(ErrorKind::Internal, "out of host memory")),
                    });
                    assert_eq!(made.is_err(), rank == 1);
                    // Waiting returns long before the coordination timeout (120 s): the
                    // upload of step 2 failed on both ranks, and step 4 went through.
                    for step in 3..=4 {
                        manager.on_step(step, &rank_state(rank, step), SaveRequest::default()).unwrap();
                    }
                    manager.wait().unwrap();
                    assert!(manager.pending_uploads().is_empty());
                    manager.take_cleanup_errors()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(steps(&durable), [4]);
    assert!(problems[1].is_empty(), "{:?}", problems[1]);
    assert_eq!(problems[0].len(), 1, "{:?}", problems[0]);
    let shown = problems[0][0].to_string();
    assert!(shown.contains("rank 1") && shown.contains("out of host memory") && shown.contains("step=2"), "{shown}");
}

#[test]
fn a_rank_whose_save_was_killed_fails_the_owed_upload_at_once_when_the_job_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let (faulty, durable) = store_backed_run("ranks-owed");
    // The durable store is down: steps 2 and 4 stay owed on both ranks.
    faulty.set_down(true);
    assert!(save_on_two_ranks(&local, &durable, 1..=4).iter().all(|(_, owed)| owed == &[2, 4]));
    // Rank 1's part of step 2 is gone (as if its save had been killed before the commit).
    std::fs::remove_dir_all(dir.path().join("local/rank-00001/step-000000000002")).unwrap();
    faulty.set_down(false);
    // Restarted, rank 1 joins the upload of step 2 only to fail it, at once (not after
    // the 120 s coordination timeout); step 4 and the new steps upload.
    let (problems, owed): (Vec<_>, Vec<_>) = save_on_two_ranks(&local, &durable, 5..=6).into_iter().unzip();
    assert_eq!(steps(&durable), [4, 6]);
    assert!(owed.iter().all(Vec::is_empty), "{owed:?}");
    assert!(problems[1].is_empty(), "{:?}", problems[1]);
    assert_eq!(problems[0].len(), 1, "{:?}", problems[0]);
    let shown = problems[0][0].to_string();
    assert!(shown.contains("rank 1 could not take part") && shown.contains("never committed"), "{shown}");
    assert_eq!(problems[0][0].kind(), ErrorKind::NotFound);
}

#[test]
fn a_restore_of_an_older_step_asked_for_keeps_every_newer_part() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir_run(dir.path(), "local");
    let durable = local_dir_run(dir.path(), "durable");
    save_on_two_ranks(&local, &durable, 1..=4);
    let collective = common::in_process_collective(2);
    let restored: Vec<(u64, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u32)
            .map(|rank| {
                let (local, durable, all_gather) = (&local, &durable, collective(rank));
                s.spawn(move || {
                    let manager = rank_manager(rank, local, durable, 2, Some(all_gather));
                    let r = manager.restore_reporting(Some(2), &rank_load(rank)).unwrap();
                    (r.info.step, r.info.uri)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (step, uri) in &restored {
        assert_eq!(*step, 2);
        assert!(uri.starts_with(durable.location().uri()), "{uri}");
    }
    // Evaluating step 2 is not resuming from it: the parts of steps 3 and 4 stay.
    for rank in 0..2u32 {
        let own = Run::open(dir.path().join(format!("local/rank-{rank:05}")).to_str().unwrap()).unwrap();
        assert_eq!(steps(&own), [3, 4], "rank {rank}");
    }
}
