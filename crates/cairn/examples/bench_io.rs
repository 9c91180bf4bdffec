//! The Rust side of the side-by-side benchmark (`bench/run.sh`): one durable save or one
//! load of the same synthetic transformer state as `bench/run.py`, timed inside this fresh
//! process, printed as one JSON line.
//!
//! ```text
//! bench_io save <checkpoint dir> <size MiB>
//! bench_io load <checkpoint dir>
//! ```

use std::time::Instant;

use cairn::{DType, LoadOptions, SaveOptions, State, Tensor};

/// The layout of `bench/run.py`'s `synthetic_state`: embeddings and 12 layers of
/// attention, MLP and norm weights, each with two Adam moments, float32, random in [0, 1).
fn synthetic_state(size_mb: u64) -> State {
    let (layers, vocab) = (12u64, 32000u64);
    let target = size_mb << 20;
    let mut h = 64u64;
    while 12 * (vocab * (h + 64) + layers * 12 * (h + 64) * (h + 64)) <= target {
        h += 64;
    }
    let mut params: Vec<(String, Vec<u64>)> = vec![("embed.weight".into(), vec![vocab, h])];
    for i in 0..layers {
        for name in ["q", "k", "v", "o"] {
            params.push((format!("layers.{i}.attn.{name}.weight"), vec![h, h]));
        }
        params.push((format!("layers.{i}.mlp.up.weight"), vec![4 * h, h]));
        params.push((format!("layers.{i}.mlp.down.weight"), vec![h, 4 * h]));
        params.push((format!("layers.{i}.norm1.weight"), vec![h]));
        params.push((format!("layers.{i}.norm2.weight"), vec![h]));
    }
    // Random values in [0, 1) (splitmix64), as in bench/run.py: incompressible like trained
    // weights.
    let mut seed = 0u64;
    let mut next = move || {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut state = State::new();
    for (key, shape) in &params {
        for group in ["model", "optim.exp_avg", "optim.exp_avg_sq"] {
            let count: u64 = shape.iter().product();
            let data: Vec<u8> = (0..count).flat_map(|_| next().to_le_bytes()).collect();
            let tensor = Tensor::new(DType::F32, shape.clone(), data).expect("valid tensor");
            state.insert_tensor(format!("{group}.{key}"), tensor);
        }
    }
    state
}

/// Touches and frees 4 GiB just before the clock starts, as `bench/run.py`'s Python workers
/// do (`back_memory`): what the measurement allocates is then memory the VM's host has
/// backed, whatever ran before. Then resets the peak RSS to the current RSS.
fn back_memory() {
    drop(std::hint::black_box(vec![1u8; 4 << 30]));
    // Best effort: without it the peak RSS includes these 4 GiB.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kb.map_or(0.0, |kb| kb / 1024.0)
}

fn main() -> cairn::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench_io save <dir> <size MiB> | bench_io load <dir>";
    let (op, dir) = match (args.get(1), args.get(2)) {
        (Some(op), Some(dir)) => (op.as_str(), dir.as_str()),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let line = match op {
        "save" => {
            let size_mb: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2048);
            let state = synthetic_state(size_mb);
            back_memory();
            let start = Instant::now();
            cairn::save(dir, &state, &SaveOptions::default())?;
            let seconds = start.elapsed().as_secs_f64();
            serde_json::json!({"seconds": seconds, "bytes": state.tensor_bytes(), "rss_mb": peak_rss_mb()})
        }
        "load" => {
            back_memory();
            let start = Instant::now();
            let (state, _) = cairn::load(dir, &LoadOptions::default())?;
            // Read a byte of every page, as the Python loaders do.
            let touched: u64 = state
                .tensors()
                .map(|(_, t)| t.data().iter().step_by(4096).chain(t.data().last()).map(|&b| u64::from(b)).sum::<u64>())
                .sum();
            let seconds = start.elapsed().as_secs_f64();
            serde_json::json!({"seconds": seconds, "touched": touched, "rss_mb": peak_rss_mb()})
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    println!("{line}");
    Ok(())
}
