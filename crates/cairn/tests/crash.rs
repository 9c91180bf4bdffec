//! Crash consistency with real processes: a child saving checkpoints incrementally (half
//! of the state frozen, so every save refers to data of older checkpoints), deleting old
//! ones and pruning leftovers is SIGKILLed at 1,000 random moments. After every kill the latest committed
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

/// ~250 KiB per checkpoint in several shards: three layers change every step, three
/// never do (saved once, then referred to).
fn state_for(step: u64) -> cairn::State {
    let mut state = common::model_state(step, 3, 96);
    for (key, tensor) in common::model_state(0, 6, 96).tensors() {
        if state.tensor(key).is_none() {
            state.insert_tensor(key.clone(), tensor.clone());
        }
    }
    state
}

fn opts(step: u64) -> SaveOptions {
    SaveOptions::default().with_step(step).with_shard_bytes(64 << 10).with_incremental(true)
}

/// Runs only as the child: saves step after step, deleting old checkpoints, until killed.
#[test]
fn crash_child_saves_until_killed() {
    let Ok(uri) = std::env::var(CHILD_ENV) else { return };
    let run = Run::create(&uri).unwrap();
    let mut step = run.latest().unwrap().map_or(1, |c| c.info().step + 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        run.save(&state_for(step), &opts(step)).unwrap();
        if step > KEEP {
            run.delete(step - KEEP).unwrap();
        }
        if step % 4 == 0 {
            run.prune_orphans(Duration::ZERO).unwrap();
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
    eprintln!(
        "{kills} SIGKILLs in {:.0} s; {} checkpoints committed; every visible one intact",
        started.elapsed().as_secs_f64(),
        next
    );
    assert!(kills >= 100, "too few kills within the time budget: {kills}");
    assert!(next > 10, "the child rarely got to commit: {next}");
}

const RACE_ENV: &str = "CAIRN_RACE_CHILD_RUN";

/// Runs only as a racing child: saves step 1 once and reports the outcome on stdout.
#[test]
fn race_child_saves_step_one() {
    let Ok(uri) = std::env::var(RACE_ENV) else { return };
    let seed: u64 = std::env::var("CAIRN_RACE_SEED").unwrap().parse().unwrap();
    match Run::create(&uri).unwrap().save(&state_for(seed), &opts(1)) {
        Ok(info) => println!("RESULT committed {}", info.save_id),
        Err(e) if e.kind() == cairn::ErrorKind::AlreadyExists => println!("RESULT refused {e}"),
        Err(e) => println!("RESULT error {e}"),
    }
}

#[test]
fn processes_saving_the_same_step_commit_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let uri = dir.path().join("run").to_str().unwrap().to_string();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..6u64)
        .map(|i| {
            Command::new(&exe)
                .args(["race_child_saves_step_one", "--exact", "--test-threads=1", "--nocapture"])
                .env(RACE_ENV, &uri)
                .env("CAIRN_RACE_SEED", (100 + i).to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let outcomes: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap();
            out.lines().find_map(|l| l.find("RESULT").map(|i| l[i..].to_string())).unwrap_or_default()
        })
        .collect();
    let winners: Vec<&String> = outcomes.iter().filter(|o| o.starts_with("RESULT committed")).collect();
    assert_eq!(winners.len(), 1, "{outcomes:#?}");
    assert!(
        outcomes.iter().all(|o| o.starts_with("RESULT committed") || o.contains("already committed")),
        "{outcomes:#?}"
    );
    let run = Run::open(&uri).unwrap();
    let ckpt = run.checkpoint(1).unwrap();
    assert!(winners[0].ends_with(&ckpt.info().save_id));
    let loaded = ckpt.load(&LoadOptions::default()).unwrap();
    assert!((100..106).any(|seed| loaded == state_for(seed)), "a mix of two saves was committed");
}
