//! Incremental saves: a save into a run writes only the tensors whose content no committed
//! checkpoint of the run holds yet, and names the stored copies instead (format version
//! 2's references to other checkpoints' files; docs/format.md, "Incremental saves").
//!
//! A tensor's content is its XXH3-128 with its length. A save finds the stored pieces by
//! reading the manifests of the run's newest committed checkpoints (newest first, so it refers
//! to the copies retention deletes last) and *pins* what it may refer to before it
//! relies on it: it writes the list of those files into its own folder, then checks that
//! each manifest it found them in is still committed. Its tensors are then sampled shard
//! by shard as the shards are written (see `save`), and hashed whole only where a stored
//! piece has the same sample (`Dedup::needs_id`). It removes its pin once committed (or
//! failed for certain).
//!
//! Deletions remove a manifest first, then read the remaining manifests, then the pins,
//! then the manifests again, and keep every file any of them names (see
//! `Run::live_files`). A save that found a source still committed after pinning is seen
//! by every later deletion of it (its pin is read after that source went); a save whose
//! pin is gone by then had committed before (a commit whose outcome is unknown keeps its
//! pin), and its manifest is read after the pins. So a committed checkpoint never refers
//! to deleted data. Once its tensors are hashed, a save narrows its pin to what it refers
//! to. Pins live as long as the grace period of unfinished saves.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::commit::{self, Owner};
use crate::error::{Error, ErrorKind, Result};
use crate::format::layout::{self, DataFile, COORD_DIR};
use crate::format::manifest::{FileRecord, Manifest, PieceRecord};
use crate::run::Run;
use crate::state::Tensor;
use crate::store::Location;

/// How many of the newest committed checkpoints a save looks in for stored content. The
/// newest names everything still shared (each save refers to what it reuses), so a save
/// costs the same however many checkpoints the run keeps; content that comes back after
/// two saves without it is written again.
const SOURCES: usize = 2;
/// Largest pin read back (a pin lists files, not tensors: a few per checkpoint).
pub(crate) const MAX_PIN_BYTES: u64 = 16 << 20;

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
    /// The content samples and lengths of every stored piece that has one.
    samples: HashSet<(u64, u64)>,
}

impl Stored {
    /// Reads the manifests of the [`SOURCES`] newest readable committed checkpoints of
    /// `run` other than `except`. Damaged checkpoints, and those deleted meanwhile, are
    /// passed over.
    pub(crate) async fn of_run(run: &Run, except: u64) -> Result<Stored> {
        let mut stored = Stored::default();
        let mut read = 0;
        for found in run.list_async().await?.iter().rev().filter(|c| c.step != except) {
            if read == SOURCES {
                break;
            }
            match crate::load::Checkpoint::open_async(found.location.clone()).await {
                Ok(ckpt) => {
                    stored.add(ckpt.manifest());
                    read += 1;
                }
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
            let len = piece.range[1] - piece.range[0];
            if let Some(sample) = piece.sample {
                self.samples.insert((sample, len));
            }
            let (Some(id), Some((step, shard)), Some(record)) =
                (piece.xxh3, files.get(piece.file.as_str()), manifest.files.get(&piece.file))
            else {
                continue;
            };
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

/// What an incremental save may refer to: the stored pieces whose source manifests were
/// still committed once every file they lie in was pinned.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    stored: Stored,
    /// The pin this save wrote, if the run stores anything.
    pin: Option<String>,
}

impl Dedup {
    /// Reads what the run around `dest` (the folder of the checkpoint of `step`) stores,
    /// pins every file of it, then keeps only the pieces whose source manifests are still
    /// committed (see the module docs). The save then samples its tensors shard by shard,
    /// while other shards are being written, hashes those whose sample is stored, and
    /// refers to whatever is found here.
    pub(crate) async fn prepare(dest: &Location, step: u64, save_id: &str) -> Result<Dedup> {
        let Some(run) = dest.parent() else {
            return Ok(Dedup::default());
        };
        let run = Run::at(run);
        let mut stored = Stored::of_run(&run, step).await?;
        if stored.by_content.is_empty() {
            return Ok(Dedup { stored, pin: None });
        }
        let pin = pin_file(save_id);
        let files: BTreeSet<String> = stored.by_content.values().map(StoredPiece::in_run).collect();
        let body = serde_json::to_vec(&Pin { files })
            .map_err(|e| Error::invalid("cannot encode the pin of an incremental save").with_source(e))?;
        let shown = format!("file=`{}/{pin}`", dest.uri());
        if let (Some(dir), Some(root)) = (dest.local_dir(), dest.local_root()) {
            root.check_folder(&dest.path(COORD_DIR))
                .and_then(|()| crate::store::create_dirs_durably(&dir.join(COORD_DIR)))
                .map_err(|e| Error::from_io(e, "writing pin", &shown))?;
        }
        let put = dest.store().put(&dest.path(&pin), PutPayload::from(body)).await;
        put.map_err(|e| Error::from_store(e, "writing pin", &shown))?;
        // The pin is in place: a source still committed now is deleted, if ever, after it,
        // and that deletion keeps what the pin names.
        let sources: BTreeSet<(u64, Arc<str>)> = stored.by_content.values().map(|p| p.source.clone()).collect();
        for (source_step, save_id) in sources {
            let owner = commit::manifest_owner(&run.step_location(source_step), &save_id).await;
            if !matches!(owner, Owner::Us) {
                stored.by_content.retain(|_, p| p.source.0 != source_step || *p.source.1 != *save_id);
            }
        }
        Ok(Dedup { stored, pin: Some(pin) })
    }

    /// Whether a tensor of `len` bytes with content sample `sample` must be hashed whole:
    /// when some stored piece has that sample (it may hold the same content, or be about
    /// to stop changing), and in a run that stores no samples yet (its first such save
    /// records the ids of everything). Otherwise the tensor changed, certainly: it is
    /// written without its id, which costs a pass over its bytes.
    pub(crate) fn needs_id(&self, sample: u64, len: u64) -> bool {
        self.stored.samples.is_empty() || self.stored.samples.contains(&(sample, len))
    }

    /// The manifest records that refer to the stored copy of `tensor`, whose content id is
    /// `id` and sample `sample`, in the checkpoint of `step`: its piece and its file's
    /// name and record. `None` if nothing stored holds that content at an offset that
    /// suits its element size.
    pub(crate) fn refer(&self, id: u128, sample: u64, tensor: &Tensor, step: u64) -> Option<(PieceRecord, FileRecord)> {
        let len = tensor.data().len() as u64;
        if len == 0 {
            return None;
        }
        let shape = tensor.shape();
        // Bytes stored for another dtype may start where this one's elements cannot.
        let stored = self.stored.find(id, len).filter(|p| p.range[0] % tensor.dtype().size() as u64 == 0)?;
        let piece = PieceRecord {
            file: stored.name_from(step),
            range: stored.range,
            offsets: vec![0; shape.len()],
            shape: shape.to_vec(),
            crc32c: stored.crc32c,
            xxh3: Some(id),
            sample: Some(sample),
        };
        Some((piece, stored.record.clone()))
    }

    /// Rewrites the pin to name only the files the save refers to (`files`, as its
    /// manifest names them, for the checkpoint of `step`), once its tensors are all
    /// hashed: what it pinned besides may go. No pin is written when it refers to nothing.
    pub(crate) async fn narrow_pin<'f>(
        &self,
        dest: &Location,
        step: u64,
        files: impl Iterator<Item = &'f str>,
    ) -> Result<()> {
        let Some(pin) = &self.pin else { return Ok(()) };
        let in_run = files.filter_map(|f| layout::parse_data_file(f).map(|d| d.in_run(step))).collect();
        let body = serde_json::to_vec(&Pin { files: in_run })
            .map_err(|e| Error::invalid("cannot encode the pin of an incremental save").with_source(e))?;
        let shown = format!("file=`{}/{pin}`", dest.uri());
        let put = dest.store().put(&dest.path(pin), PutPayload::from(body)).await;
        put.map(drop).map_err(|e| Error::from_store(e, "writing pin", &shown))
    }

    /// Removes the pin, if any (once the save committed or failed for certain); best
    /// effort, prune removes a pin left behind.
    pub(crate) async fn unpin(&self, dest: &Location) {
        if let Some(pin) = &self.pin {
            let _ = dest.store().delete(&dest.path(pin)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_named_in_the_coordination_folder() {
        assert!(is_pin(&pin_file("0123abcd")));
        assert!(layout::is_written_by_cairn(&pin_file("0123abcd")));
        for other in [".cairn-coord/pin-.json", ".cairn-coord/pin-a/b.json", "shards/pin-a.json", ".cairn-coord/x"] {
            assert!(!is_pin(other), "{other}");
        }
    }
}
