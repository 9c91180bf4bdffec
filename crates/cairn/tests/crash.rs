//! Crash consistency: a child process saving checkpoints is SIGKILLed at random moments;
//! afterwards the latest committed checkpoint loads bit-exact, every earlier one is
//! intact, nothing unfinished is visible, and the next save succeeds.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn::{LoadOptions, Run, SaveOptions};

const CHILD_ENV: &str = "CAIRN_CRASH_CHILD_RUN";
const KILLS: usize = 40;

fn state_for(step: u64) -> cairn::State {
    common::model_state(step, 6, 192) // ~1 MiB per checkpoint, several shards
}

fn opts(step: u64) -> SaveOptions {
    SaveOptions::default().with_step(step).with_shard_bytes(256 << 10)
}

/// Runs only as the child: saves step after step until killed.
#[test]
fn crash_child_saves_until_killed() {
    let Ok(uri) = std::env::var(CHILD_ENV) else { return };
    let run = Run::create(&uri).unwrap();
    let mut step = run.latest().unwrap().map_or(1, |c| c.step + 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        run.save(&state_for(step), &opts(step)).unwrap();
        step += 1;
    }
}

/// Loads and compares every committed checkpoint above `after_step` (all when `None`),
/// returning the highest step seen.
fn check_run(run: &Run, after_step: Option<u64>) -> Option<u64> {
    let all = run.list().unwrap();
    for c in all.iter().filter(|c| after_step.is_none_or(|s| c.step > s)) {
        let loaded = c.open().unwrap().load(&LoadOptions::default()).unwrap();
        assert!(loaded == state_for(c.step), "checkpoint of step {} differs", c.step);
    }
    all.last().map(|c| c.step)
}

#[test]
fn killed_saves_never_leave_a_broken_visible_checkpoint() {
    let mut rng = common::Rng::new(common::seed("killed_saves_never_leave_a_broken_visible_checkpoint"));
    let dir = tempfile::tempdir().unwrap();
    let uri = dir.path().join("run").to_str().unwrap().to_string();
    let run = Run::create(&uri).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut checked = None;
    for round in 0..KILLS {
        let mut child = Command::new(&exe)
            .args(["crash_child_saves_until_killed", "--exact", "--test-threads=1"])
            .env(CHILD_ENV, &uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20 + rng.below(120)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        checked = check_run(&run, checked).or(checked);
        eprintln!("round {round}: latest committed step {checked:?} loads bit-exact");
    }
    // Every checkpoint, old ones included, is still intact after all the kills.
    assert!(check_run(&run, None).is_some(), "the child never committed a checkpoint");
    let next = run.latest().unwrap().unwrap().step + 1;
    run.save(&state_for(next), &opts(next)).unwrap();
    assert_eq!(run.latest().unwrap().unwrap().step, next);
}
