//! Helpers shared by the integration tests.
#![allow(dead_code)]

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
