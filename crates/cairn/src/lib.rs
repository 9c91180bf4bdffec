//! Cairn: crash-safe, fast, pickle-free checkpoints for machine-learning training.
//!
//! A checkpoint is a folder holding safetensors shard files and a `manifest.json` that is
//! written last and *is* the commit. Saving never overwrites a committed checkpoint;
//! loading verifies every checksum and treats every stored byte as hostile.
//!
//! ```
//! use cairn::{DType, LoadOptions, SaveOptions, State, Tensor, Value};
//!
//! let mut state = State::new();
//! state.insert_tensor("model.w", Tensor::new(DType::F32, vec![2], [1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap());
//! state.insert_value("step", Value::Int(100));
//! cairn::save("memory://doc/run", &state, &SaveOptions::default().with_step(100)).unwrap();
//!
//! let (loaded, info) = cairn::load("memory://doc/run", &LoadOptions::default()).unwrap();
//! assert_eq!(info.step, 100);
//! assert_eq!(loaded, state);
//! ```

#![warn(missing_docs)]

pub mod cadence;
mod cloud_store;
mod commit;
pub mod dist;
mod entry;
pub mod error;
pub mod fault;
pub mod format;
mod fp8;
pub mod geometry;
mod incremental;
pub mod info;
pub mod load;
mod local_store;
mod local_write;
pub mod manager;
pub mod parts;
pub mod policy;
mod preemption;
pub mod progress;
mod ranged_read;
pub mod run;
pub mod runtime;
pub mod save;
mod snapshot;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tier;
pub mod transfer;

pub use entry::{load, open, open_at, resolve_at, save, save_at, Target};
pub use error::{Error, ErrorKind, Result};
pub use geometry::TensorBox;
pub use info::CheckpointInfo;
pub use load::{Checkpoint, LoadOptions, RenameRule};
pub use run::{CheckpointRef, Run, Survey};
pub use save::SaveOptions;
pub use state::{DType, Entry, Piece, State, Tensor, Value};
pub use store::{register_scheme, unregister_scheme, Location, SchemeFactory, StoreOptions};
