//! Preemption: after SIGTERM the next `on_step` saves regardless of policy and flushes.
//! Its own test binary, because the signal reaches every manager in the process.

mod common;

use cairn::manager::{CheckpointManager, ManagerOptions, SaveRequest};
use cairn::policy::{Every, SavePolicy};

#[test]
fn sigterm_makes_the_next_step_save_and_flush() {
    // With background snapshots too: the preemption save copies inside the call, and the
    // save before it (copied in the background) is flushed with it.
    for background in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let uri = dir.path().join("run");
        let opts = ManagerOptions::default()
            .with_policy(SavePolicy::steps(vec![Every::new(1000)]).unwrap())
            .with_background_snapshot(background);
        let manager = CheckpointManager::open(uri.to_str().unwrap(), opts).unwrap();
        let state = common::model_state(7, 1, 4);
        assert!(!manager.on_step(7, &state, SaveRequest::default()).unwrap());
        assert!(manager.on_step(1000, &state, SaveRequest::default()).unwrap());
        signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
        assert!(manager.preempted());
        assert!(manager.on_step(1001, &state, SaveRequest::default()).unwrap());
        // Flushed: committed before on_step returned, without calling wait().
        assert_eq!(manager.saves_in_flight(), 0, "background {background}");
        let steps: Vec<u64> = manager.list().unwrap().iter().map(|c| c.step).collect();
        assert_eq!(steps, [1000, 1001], "background {background}");
        drop(manager);
    }
}
