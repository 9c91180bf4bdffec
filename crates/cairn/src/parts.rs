//! A checkpoint whose ranks a framework coordinates (torch DCP): the framework plans who
//! writes what (each box of each tensor once), every rank writes its tensors with
//! [`write_part`] and hands the returned [`Part`] to one coordinator, which commits all
//! of them with [`commit_parts`] — the manifest written last, as for every save. Cairn's
//! own multi-rank saves ([`crate::dist`]) plan and coordinate themselves; this is the
//! same writing and the same commit, for a framework that already does the rest.
//!
//! A rank's part can also stand alone: [`save_part`] commits what one rank holds as a
//! checkpoint of its own (a local tier's copy in a multi-rank job, on the rank's own
//! disk), and [`load_part`] reads it back as that rank's state, to be saved with the
//! other ranks' into the durable run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::commit;
use crate::dist::{declared_pieces, merge_piece, write_held, WrittenPiece};
use crate::error::{Error, Result};
use crate::format::layout;
use crate::format::manifest::{FileRecord, TensorRecord};
use crate::info::CheckpointInfo;
use crate::load::{Checkpoint, LoadOptions};
use crate::run::Run;
use crate::runtime::block_on;
use crate::save::{self, SaveOptions};
use crate::state::{Piece, State};
use crate::store::Location;

/// What one rank wrote into a checkpoint folder: where each of its pieces lies, and its
/// files. Sent to the coordinator as bytes ([`Part::to_bytes`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct Part {
    rank: u32,
    pieces: Vec<WrittenPiece>,
    files: BTreeMap<String, FileRecord>,
}

impl Part {
    /// The part as bytes, for the framework to carry to the coordinator.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::invalid("cannot encode a written part").with_source(e))
    }

    /// A part from [`Part::to_bytes`]; `from` names its sender in errors.
    pub fn from_bytes(bytes: &[u8], from: &str) -> Result<Part> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(format!("unreadable written part from {from}")).with_source(e))
    }

    /// The rank that wrote it.
    pub fn rank(&self) -> u32 {
        self.rank
    }
}

/// The checkpoint folder a save of `opts` into `location` writes, and its step: the
/// run's folder of `opts.step` when set, else `location` itself, whose step is the one
/// its name says (`step-000000000100`) or 0.
fn destination(location: &Location, opts: &SaveOptions) -> (Location, u64) {
    match opts.step {
        Some(step) => (Run::at(location.clone()).step_location(step), step),
        None => {
            let name = location.uri().trim_end_matches('/').rsplit('/').next().unwrap_or_default();
            (location.clone(), layout::parse_step_dir(name).unwrap_or(0))
        }
    }
}

/// Writes every tensor and piece of `state` (this rank's share, as the framework planned
/// it) as rank `rank`'s shard files, durably, into the checkpoint folder `location` (or
/// the step folder of the run `location` when `opts.step` is set); nothing is visible
/// until [`commit_parts`]. Refused when that folder is already committed. Plain values
/// and structure are the coordinator's (see [`commit_parts`]).
pub fn write_part(location: &Location, state: &State, rank: u32, opts: &SaveOptions) -> Result<Part> {
    write_own(location, state, rank, opts, true).map(|(part, ..)| part)
}

/// [`write_part`], also returning the checkpoint folder written, its step, and the tag
/// the files' names carry; whole tensors are declared with their content ids when
/// `contents` (what a coordinator's plan tells replicas by).
fn write_own(
    location: &Location,
    state: &State,
    rank: u32,
    opts: &SaveOptions,
    contents: bool,
) -> Result<(Part, Location, u64, String)> {
    let (dest, step) = destination(location, opts);
    if block_on(commit::is_committed(&dest))? {
        return Err(commit::already_committed(step, &dest));
    }
    let declared = declared_pieces(state, contents)?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (pieces, files) = write_held(&dest, state, rank, &tag[..12], opts, declared.iter())?;
    Ok((Part { rank, pieces, files }, dest, step, tag))
}

/// Commits the checkpoint folder that [`write_part`] wrote with the same `location` and
/// `opts` from every rank's [`Part`] (`world_size` ranks; a rank that wrote nothing may
/// send none): its tensors are the parts' pieces, its plain values and structure
/// `skeleton`'s (which holds no tensors). Every
/// reported file is checked to be there with its size, and the manifest is validated as
/// a reader would (a hole or overlap in a tensor's pieces is refused, naming it) before
/// the create-only commit.
pub fn commit_parts(
    location: &Location,
    skeleton: &State,
    opts: &SaveOptions,
    world_size: u32,
    parts: Vec<Part>,
) -> Result<CheckpointInfo> {
    if let Some((key, _)) = skeleton.tensors().next() {
        return Err(Error::invalid(format!("the coordinator's state holds a tensor, not only values key=`{key}`")));
    }
    let mut tensors: BTreeMap<String, TensorRecord> = BTreeMap::new();
    let mut files = BTreeMap::new();
    for part in parts {
        if part.rank >= world_size {
            return Err(Error::invalid(format!("a part from rank {} in a job of {world_size} ranks", part.rank)));
        }
        files.extend(part.files);
        for piece in part.pieces {
            merge_piece(&mut tensors, part.rank as usize, piece)?;
        }
    }
    let (dest, step) = destination(location, opts);
    let dest = &dest;
    let save_id = uuid::Uuid::new_v4().simple().to_string();
    let manifest = save::manifest_of(skeleton, step, opts, &save_id, world_size, tensors, files);
    block_on(crate::dist::confirm_files(dest, &manifest.files))?;
    block_on(commit::create_manifest(dest, &manifest, step))?;
    Ok(CheckpointInfo::from_manifest(&manifest, dest.uri()))
}

/// Saves and commits, into the run `location` (or the checkpoint folder, see
/// [`write_part`]), everything rank `rank` of `world_size` holds of `state` (its whole
/// tensors and its pieces of sharded ones) as a checkpoint of its own, marked as that
/// rank's part ([`Manifest::part`](crate::format::manifest::Manifest::part)): its
/// tensors may have holes where other ranks' pieces go. Written in full (an incremental
/// save writes everything here). Nothing is exchanged with the other ranks.
pub(crate) fn save_part(
    location: &Location,
    state: &State,
    opts: &SaveOptions,
    rank: u32,
    world_size: u32,
) -> Result<CheckpointInfo> {
    let started = std::time::Instant::now();
    let (part, dest, step, save_id) = write_own(location, state, rank, opts, false)?;
    let mut tensors = BTreeMap::new();
    for piece in part.pieces {
        merge_piece(&mut tensors, rank as usize, piece)?;
    }
    let mut manifest = save::manifest_of(state, step, opts, &save_id, world_size, tensors, part.files);
    manifest.part = Some(rank);
    manifest.timings = Some(crate::format::manifest::SaveTimings {
        snapshot_ms: opts.snapshot_time.map(|d| d.as_millis() as u64),
        write_ms: started.elapsed().as_millis() as u64,
    });
    block_on(commit::create_manifest(&dest, &manifest, step))?;
    Ok(CheckpointInfo::from_manifest(&manifest, dest.uri()))
}

/// Reads a rank's part ([`save_part`]) back as the state that rank held: its whole
/// tensors, its pieces of the others, its plain values and structure; every checksum is
/// verified. A local part's tensors are mapped from its files, not copied.
pub(crate) fn load_part(checkpoint: &Checkpoint) -> Result<State> {
    let manifest = checkpoint.manifest();
    if manifest.part.is_none() {
        return checkpoint.load(&LoadOptions::default());
    }
    // One load per piece index, each reading at most one box of each tensor.
    let most = manifest.tensors.values().map(|t| t.pieces.len()).max().unwrap_or(0);
    let mut state = State::new();
    for index in 0..most.max(1) {
        let mut opts = LoadOptions::default();
        let mut keys: Vec<&String> = Vec::new();
        for (key, record) in &manifest.tensors {
            if let Some(piece) = record.pieces.get(index) {
                opts = opts.with_box(key.clone(), piece.offsets.clone(), piece.shape.clone());
                keys.push(key);
            }
        }
        if index == 0 {
            keys.extend(manifest.values.keys());
        }
        let loaded = checkpoint.load(&opts.with_keys(keys))?;
        if index == 0 {
            state.set_structure(loaded.structure().map(str::to_string));
        }
        for (key, entry) in loaded.into_entries() {
            let (tensor, record) = match (entry, manifest.tensors.get(&key)) {
                (crate::state::Entry::Tensor(tensor), Some(record)) => (tensor, record),
                (entry, _) => {
                    state.insert(key, entry);
                    continue;
                }
            };
            let piece = &record.pieces[index];
            match piece.shape == record.shape {
                true => state.insert_tensor(key, tensor),
                false => state.insert_piece(
                    key,
                    Piece { tensor, offsets: piece.offsets.clone(), global_shape: record.shape.clone() },
                ),
            }
        }
    }
    Ok(state)
}
