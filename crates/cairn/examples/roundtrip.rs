//! Saves a synthetic model-sized state (transformer-like weights plus Adam moments) to a
//! local run, loads it back, and checks it is bit-exact.
//!
//! `cargo run --release -p cairn --example roundtrip [RUN_DIR] [MIB]`

use std::time::Instant;

use cairn::{DType, LoadOptions, Run, SaveOptions, State, Tensor, Value};

fn synthetic_state(mib: usize) -> State {
    let width = 512u64;
    let per_layer = 4 * width * width * 4 * 3; // 4 matrices, f32, weights + 2 moments
    let layers = ((mib as u64) << 20).div_ceil(per_layer).max(1);
    let mut state = State::new();
    let mut seed = 0x1234_5678_9abc_def0u64;
    for layer in 0..layers {
        for name in ["q", "k", "v", "o"] {
            for group in ["model", "optim.exp_avg", "optim.exp_avg_sq"] {
                let bytes: Vec<u8> = (0..width * width)
                    .flat_map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        ((seed >> 40) as f32 / 1e7).to_le_bytes()
                    })
                    .collect();
                let key = format!("{group}.layers.{layer}.attn.{name}.weight");
                state.insert_tensor(key, Tensor::new(DType::F32, vec![width, width], bytes).expect("valid tensor"));
            }
        }
    }
    state.insert_value("step", Value::Int(1000));
    state
}

fn main() -> Result<(), cairn::Error> {
    let mut args = std::env::args().skip(1);
    let run_dir = args.next().unwrap_or_else(|| "runs/roundtrip".to_string());
    let mib: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    let state = synthetic_state(mib);
    let size = state.tensor_bytes() as f64 / (1u64 << 20) as f64;
    println!("state: {} tensors, {size:.0} MiB", state.tensors().count());

    let run = Run::create(&run_dir)?;
    let step = run.latest()?.map_or(1000, |c| c.info().step + 1000);
    let started = Instant::now();
    let info = run.save(&state, &SaveOptions::default().with_step(step))?;
    let save_s = started.elapsed().as_secs_f64();
    println!("saved step {} to {} in {save_s:.2} s ({:.0} MiB/s, durable)", info.step, info.uri, size / save_s);

    let started = Instant::now();
    let (loaded, info) = run.load_latest(&LoadOptions::default())?;
    let load_s = started.elapsed().as_secs_f64();
    println!("loaded step {} in {load_s:.2} s ({:.0} MiB/s, checksums verified)", info.step, size / load_s);
    let exact = loaded == state;
    println!("bit-exact: {}", if exact { "yes" } else { "NO" });
    if !exact {
        std::process::exit(1);
    }
    Ok(())
}
