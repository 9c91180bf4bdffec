//! Crash consistency with real processes: a child saving checkpoints (and deleting old
//! ones) is SIGKILLed at 1,000 random moments. After every kill the latest committed
//! checkpoint loads bit-exact, every other visible one is intact, nothing unfinished is
//! visible, and the next save succeeds. Bounded in time; prints its seed and figures.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn::{LoadOptions, Run, SaveOptions};

const CHILD_ENV: &str = "CAIRN_CRASH_CHILD_RUN";
const KILLS: usize = 1000;
const TIME_BUDGET: Duration = Duration::from_secs(240);
const KEEP: u64 = 3;

fn state_for(step: u64) -> cairn::State {
    common::model_state(step, 6, 96) // ~250 KiB per checkpoint, several shards
}

fn opts(step: u64) -> SaveOptions {
    SaveOptions::default().with_step(step).with_shard_bytes(64 << 10)
}

/// Runs only as the child: saves step after step, deleting old checkpoints, until killed.
#[test]
fn crash_child_saves_until_killed() {
    let Ok(uri) = std::env::var(CHILD_ENV) else { return };
    let run = Run::create(&uri).unwrap();
    let mut step = run.latest().unwrap().map_or(1, |c| c.step + 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        run.save(&state_for(step), &opts(step)).unwrap();
        if step > KEEP {
            run.delete(step - KEEP).unwrap();
        }
        step += 1;
    }
}

/// Every visible checkpoint loads bit-exact; returns the latest step.
fn check_run(run: &Run) -> Option<u64> {
    let all = run.list().unwrap();
    for c in &all {
        // The child is dead while we look, so every listed checkpoint must load.
        match c.open().and_then(|ck| ck.load(&LoadOptions::default())) {
            Ok(loaded) => assert!(loaded == state_for(c.step), "checkpoint of step {} differs", c.step),
            Err(e) => panic!("visible checkpoint of step {} does not load: {e}", c.step),
        }
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
    let started = Instant::now();
    let mut kills = 0;
    let mut latest = None;
    while kills < KILLS && started.elapsed() < TIME_BUDGET {
        let mut child = Command::new(&exe)
            .args(["crash_child_saves_until_killed", "--exact", "--test-threads=1"])
            .env(CHILD_ENV, &uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(2_000 + rng.below(40_000)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        let now = check_run(&run);
        assert!(now >= latest, "the latest committed step went back from {latest:?} to {now:?}");
        latest = now;
    }
    // The next save succeeds after all the kills.
    let next = latest.map_or(1, |s| s + 1);
    run.save(&state_for(next), &opts(next)).unwrap();
    assert_eq!(check_run(&run), Some(next));
    eprintln!("{kills} SIGKILLs in {:.0} s; {} checkpoints committed; every visible one intact", started.elapsed().as_secs_f64(), next);
    assert!(kills >= 100, "too few kills within the time budget: {kills}");
    assert!(next > 10, "the child rarely got to commit: {next}");
}
