//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use cairn::format::layout;
use cairn::format::manifest::{FileRecord, Manifest, PieceRecord, TensorRecord, Writer, FORMAT_NAME, FORMAT_VERSION};
use cairn::{DType, State, Tensor, Value};

/// A small deterministic generator (xorshift64*), so randomized tests print and replay seeds.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// A seed from `CAIRN_TEST_SEED` or the clock, printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("CAIRN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test}: seed {seed} (replay with CAIRN_TEST_SEED={seed})");
    seed
}

/// A model-like state whose contents are a pure function of `step`.
pub fn model_state(step: u64, layers: usize, width: usize) -> State {
    let mut rng = Rng::new(step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xDEAD_BEEF);
    let mut state = State::new();
    for layer in 0..layers {
        for (name, dtype) in [("weight", DType::F32), ("bias", DType::BF16)] {
            let shape = if name == "weight" { vec![width as u64, width as u64] } else { vec![width as u64] };
            let n: usize = shape.iter().product::<u64>() as usize * dtype.size();
            state.insert_tensor(
                format!("model.layers.{layer}.{name}"),
                Tensor::new(dtype, shape, rng.bytes(n)).unwrap(),
            );
        }
    }
    state.insert_tensor(
        "optim.step_count",
        Tensor::new(DType::I64, vec![], (step as i64).to_le_bytes().to_vec()).unwrap(),
    );
    state.insert_value("step", Value::Int(step as i64));
    state.insert_value("rng", Value::Bytes(rng.bytes(32)));
    state
}

/// The Llama-2-7B layout (hidden 4096, MLP 11008, vocabulary 32000) with `layers`
/// layers (32 in the model): (key, rows, columns).
fn layout_7b(layers: usize) -> Vec<(String, u64, u64)> {
    let (hidden, mlp, vocab) = (4096u64, 11008u64, 32000u64);
    let mut params = vec![("model.embed_tokens.weight".to_string(), vocab, hidden)];
    for layer in 0..layers {
        let p = format!("model.layers.{layer}");
        for name in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            params.push((format!("{p}.self_attn.{name}.weight"), hidden, hidden));
        }
        params.push((format!("{p}.mlp.gate_proj.weight"), mlp, hidden));
        params.push((format!("{p}.mlp.up_proj.weight"), mlp, hidden));
        params.push((format!("{p}.mlp.down_proj.weight"), hidden, mlp));
        params.push((format!("{p}.input_layernorm.weight"), hidden, 1));
        params.push((format!("{p}.post_attention_layernorm.weight"), hidden, 1));
    }
    params.push(("model.norm.weight".to_string(), hidden, 1));
    params.push(("lm_head.weight".to_string(), vocab, hidden));
    params
}

/// The manifest a multi-rank save of that layout by `ranks` FSDP2 ranks writes (f32, no
/// data): every parameter (and with `adam` its two moments) split along dim 0 as
/// `Shard(0)` splits it (chunks of ceil(rows / ranks) rows, ranks past the end hold
/// nothing), each rank's pieces in its own shard file.
pub fn simulated_fsdp_manifest(ranks: u64, layers: usize, adam: bool) -> Manifest {
    let mut keys = Vec::new();
    for (key, rows, cols) in layout_7b(layers) {
        keys.push((key.clone(), rows, cols));
        if adam {
            keys.push((format!("optim.state.{key}.exp_avg"), rows, cols));
            keys.push((format!("optim.state.{key}.exp_avg_sq"), rows, cols));
        }
    }
    let names: Vec<String> = (0..ranks).map(|r| layout::shard_file(r as u32, 0, 1, "simulated7b")).collect();
    let mut used = vec![8u64 << 20; ranks as usize]; // a generous header region per file
    let mut tensors = BTreeMap::new();
    for (key, rows, cols) in keys {
        let chunk = rows.div_ceil(ranks);
        let pieces = (0..ranks)
            .map_while(|r| {
                let lo = r * chunk;
                (lo < rows).then(|| {
                    let len = chunk.min(rows - lo);
                    let start = used[r as usize];
                    let bytes = len * cols * 4;
                    used[r as usize] += bytes;
                    PieceRecord {
                        file: names[r as usize].clone(),
                        range: [start, start + bytes],
                        offsets: vec![lo, 0],
                        shape: vec![len, cols],
                        crc32c: (r as u32).wrapping_mul(2_654_435_761),
                        xxh3: None,
                        sample: None,
                    }
                })
            })
            .collect();
        tensors.insert(key, TensorRecord { dtype: DType::F32, shape: vec![rows, cols], pieces });
    }
    let files = names
        .into_iter()
        .zip(&used)
        .filter(|(_, &size)| size > 8 << 20)
        .map(|(name, &size)| (name, FileRecord { size, header_len: 8 << 20, header_crc32c: 0 }))
        .collect();
    Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        step: 1000,
        created_unix_ms: 0,
        temporary: false,
        save_id: "simulated7b".into(),
        writer: Writer { library: "cairn".into(), version: "bench".into(), world_size: ranks as u32 },
        metrics: BTreeMap::new(),
        metadata: serde_json::Value::Null,
        values: BTreeMap::new(),
        structure: None,
        tensors,
        files,
        ranks: BTreeMap::new(),
        timings: None,
        part: None,
    }
}

/// An in-process collective for `n` ranks standing in for a torch.distributed group: the
/// k-th call of every rank forms the k-th all-gather (so ranks that fall out of step
/// pair the wrong calls, as a real collective would), and a call no other rank joins
/// within 20 s fails instead of hanging the test.
pub fn in_process_collective(n: usize) -> impl Fn(u32) -> cairn::dist::AllGather {
    use std::collections::HashMap;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;
    let rounds = Arc::new((Mutex::new(HashMap::<usize, Vec<Option<Vec<u8>>>>::new()), Condvar::new()));
    move |rank: u32| -> cairn::dist::AllGather {
        let rounds = rounds.clone();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        Arc::new(move |payload: Vec<u8>| {
            let call = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (lock, changed) = &*rounds;
            let mut all = lock.lock().unwrap();
            all.entry(call).or_insert_with(|| vec![None; n])[rank as usize] = Some(payload);
            changed.notify_all();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while all[&call].iter().any(Option::is_none) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(cairn::Error::new(
                        cairn::ErrorKind::Unavailable,
                        format!("rank {rank}: call {call} alone"),
                    ));
                }
                all = changed.wait_timeout(all, left).unwrap().0;
            }
            Ok(all[&call].iter().flatten().cloned().collect())
        })
    }
}
