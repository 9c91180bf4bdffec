//! Incremental saves: a save into a run writes only the tensors whose content no committed
//! checkpoint of the run holds yet, and names the stored copies instead (format version
//! 2's references to other checkpoints' files; docs/format.md, "Incremental saves").
//!
//! A tensor's content is its XXH3-128 with its length. A save finds the stored pieces by
//! reading the manifests of the run's committed checkpoints (newest first, so it refers
//! to the copies retention deletes last) and *pins* what it will refer to before it
//! relies on it: it writes the list of those files into its own folder, then checks that
//! each manifest it found them in is still committed. Deletions remove a manifest first,
//! then read the remaining manifests, then the pins, and keep every file either names
//! (see `Run::live_files`). So either the deletion sees the pin or the save sees the
//! manifest gone and writes those tensors itself: a committed checkpoint never refers to
//! deleted data. Pins live as long as the grace period of unfinished saves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::commit::{self, Owner};
use crate::error::{Error, ErrorKind, Result};
use crate::format::checksum;
use crate::format::layout::{self, DataFile, COORD_DIR};
use crate::format::manifest::{FileRecord, Manifest, PieceRecord};
use crate::run::Run;
use crate::state::{State, Tensor};
use crate::store::Location;

/// Largest pin read back (a pin lists files, not tensors: a few per checkpoint).
pub(crate) const MAX_PIN_BYTES: u64 = 16 << 20;
/// Below this many bytes of tensors, content ids are computed on one thread.
const PARALLEL_MIN_BYTES: u64 = 16 << 20;

/// The name of the pin of save `save_id`, relative to its checkpoint folder.
pub(crate) fn pin_file(save_id: &str) -> String {
    format!("{COORD_DIR}/pin-{save_id}.json")
}

/// Whether `file` (relative to a checkpoint folder) is a pin.
pub(crate) fn is_pin(file: &str) -> bool {
    file.strip_prefix(COORD_DIR)
        .and_then(|rest| rest.strip_prefix("/pin-"))
        .and_then(|rest| rest.strip_suffix(".json"))
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// What a pin holds: the data files (relative to the run) a save in flight refers to.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Pin {
    /// `step-<n>/shards/<name>` paths.
    pub(crate) files: BTreeSet<String>,
}

/// A piece some committed checkpoint of the run holds, found by its content.
#[derive(Debug, Clone)]
pub(crate) struct StoredPiece {
    /// Step of the folder that holds the file.
    pub(crate) step: u64,
    /// The file inside that folder (`shards/<name>`).
    pub(crate) shard: Arc<str>,
    /// The file's record, as the manifest that named it gave it.
    pub(crate) record: FileRecord,
    /// The piece's bytes in the file.
    pub(crate) range: [u64; 2],
    /// Their CRC-32C.
    pub(crate) crc32c: u32,
    /// The committed checkpoint whose manifest named it: its step and save id.
    pub(crate) source: (u64, Arc<str>),
}

impl StoredPiece {
    /// The file's path relative to the run.
    pub(crate) fn in_run(&self) -> String {
        format!("{}/{}", layout::step_dir(self.step), self.shard)
    }

    /// The name the manifest of the checkpoint of `own_step` gives the file.
    fn name_from(&self, own_step: u64) -> String {
        match self.step == own_step {
            true => self.shard.to_string(),
            false => layout::sibling_file(self.step, &self.shard),
        }
    }
}

/// The pieces the committed checkpoints of a run hold, by content id and length.
#[derive(Debug, Default)]
pub(crate) struct Stored {
    by_content: HashMap<(u128, u64), StoredPiece>,
}

impl Stored {
    /// Reads the manifests of the committed checkpoints of `run` other than `except`,
    /// newest first. Damaged checkpoints, and those deleted meanwhile, are passed over.
    pub(crate) async fn of_run(run: &Run, except: u64) -> Result<Stored> {
        let mut stored = Stored::default();
        for found in run.list_async().await?.iter().rev().filter(|c| c.step != except) {
            match crate::load::Checkpoint::open_async(found.location.clone()).await {
                Ok(ckpt) => stored.add(ckpt.manifest()),
                Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Corrupt | ErrorKind::Incompatible) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(stored)
    }

    /// Adds the pieces of `manifest` that carry a content id (a copy already known wins).
    fn add(&mut self, manifest: &Manifest) {
        let source = (manifest.step, Arc::<str>::from(manifest.save_id.as_str()));
        let mut files: BTreeMap<&str, (u64, Arc<str>)> = BTreeMap::new();
        for name in manifest.files.keys() {
            let place = match layout::parse_data_file(name) {
                Some(DataFile::Own(shard)) => (manifest.step, Arc::from(shard)),
                Some(DataFile::Sibling { step, shard }) => (step, Arc::from(shard)),
                None => continue,
            };
            files.insert(name, place);
        }
        for piece in manifest.tensors.values().flat_map(|t| &t.pieces) {
            let (Some(id), Some((step, shard)), Some(record)) =
                (piece.xxh3, files.get(piece.file.as_str()), manifest.files.get(&piece.file))
            else {
                continue;
            };
            let len = piece.range[1] - piece.range[0];
            self.by_content.entry((id, len)).or_insert_with(|| StoredPiece {
                step: *step,
                shard: shard.clone(),
                record: record.clone(),
                range: piece.range,
                crc32c: piece.crc32c,
                source: source.clone(),
            });
        }
    }

    fn find(&self, id: u128, len: u64) -> Option<&StoredPiece> {
        self.by_content.get(&(id, len))
    }
}

/// The content id of every tensor of `state`, by key, computed on up to as many threads
/// as there are cores (each takes a contiguous run of about equal bytes).
pub(crate) fn content_ids(state: &State) -> HashMap<String, u128> {
    let tensors: Vec<(&String, &Tensor)> = state.tensors().collect();
    let total = state.tensor_bytes();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if threads == 1 || total < PARALLEL_MIN_BYTES {
        return tensors.into_iter().map(|(k, t)| (k.clone(), checksum::content_id(t.data()))).collect();
    }
    let share = total.div_ceil(threads as u64);
    let mut runs: Vec<Vec<(&String, &Tensor)>> = vec![Vec::new()];
    let mut filled = 0u64;
    for tensor in tensors {
        if filled >= share {
            runs.push(Vec::new());
            filled = 0;
        }
        filled += tensor.1.data().len() as u64;
        if let Some(run) = runs.last_mut() {
            run.push(tensor);
        }
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .into_iter()
            .map(|run| {
                scope.spawn(move || {
                    run.into_iter().map(|(k, t)| (k.clone(), checksum::content_id(t.data()))).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    })
}

/// What an incremental save reuses, and the content ids of everything it saves.
#[derive(Debug, Default)]
pub(crate) struct Reuse {
    /// Content id of every tensor of the state.
    pub(crate) ids: HashMap<String, u128>,
    /// The tensors already stored, by key.
    pub(crate) reused: BTreeMap<String, StoredPiece>,
    /// The pin this save wrote, if it reuses anything.
    pin: Option<String>,
}

impl Reuse {
    /// Finds which tensors of `state` the run around `dest` (the folder of the checkpoint
    /// of `step`) already stores, pins their files, and keeps only those whose source
    /// manifests are still committed once the pin is written (see the module docs).
    pub(crate) async fn plan(dest: &Location, state: &State, step: u64, save_id: &str) -> Result<Reuse> {
        let hashed = state.clone();
        let ids = tokio::task::spawn_blocking(move || content_ids(&hashed))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, "content id task failed").with_source(e))?;
        let Some(run) = dest.parent() else {
            return Ok(Reuse { ids, ..Reuse::default() });
        };
        let run = Run::at(run);
        let stored = Stored::of_run(&run, step).await?;
        let mut reused: BTreeMap<String, StoredPiece> = state
            .tensors()
            .filter(|(_, t)| !t.data().is_empty())
            .filter_map(|(key, t)| {
                let found = stored.find(*ids.get(key)?, t.data().len() as u64)?;
                Some((key.clone(), found.clone()))
            })
            .collect();
        if reused.is_empty() {
            return Ok(Reuse { ids, reused, pin: None });
        }
        let pin = pin_file(save_id);
        let files: BTreeSet<String> = reused.values().map(StoredPiece::in_run).collect();
        let body = serde_json::to_vec(&Pin { files })
            .map_err(|e| Error::invalid("cannot encode the pin of an incremental save").with_source(e))?;
        let shown = format!("file=`{}/{pin}`", dest.uri());
        if let (Some(dir), Some(root)) = (dest.local_dir(), dest.local_root()) {
            root.check_folder(&dest.path(COORD_DIR))
                .and_then(|()| crate::store::create_dirs_durably(&dir.join(COORD_DIR)))
                .map_err(|e| Error::from_io(e, "writing pin", &shown))?;
        }
        dest.store()
            .put(&dest.path(&pin), PutPayload::from(body))
            .await
            .map_err(|e| Error::from_store(e, "writing pin", &shown))?;
        let mut this = Reuse { ids, reused: BTreeMap::new(), pin: Some(pin) };
        // The pin is in place: a source still committed now is deleted, if ever, after it,
        // and that deletion keeps what the pin names.
        let sources: BTreeSet<(u64, Arc<str>)> = reused.values().map(|p| p.source.clone()).collect();
        for (source_step, save_id) in sources {
            let owner = commit::manifest_owner(&run.step_location(source_step), &save_id).await;
            if !matches!(owner, Owner::Us) {
                reused.retain(|_, p| p.source.0 != source_step || *p.source.1 != *save_id);
            }
        }
        this.reused = reused;
        Ok(this)
    }

    /// The part of `state` this save writes itself: what it does not reuse.
    pub(crate) fn fresh(&self, state: &State) -> Option<State> {
        if self.reused.is_empty() {
            return None;
        }
        let mut fresh = State::new();
        for (key, tensor) in state.tensors().filter(|(k, _)| !self.reused.contains_key(*k)) {
            fresh.insert_tensor(key.clone(), tensor.clone());
        }
        Some(fresh)
    }

    /// The piece record of the reused tensor `key` of shape `shape`, and its file's name
    /// and record in the manifest of the checkpoint of `step`.
    pub(crate) fn reused_piece(&self, key: &str, shape: &[u64], step: u64) -> Option<(PieceRecord, FileRecord)> {
        let stored = self.reused.get(key)?;
        let piece = PieceRecord {
            file: stored.name_from(step),
            range: stored.range,
            offsets: vec![0; shape.len()],
            shape: shape.to_vec(),
            crc32c: stored.crc32c,
            xxh3: self.ids.get(key).copied(),
        };
        Some((piece, stored.record.clone()))
    }

    /// Removes the pin, if any (once the save committed or failed); best effort, prune
    /// removes a pin left behind.
    pub(crate) async fn unpin(&self, dest: &Location) {
        if let Some(pin) = &self.pin {
            let _ = dest.store().delete(&dest.path(pin)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DType;

    #[test]
    fn pins_are_named_in_the_coordination_folder() {
        assert!(is_pin(&pin_file("0123abcd")));
        assert!(layout::is_written_by_cairn(&pin_file("0123abcd")));
        for other in [".cairn-coord/pin-.json", ".cairn-coord/pin-a/b.json", "shards/pin-a.json", ".cairn-coord/x"] {
            assert!(!is_pin(other), "{other}");
        }
    }

    #[test]
    fn content_ids_match_on_one_thread_and_on_many() {
        let mut state = State::new();
        for i in 0..40u8 {
            let len = if i % 2 == 0 { 1 << 20 } else { 3 };
            state.insert_tensor(format!("t{i}"), Tensor::new(DType::U8, vec![len], vec![i; len as usize]).unwrap());
        }
        let ids = content_ids(&state);
        assert_eq!(ids.len(), 40);
        for (key, tensor) in state.tensors() {
            assert_eq!(ids[key], checksum::content_id(tensor.data()), "{key}");
        }
    }
}
