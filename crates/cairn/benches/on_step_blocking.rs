//! How long `CheckpointManager::on_step` blocks the training loop with async saving,
//! compared with a plain memory copy of the same state. A report, not a test:
//! `cargo bench -p cairn --bench on_step_blocking [-- MIB]`.

use std::time::{Duration, Instant};

use cairn::manager::{CheckpointManager, ManagerOptions, SaveRequest};
use cairn::policy::{Every, SavePolicy};
use cairn::{DType, State, Tensor};

fn state(mib: usize) -> State {
    let mut state = State::new();
    for i in 0..mib.div_ceil(4) {
        state.insert_tensor(
            format!("layers.{i}.w"),
            Tensor::new(DType::F32, vec![1024, 1024], vec![i as u8; 4 << 20]).unwrap(),
        );
    }
    state
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mib: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(512);
    let state = state(mib);
    let copies: Vec<Duration> = (0..5)
        .map(|_| {
            let started = Instant::now();
            let copy = state.to_owned_copy();
            let took = started.elapsed();
            drop(copy);
            took
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("cairn-bench-on-step-{}", std::process::id()));
    let opts = ManagerOptions::default()
        .with_policy(SavePolicy::steps(vec![Every::new(1)]).unwrap())
        .with_preemption_signal(None)
        .with_retention(cairn::policy::Retention { keep_last: Some(1), ..Default::default() });
    let manager = CheckpointManager::open(dir.to_str().unwrap(), opts).unwrap();
    let blocked: Vec<Duration> = (1..=5)
        .map(|step| {
            manager.wait().unwrap();
            let started = Instant::now();
            manager.on_step(step, &state, SaveRequest::default()).unwrap();
            started.elapsed()
        })
        .collect();
    manager.wait().unwrap();
    let (copy, block) = (median(copies), median(blocked));
    println!("state: {mib} MiB");
    println!("plain memory copy: {:.1} ms", copy.as_secs_f64() * 1e3);
    println!("on_step blocked:   {:.1} ms", block.as_secs_f64() * 1e3);
    println!("ratio: {:.2}x (target <= 1.5x)", block.as_secs_f64() / copy.as_secs_f64());
    let _ = std::fs::remove_dir_all(dir);
}
