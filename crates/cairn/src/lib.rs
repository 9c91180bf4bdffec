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

mod commit;
pub mod dist;
pub mod error;
pub mod fault;
pub mod format;
pub mod geometry;
pub mod info;
pub mod load;
mod local_store;
mod local_write;
pub mod manager;
pub mod policy;
mod preemption;
mod ranged_read;
pub mod run;
pub mod runtime;
pub mod save;
mod snapshot;
pub mod store;
pub mod transfer;
pub mod tree;

pub use error::{Error, ErrorKind, Result};
pub use info::CheckpointInfo;
pub use load::{Checkpoint, LoadOptions, Region, RenameRule};
pub use run::{CheckpointRef, Run, Survey};
pub use save::SaveOptions;
pub use store::{register_scheme, unregister_scheme, Location, SchemeFactory, StoreOptions};
pub use tree::{DType, Entry, Slice, State, Tensor, Value};

use format::layout::MANIFEST_FILE;
use object_store::ObjectStoreExt;

/// Saves `state` to `uri` and commits it. With `opts.step` set, `uri` is a run and the
/// checkpoint goes to `<uri>/step-<step>`; without, `uri` is the checkpoint folder.
/// Returns once the checkpoint is committed (and durable, on local disk).
pub fn save(uri: &str, state: &State, opts: &SaveOptions) -> Result<CheckpointInfo> {
    save_at(&Location::create(uri)?, state, opts)
}

/// [`save`] to an already resolved location (e.g. one opened with store options).
pub fn save_at(location: &Location, state: &State, opts: &SaveOptions) -> Result<CheckpointInfo> {
    match opts.step {
        Some(_) => Run::at(location.clone()).save(state, opts),
        None => runtime::block_on(save::save_checkpoint(location, state, 0, opts)),
    }
}

/// Opens `uri` as a checkpoint folder if it holds a manifest, else as a run whose latest
/// committed checkpoint is opened.
pub fn open(uri: &str) -> Result<Checkpoint> {
    open_at(Location::open(uri)?)
}

/// [`open`] at an already resolved location.
pub fn open_at(location: Location) -> Result<Checkpoint> {
    let manifest = location.path(MANIFEST_FILE);
    let is_checkpoint = runtime::block_on(async {
        match location.store().head(&manifest).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::from_store(e, "opening checkpoint", &format!("uri=`{}`", location.uri()))),
        }
    })?;
    if is_checkpoint {
        return runtime::block_on(Checkpoint::open_at(location));
    }
    let uri = location.uri().to_string();
    Run::at(location).latest()?.ok_or_else(|| Error::not_found(format!("no committed checkpoint uri=`{uri}`")))
}

/// Loads `uri` (a checkpoint folder, or a run's latest checkpoint) with `opts`.
pub fn load(uri: &str, opts: &LoadOptions) -> Result<(State, CheckpointInfo)> {
    let checkpoint = open(uri)?;
    Ok((checkpoint.load(opts)?, checkpoint.info()))
}
