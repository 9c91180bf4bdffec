//! The manager end to end: policies, retention, async saves on a slow store, background
//! errors, restart and resume, the LATEST hint, reset.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cairn::manager::{CheckpointManager, Handover, ManagerOptions, SaveRequest};
use cairn::policy::{Every, KeepBest, Mode, Retention, SavePolicy};
use cairn::{ErrorKind, LoadOptions, Location, Run, State, Value};
use object_store::memory::InMemory;
use object_store::throttle::{ThrottleConfig, ThrottledStore};

fn options(every: u64) -> ManagerOptions {
    ManagerOptions::default()
        .with_policy(SavePolicy::steps(vec![Every::new(every)]).unwrap())
        .with_preemption_signal(None)
}

/// A run in memory whose every write takes `put_ms` milliseconds.
fn slow_run(uri: &str, put_ms: u64) -> Run {
    let config = ThrottleConfig { wait_put_per_call: Duration::from_millis(put_ms), ..Default::default() };
    Run::at(Location::from_store(Arc::new(ThrottledStore::new(InMemory::new(), config)), uri))
}

fn steps(manager: &CheckpointManager) -> Vec<u64> {
    manager.list().unwrap().iter().map(|i| i.step).collect()
}

#[test]
fn policy_decides_which_steps_are_saved() {
    let opts = ManagerOptions::default()
        .with_policy(SavePolicy::steps(vec![Every::until(100, 1000), Every::new(1000)]).unwrap())
        .with_preemption_signal(None);
    let manager = CheckpointManager::open("memory://manager/policy", opts).unwrap();
    let state = common::model_state(0, 1, 2);
    let mut saved = Vec::new();
    for step in 0..=3000 {
        if manager.on_step(step, &state, SaveRequest::default()).unwrap() {
            saved.push(step);
        }
    }
    manager.wait().unwrap();
    let expected: Vec<u64> = (1..=10).map(|i| i * 100).chain([2000, 3000]).collect();
    assert_eq!(saved, expected);
    assert_eq!(steps(&manager), expected);
}

#[test]
fn on_step_with_makes_the_state_only_on_saved_steps_and_given_states_commit_the_same() {
    let manager = CheckpointManager::open("memory://manager/with", options(10)).unwrap();
    let mut made = Vec::new();
    for step in 0..=30 {
        let saved = manager
            .on_step_with(step, SaveRequest::default(), |req| {
                made.push(step);
                req.metrics.insert("loss".into(), Value::Float(step as f64));
                Ok(Handover::Give(common::model_state(step, 1, 3)))
            })
            .unwrap();
        assert_eq!(saved, made.last() == Some(&step), "step {step}");
    }
    manager.wait().unwrap();
    assert_eq!(made, vec![10, 20, 30]);
    assert_eq!(steps(&manager), made);
    let (state, info) = manager.restore(None, &LoadOptions::default()).unwrap();
    assert_eq!((info.step, state, info.metric("loss")), (30, common::model_state(30, 1, 3), Some(30.0)));
}

#[test]
fn a_state_that_cannot_be_made_fails_the_step_and_gives_the_slot_back() {
    let manager = CheckpointManager::open("memory://manager/unmade", options(1)).unwrap();
    let err = manager
        .on_step_with(1, SaveRequest::default(), |_| Err(cairn::Error::new(ErrorKind::Invalid, "no state")))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert_eq!(manager.saves_in_flight(), 0);
    let state = common::model_state(1, 1, 2);
    assert!(manager.on_step(1, &state, SaveRequest::default()).unwrap(), "step 1 is free again");
    manager.wait().unwrap();
    assert_eq!(steps(&manager), [1]);
}

#[test]
fn keep_last_deletes_older_checkpoints_in_the_background() {
    let opts = options(1).with_retention(Retention { keep_last: Some(3), ..Default::default() });
    let manager = CheckpointManager::open("memory://manager/keep-last", opts).unwrap();
    for step in 1..=10 {
        manager.on_step(step, &common::model_state(step, 1, 4), SaveRequest::default()).unwrap();
    }
    manager.wait().unwrap();
    assert_eq!(steps(&manager), vec![8, 9, 10]);
    let (state, info) = manager.restore(None, &LoadOptions::default()).unwrap();
    assert_eq!((info.step, state), (10, common::model_state(10, 1, 4)));
}

#[test]
fn keep_best_uses_the_recorded_metric() {
    let retention = Retention {
        keep_best: Some(KeepBest { count: 2, metric: "loss".into(), mode: Mode::Min }),
        ..Default::default()
    };
    let manager = CheckpointManager::open("memory://manager/keep-best", options(1).with_retention(retention)).unwrap();
    let losses = [0.9, 0.2, 0.5, 0.1, 0.7];
    for (i, loss) in losses.iter().enumerate() {
        let req = SaveRequest { metrics: [("loss".to_string(), Value::Float(*loss))].into(), ..Default::default() };
        manager.on_step(i as u64 + 1, &common::model_state(1, 1, 2), req).unwrap();
    }
    manager.wait().unwrap();
    assert_eq!(steps(&manager), vec![2, 4, 5]); // best two, plus the latest
}

#[test]
fn restoring_the_latest_waits_for_the_saves_in_flight() {
    // On a slow store the save of step 2 is still being written when restore is called:
    // "the latest" is step 2 once it commits, not step 1 (every rank of a job, each
    // waiting for its own save, then reads the same step).
    let run = slow_run("slow://restore", 50);
    let manager = CheckpointManager::with_run(run, options(1)).unwrap();
    manager.on_step(1, &common::model_state(1, 1, 2), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    manager.on_step(2, &common::model_state(2, 1, 2), SaveRequest::default()).unwrap();
    assert_eq!(manager.saves_in_flight(), 1);
    let (state, info) = manager.restore(None, &LoadOptions::default()).unwrap();
    assert_eq!(info.step, 2);
    assert_eq!(state.value("step"), Some(&Value::Int(2)));
}

#[test]
fn several_saves_in_flight_on_a_slow_store_all_commit() {
    let run = slow_run("slow://run", 30);
    let manager = CheckpointManager::with_run(run, options(1).with_max_in_flight(2)).unwrap();
    for step in 1..=6 {
        manager.on_step(step, &common::model_state(step, 2, 8), SaveRequest::default()).unwrap();
        assert!(manager.saves_in_flight() <= 2);
    }
    manager.wait().unwrap();
    assert_eq!(manager.saves_in_flight(), 0);
    for step in 1..=6 {
        let (state, _) = manager.restore(Some(step), &LoadOptions::default()).unwrap();
        assert_eq!(state, common::model_state(step, 2, 8));
    }
}

#[test]
fn background_error_surfaces_on_the_next_call_and_on_wait() {
    let dir = tempfile::tempdir().unwrap();
    let uri = dir.path().join("run");
    let manager = CheckpointManager::open(uri.to_str().unwrap(), options(1)).unwrap();
    std::fs::write(uri.join("step-000000000002"), b"blocks the save").unwrap();
    std::fs::write(uri.join("step-000000000003"), b"blocks the save").unwrap();
    manager.on_step(2, &common::model_state(2, 1, 2), SaveRequest::default()).unwrap();
    let mut surfaced = None;
    for _ in 0..1000 {
        match manager.on_step(2, &common::model_state(2, 1, 2), SaveRequest::default()) {
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                surfaced = Some(e);
                break;
            }
        }
    }
    let err = surfaced.expect("background error never surfaced");
    assert!(err.to_string().contains("step-000000000002"), "{err}");
    manager.on_step(3, &common::model_state(3, 1, 2), SaveRequest::default()).unwrap();
    let err = manager.wait().unwrap_err();
    assert!(err.to_string().contains("step-000000000003"), "{err}");
    manager.wait().unwrap();
}

#[test]
fn restarted_manager_resumes_and_removes_a_stale_temporary() {
    let uri = "memory://manager/restart";
    {
        let manager = CheckpointManager::open(uri, options(10)).unwrap();
        manager.on_step(10, &common::model_state(10, 1, 4), SaveRequest::default()).unwrap();
        let temporary = SaveRequest { temporary: true, ..Default::default() };
        manager.save(15, &common::model_state(15, 1, 4), temporary).unwrap();
    } // dropped: flushes
    let manager = CheckpointManager::open(uri, options(10)).unwrap();
    let (state, info) = manager.restore(None, &LoadOptions::default()).unwrap();
    assert_eq!((info.step, info.temporary), (15, true));
    assert_eq!(state, common::model_state(15, 1, 4));
    assert!(!manager.on_step(15, &state, SaveRequest::default()).unwrap(), "resumed step saved again");
    manager.on_step(20, &common::model_state(20, 1, 4), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    assert_eq!(steps(&manager), vec![10, 20]);
}

#[test]
fn time_interval_saves_temporaries_that_newer_checkpoints_replace() {
    let clock = Arc::new(cairn::manager::ManualClock::default());
    let policy = SavePolicy::steps(vec![Every::new(100)]).unwrap().with_time_interval(Duration::from_secs(60));
    let opts = options(1).with_policy(policy).with_clock(clock.clone());
    let manager = CheckpointManager::open("memory://manager/time", opts).unwrap();
    let state = common::model_state(1, 1, 2);
    for step in 1..=100 {
        clock.advance(Duration::from_secs(10));
        manager.on_step(step, &state, SaveRequest::default()).unwrap();
        if step == 50 {
            manager.wait().unwrap();
            let infos = manager.list().unwrap();
            assert_eq!(infos.iter().map(|i| (i.step, i.temporary)).collect::<Vec<_>>(), vec![(48, true)]);
        }
    }
    manager.wait().unwrap();
    assert_eq!(steps(&manager), vec![100]);
}

#[test]
fn an_automatic_interval_follows_the_measured_cost_of_saves() {
    use cairn::cadence::optimal_interval;
    let mtbf = Duration::from_secs(3600);
    for async_save in [false, true] {
        let clock = Arc::new(cairn::manager::ManualClock::default());
        let policy = SavePolicy::steps(vec![Every::new(1_000_000)]).unwrap().with_auto_interval(mtbf);
        let intervals: Arc<std::sync::Mutex<Vec<Option<Duration>>>> = Arc::default();
        let sink = intervals.clone();
        let opts =
            options(1).with_policy(policy).with_clock(clock.clone()).with_async_save(async_save).with_event_sink(
                Arc::new(move |e: &cairn::telemetry::Event| {
                    if e.operation == cairn::telemetry::Operation::Save {
                        sink.lock().unwrap().push(e.interval);
                    }
                }),
            );
        let manager = CheckpointManager::open(&format!("memory://manager/auto-{async_save}"), opts).unwrap();
        assert_eq!(manager.cadence().unwrap().interval(), None);
        let state = common::model_state(1, 1, 2);
        let mut saved = Vec::new();
        for step in 1..=2000u64 {
            clock.advance(Duration::from_secs(1));
            // Making the state (a copy off the GPU, say) takes 10 s of the loop's time.
            let made = manager
                .on_step_with(step, SaveRequest::default(), |_| {
                    clock.advance(Duration::from_secs(10));
                    Ok(Handover::Give(state.clone()))
                })
                .unwrap();
            if made {
                saved.push(step);
                manager.wait().unwrap();
            }
        }
        // The first save is due at once; then one every optimal interval for a 10 s stall
        // (261.7 s, Daly), counted in steps of 1 s plus the 10 s each save stalls.
        let interval = optimal_interval(Duration::from_secs(10), mtbf);
        let cadence = manager.cadence().unwrap();
        assert_eq!(cadence.estimates().unwrap().0, Duration::from_secs(10), "async={async_save}");
        assert_eq!(cadence.interval(), Some(interval.max(cadence.estimates().unwrap().1)));
        assert_eq!(saved[0], 1, "async={async_save}");
        let gaps: Vec<u64> = saved.windows(2).map(|w| w[1] - w[0]).collect();
        let expected = (interval.as_secs_f64() - 10.0).ceil() as u64;
        assert!(gaps.iter().all(|&g| g == expected), "async={async_save} gaps {gaps:?}, expected {expected}");
        assert!(manager.list().unwrap().iter().all(|i| i.temporary));
        // Each save's event reports the interval chosen once its cost was known.
        let intervals = intervals.lock().unwrap().clone();
        assert_eq!(intervals.len(), saved.len());
        assert!(intervals.iter().all(|i| *i == cadence.interval()), "async={async_save} {intervals:?}");
    }
}

#[test]
fn latest_hint_names_the_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let uri = dir.path().join("run");
    let manager = CheckpointManager::open(uri.to_str().unwrap(), options(1)).unwrap();
    for step in 1..=3 {
        manager.on_step(step, &common::model_state(step, 1, 2), SaveRequest::default()).unwrap();
    }
    manager.wait().unwrap();
    let hint = std::fs::read_to_string(uri.join("LATEST")).unwrap();
    assert!(hint.trim_end().ends_with("step-000000000003"), "{hint}");
}

#[test]
fn the_latest_hint_never_goes_back_to_an_older_step() {
    let dir = tempfile::tempdir().unwrap();
    let uri = dir.path().join("run");
    let manager = CheckpointManager::open(uri.to_str().unwrap(), options(1).with_async_save(false)).unwrap();
    manager.save(10, &common::model_state(10, 1, 2), SaveRequest::default()).unwrap();
    manager.save(5, &common::model_state(5, 1, 2), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    let hint = std::fs::read_to_string(uri.join("LATEST")).unwrap();
    assert!(hint.trim_end().ends_with("step-000000000010"), "{hint}");
}

/// Bytes whose owner raises a flag when the last view of them is dropped.
struct Flagged(Vec<u8>, Arc<std::sync::atomic::AtomicBool>);

impl AsRef<[u8]> for Flagged {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Flagged {
    fn drop(&mut self) {
        self.1.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_saved_state_is_dropped_before_its_slot_is_given_to_the_next_save() {
    for async_save in [true, false] {
        let uri = format!("memory://manager/slot-order-{async_save}");
        let manager = CheckpointManager::open(&uri, options(1).with_async_save(async_save)).unwrap();
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let data = bytes::Bytes::from_owner(Flagged(vec![7; 64], dropped.clone()));
        let mut first = State::new();
        first.insert_tensor("w", cairn::Tensor::new(cairn::DType::U8, vec![64], data).unwrap());
        manager.on_step_with(1, SaveRequest::default(), |_| Ok(Handover::Give(first))).unwrap();
        manager
            .on_step_with(2, SaveRequest::default(), |_| {
                assert!(dropped.load(std::sync::atomic::Ordering::SeqCst), "the slot came free with the state alive");
                Ok(Handover::Give(common::model_state(2, 1, 2)))
            })
            .unwrap();
        manager.wait().unwrap();
        assert_eq!(steps(&manager), [1, 2]);
    }
}

#[test]
fn a_make_that_panics_or_saves_again_gives_the_step_and_the_slot_back() {
    let manager = CheckpointManager::open("memory://manager/make-panics", options(1)).unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        manager.on_step_with(1, SaveRequest::default(), |_| panic!("conversion failed"))
    }));
    assert!(panicked.is_err());
    assert_eq!(manager.saves_in_flight(), 0);
    let state = common::model_state(1, 1, 2);
    let err = manager
        .on_step_with(1, SaveRequest::default(), |_| {
            manager.save(7, &state, SaveRequest::default())?;
            Ok(Handover::Copy(&state))
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(manager.on_step(1, &state, SaveRequest::default()).unwrap(), "step 1 is free again");
    manager.wait().unwrap();
    assert_eq!(steps(&manager), [1]);
}

#[test]
fn reset_deletes_every_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let uri = dir.path().join("run");
    let manager = CheckpointManager::open(uri.to_str().unwrap(), options(1)).unwrap();
    for step in 1..=3 {
        manager.on_step(step, &common::model_state(step, 1, 2), SaveRequest::default()).unwrap();
    }
    manager.reset().unwrap();
    assert_eq!(manager.latest_step().unwrap(), None);
    assert_eq!(std::fs::read_dir(&uri).unwrap().count(), 0, "files left after reset");
    assert_eq!(manager.restore(None, &LoadOptions::default()).unwrap_err().kind(), ErrorKind::NotFound);
    assert!(manager.on_step(1, &common::model_state(1, 1, 2), SaveRequest::default()).unwrap());
}

/// Two managers (ranks 0 and 1, keep-last 2) save steps 1..=4 with a piece each; only
/// rank 0 deletes, and the run keeps steps 3 and 4. `all_gather` is the job's collective,
/// if any, made for each rank (else the ranks coordinate through the store); `background`
/// copies the states on the managers' snapshot threads.
fn two_ranks_save_four_steps(
    uri: &str,
    all_gather: Option<&(dyn Fn(u32) -> cairn::dist::AllGather + Sync)>,
    background: bool,
) {
    use cairn::{DType, Piece, Tensor};
    std::thread::scope(|s| {
        for rank in 0..2u32 {
            let all_gather = all_gather.map(|make| make(rank));
            s.spawn(move || {
                let mut opts = options(1)
                    .with_ranks(rank, 2)
                    .with_background_snapshot(background)
                    .with_retention(Retention { keep_last: Some(2), ..Default::default() });
                if let Some(all_gather) = all_gather {
                    opts = opts.with_all_gather(all_gather);
                }
                let manager = CheckpointManager::open(uri, opts).unwrap();
                for step in 1..=4u64 {
                    let mut state = common::model_state(step, 1, 2);
                    let half = vec![(rank as u8 + 1) * step as u8; 4];
                    let slice = Piece {
                        tensor: Tensor::new(DType::U8, vec![2, 2], half).unwrap(),
                        offsets: vec![2 * rank as u64, 0],
                        global_shape: vec![4, 2],
                    };
                    state.insert_piece("sharded", slice);
                    manager.on_step(step, &state, SaveRequest::default()).unwrap();
                }
                manager.wait().unwrap();
            });
        }
    });
    let run = Run::open(uri).unwrap();
    assert_eq!(run.list().unwrap().iter().map(|c| c.step).collect::<Vec<_>>(), vec![3, 4]);
    let (state, _) = run.load_latest(&LoadOptions::default()).unwrap();
    assert_eq!(state.tensor("sharded").unwrap().data().as_ref(), &[4, 4, 4, 4, 8, 8, 8, 8]);
}

#[test]
fn ranks_save_together_and_rank_zero_applies_retention() {
    two_ranks_save_four_steps("memory://manager/ranks", None, false);
}

#[test]
fn ranks_save_together_with_background_snapshots() {
    two_ranks_save_four_steps("memory://manager/ranks-background", Some(&common::in_process_collective(2)), true);
}

#[test]
fn ranks_save_together_through_the_jobs_collective() {
    use std::sync::{Barrier, Mutex};
    // An in-process all-gather standing in for a torch.distributed group; it counts its
    // calls, which happen on the managers' worker threads.
    let barrier = Arc::new(Barrier::new(2));
    let slots = Arc::new(Mutex::new(vec![Vec::new(); 2]));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let make = |rank: u32| -> cairn::dist::AllGather {
        let (barrier, slots, calls) = (barrier.clone(), slots.clone(), calls.clone());
        Arc::new(move |payload: Vec<u8>| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            slots.lock().unwrap()[rank as usize] = payload;
            barrier.wait();
            let all = slots.lock().unwrap().clone();
            barrier.wait();
            Ok(all)
        })
    };
    two_ranks_save_four_steps("memory://manager/ranks-collective", Some(&make), false);
    // Four saves of four rounds each, on each of the two ranks.
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2 * 4 * 4);
}

#[test]
fn a_rank_that_cannot_make_its_state_fails_that_save_on_every_rank_and_the_next_one_works() {
    let collective = common::in_process_collective(2);
    let uri = "memory://manager/ranks-refused";
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u32)
            .map(|rank| {
                let all_gather = collective(rank);
                s.spawn(move || {
                    let opts = options(1).with_ranks(rank, 2).with_all_gather(all_gather);
                    let manager = CheckpointManager::open(uri, opts).unwrap();
                    let state = common::model_state(1, 1, 2);
                    manager.on_step(1, &state, SaveRequest::default()).unwrap();
                    // Rank 1 cannot make step 2's state (a tensor it cannot read, say).
                    let made = manager.on_step_with(2, SaveRequest::default(), |_| match rank {
                        1 => Err(cairn::Error::new(ErrorKind::Invalid, "unreadable tensor key=`w`")),
                        _ => Ok(Handover::Copy(&state)),
                    });
                    // The failure of step 2 is reported by the next call or by wait(),
                    // and step 3 is saved on every rank either way.
                    let step3 = manager.on_step(3, &state, SaveRequest::default());
                    let waited = manager.wait();
                    assert!(*step3.as_ref().unwrap_or(&true), "step 3 was not saved");
                    let reported = step3.err().or(waited.err()).map(|e| e.to_string());
                    manager.on_step(4, &state, SaveRequest::default()).unwrap();
                    manager.wait().unwrap();
                    (made.map_err(|e| e.to_string()), reported)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Rank 1 is told its own reason at once (and only then); rank 0's save of step 2
    // fails naming rank 1 (no wait for a rank that never comes), reported once; steps 3
    // and 4 save on both ranks (their collectives stayed in step).
    assert!(outcomes[1].0.as_ref().unwrap_err().contains("unreadable tensor"), "{outcomes:?}");
    assert_eq!(outcomes[1].1, None, "{outcomes:?}");
    assert_eq!(outcomes[0].0, Ok(true), "{outcomes:?}");
    let reported = outcomes[0].1.as_ref().expect("step 2's failure was not reported on rank 0");
    assert!(reported.contains("rank 1 could not take part") && reported.contains("unreadable tensor"), "{reported}");
    let run = Run::open(uri).unwrap();
    assert_eq!(run.list().unwrap().iter().map(|c| c.step).collect::<Vec<_>>(), vec![1, 3, 4]);
}

#[test]
fn time_intervals_are_refused_with_several_ranks() {
    let policy = SavePolicy::steps(vec![Every::new(1)]).unwrap().with_time_interval(Duration::from_secs(5));
    let err = CheckpointManager::open("memory://manager/ranks-time", options(1).with_policy(policy).with_ranks(0, 2))
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Invalid);
}

/// Saves steps 1..=3 (keep_last 1, synchronous) through `store`; returns what each
/// `on_step` answered.
/// `None` when the manager could not even open the run.
fn save_three(store: Arc<dyn object_store::ObjectStore>) -> Option<(CheckpointManager, Vec<cairn::Result<bool>>)> {
    // No leftover cleanup on open: it would run beside the saves and move the faults.
    let opts = options(1)
        .with_async_save(false)
        .with_retention(Retention { keep_last: Some(1), ..Default::default() })
        .with_orphan_grace(None);
    let manager = CheckpointManager::with_run(Run::at(Location::from_store(store, "fault://run")), opts).ok()?;
    let results = (1..=3).map(|step| manager.on_step(step, &common::model_state(step, 1, 2), SaveRequest::default()));
    let results = results.collect();
    Some((manager, results))
}

#[test]
fn a_failed_cleanup_after_a_commit_is_reported_apart_from_the_save() {
    use cairn::fault::{Fault, FaultStore};
    let counter = Arc::new(FaultStore::counting(Arc::new(InMemory::new())));
    let (manager, _) = save_three(counter.clone()).unwrap();
    manager.wait().unwrap();
    drop(manager);
    let ops = counter.ops();
    let mut cleanup_only = 0;
    for at in 0..ops {
        for fault in [Fault::Crash, Fault::Fail] {
            let inner = Arc::new(InMemory::new());
            let Some((manager, results)) = save_three(Arc::new(FaultStore::new(inner.clone(), at, fault))) else {
                continue;
            };
            let waited = manager.wait();
            let cleanup = manager.take_cleanup_errors();
            drop(manager);
            let visible: Vec<u64> =
                Run::at(Location::from_store(inner, "memory://run")).list().unwrap().iter().map(|c| c.step).collect();
            for (step, result) in (1..=3).zip(&results) {
                // What was reported saved is committed (or deleted later by retention).
                if matches!(result, Ok(true)) && !visible.contains(&step) {
                    assert!(visible.iter().any(|&v| v > step), "op {at} {fault:?}: step {step} lost: {visible:?}");
                }
            }
            for (step, result) in (1..=3).zip(&results) {
                // What was reported failed is not visible: cleanup never fails a save.
                if let Err(e) = result {
                    assert!(!visible.contains(&step), "op {at} {fault:?}: step {step} failed ({e}) yet visible");
                }
            }
            let all_saved = results.iter().all(|r| matches!(r, Ok(true))) && waited.is_ok();
            if all_saved && !cleanup.is_empty() {
                cleanup_only += 1;
                assert!(visible.contains(&3), "op {at} {fault:?}: {visible:?}");
            }
        }
    }
    assert!(cleanup_only > 0, "no case where only the cleanup failed ({ops} operations)");
    eprintln!("cleanup: {ops} operations x 2 faults; {cleanup_only} cleanup-only failures reported apart");
}

#[test]
fn forcing_a_step_that_is_already_committed_saves_nothing_and_says_so() {
    let manager = CheckpointManager::open("memory://manager/force-committed", options(10)).unwrap();
    let state = common::model_state(10, 1, 2);
    assert!(manager.on_step(10, &state, SaveRequest::default()).unwrap());
    manager.wait().unwrap();
    let forced = SaveRequest { force: true, ..Default::default() };
    assert!(!manager.on_step(10, &state, forced.clone()).unwrap(), "nothing new was saved");
    let err = manager.save(10, &state, forced).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert!(manager.on_step(11, &state, SaveRequest { force: true, ..Default::default() }).unwrap());
    manager.wait().unwrap();
    assert_eq!(steps(&manager), [10, 11]);
}

#[test]
fn a_background_snapshot_lets_go_of_the_callers_buffers_once_copied_and_saves_commit_in_order() {
    let run = slow_run("slow://background-snapshot", 50);
    let manager = CheckpointManager::with_run(run, options(1).with_background_snapshot(true)).unwrap();
    for step in 1..=3u64 {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let data = bytes::Bytes::from_owner(Flagged(vec![step as u8; 4096], dropped.clone()));
        let mut live = State::new();
        live.insert_tensor("w", cairn::Tensor::new(cairn::DType::U8, vec![4096], data).unwrap());
        live.insert_value("step", Value::Int(step as i64));
        assert!(manager.on_step(step, &live, SaveRequest::default()).unwrap());
        manager.wait_snapshot();
        drop(live);
        // Copied: the caller's buffer is free although the save is still being written.
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst), "step {step}: the manager kept the caller's buffer");
        assert_eq!(manager.saves_in_flight(), 1, "step {step}");
    }
    manager.wait().unwrap();
    assert_eq!(steps(&manager), [1, 2, 3]);
    for step in 1..=3u64 {
        let (state, _) = manager.restore(Some(step), &LoadOptions::default()).unwrap();
        let mut expected = State::new();
        expected.insert_tensor("w", cairn::Tensor::new(cairn::DType::U8, vec![4096], vec![step as u8; 4096]).unwrap());
        expected.insert_value("step", Value::Int(step as i64));
        assert_eq!(state, expected);
    }
}

#[test]
fn saves_from_several_threads_with_background_snapshots_all_commit() {
    let opts = options(1).with_background_snapshot(true).with_max_in_flight(2);
    let manager = CheckpointManager::open("memory://manager/background-threads", opts).unwrap();
    std::thread::scope(|s| {
        for first in [1u64, 2] {
            let manager = &manager;
            s.spawn(move || {
                for step in (first..=20).step_by(2) {
                    manager.save(step, &common::model_state(step, 2, 8), SaveRequest::default()).unwrap();
                }
            });
        }
    });
    manager.wait().unwrap();
    assert_eq!(manager.saves_in_flight(), 0);
    assert_eq!(steps(&manager), (1..=20).collect::<Vec<_>>());
    for step in [1, 10, 19, 20] {
        let (state, _) = manager.restore(Some(step), &LoadOptions::default()).unwrap();
        assert_eq!(state, common::model_state(step, 2, 8));
    }
}
