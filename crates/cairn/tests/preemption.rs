//! Preemption: after SIGTERM the next `on_step` saves regardless of policy and flushes.
//! Its own test binary, because the signal reaches every manager in the process.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cairn::manager::{CheckpointManager, ManagerOptions, SaveRequest};
use cairn::policy::{Every, SavePolicy};
use cairn::{Location, Run};
use object_store::memory::InMemory;
use object_store::throttle::{ThrottleConfig, ThrottledStore};

#[test]
fn sigterm_makes_the_next_step_save_and_flush() {
    // On a slow store with two saves in flight, the save before the signal is still being
    // written when the preemption save is made: both are committed once it returns, with
    // background snapshots too.
    for background in [false, true] {
        let config = ThrottleConfig { wait_put_per_call: Duration::from_millis(50), ..Default::default() };
        let uri = format!("slow://preemption-{background}");
        let run = Run::at(Location::from_store(Arc::new(ThrottledStore::new(InMemory::new(), config)), &uri));
        let opts = ManagerOptions::default()
            .with_policy(SavePolicy::steps(vec![Every::new(1000)]).unwrap())
            .with_max_in_flight(2)
            .with_background_snapshot(background);
        let manager = CheckpointManager::with_run(run, opts).unwrap();
        let state = common::model_state(7, 1, 4);
        assert!(!manager.on_step(7, &state, SaveRequest::default()).unwrap());
        assert!(manager.on_step(1000, &state, SaveRequest::default()).unwrap());
        assert_eq!(manager.saves_in_flight(), 1, "background {background}: step 1000 is still being written");
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
