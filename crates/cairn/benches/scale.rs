//! A simulated 10,000-rank FSDP checkpoint of a 7B-class model (the Llama-2-7B layout:
//! 32 layers, hidden 4096, MLP 11008, vocabulary 32000, f32), its manifest written as a
//! multi-rank save would write it: every parameter split along dim 0 as FSDP2 `Shard(0)`
//! splits it (chunks of ceil(rows / N) rows, ranks past the end hold nothing), each rank's
//! pieces in its own shard file. Reports the manifest's size and how long encoding,
//! decoding with validation, and `Checkpoint::open` take. No 10,000 processes and no data:
//! only the manifest is written. A report, not a test:
//! `cargo bench -p cairn --bench scale [-- RANKS] [--adam]` (`--adam` adds Adam's two
//! moments per parameter, tripling the pieces).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use cairn::format::layout::{self, MANIFEST_FILE};
use cairn::format::manifest::Manifest;
use cairn::{Checkpoint, Location};

/// The median of three runs of `f`.
fn median_of_3(mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..3)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    times.sort();
    times[1]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ranks: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(10_000);
    let adam = args.iter().any(|a| a == "--adam");
    let manifest = common::simulated_fsdp_manifest(ranks, 32, adam);
    let pieces: usize = manifest.tensors.values().map(|t| t.pieces.len()).sum();
    let bytes = manifest.encode().expect("the simulated manifest is within the limits");
    let dir = std::env::temp_dir().join(format!("cairn-bench-scale-{}", std::process::id()));
    let folder = dir.join(layout::step_dir(1000));
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join(MANIFEST_FILE), &bytes).unwrap();

    let encode = median_of_3(|| drop(manifest.encode().unwrap()));
    let decode = median_of_3(|| drop(Manifest::decode(&bytes, "simulated").unwrap()));
    let location = Location::open(folder.to_str().unwrap()).unwrap();
    let open = median_of_3(|| drop(Checkpoint::open_at(location.clone()).unwrap()));
    std::fs::remove_dir_all(&dir).unwrap();

    println!(
        "{ranks} ranks, 7B-class layout{}: {} tensors, {pieces} pieces, {} files, manifest {:.1} MB",
        if adam { " + Adam" } else { "" },
        manifest.tensors.len(),
        manifest.files.len(),
        bytes.len() as f64 / 1e6
    );
    println!("encode {:.3} s", encode.as_secs_f64());
    println!("decode + validate {:.3} s", decode.as_secs_f64());
    println!("Checkpoint::open (read + decode + validate) {:.3} s", open.as_secs_f64());
}
