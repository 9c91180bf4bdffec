//! Loading: open a committed checkpoint (its manifest, validated), select and rename keys,
//! read the needed pieces in parallel across files, verify every checksum, assemble.
//!
//! Local files are memory-mapped and tensors point into the mapping (no copy); other
//! stores are read with ranged GETs of exactly the needed bytes. Every byte range comes
//! from a validated manifest and is checked against the real file size before use.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use regex::Regex;

use crate::error::{Error, ErrorKind, Result};
use crate::format::checksum;
use crate::format::layout::{self, DataFile, MANIFEST_FILE};
use crate::format::manifest::{FileRecord, Manifest, PieceRecord, TensorRecord, MAX_MANIFEST_BYTES};
use crate::geometry::{self, TensorBox};
use crate::info::CheckpointInfo;
use crate::local_store::Root;
use crate::ranged_read;
use crate::runtime::block_on;
use crate::state::{checked_nbytes, checked_numel, Entry, State, Tensor};
use crate::store::Location;

/// One piece to read: where its bytes lie, their checksum, and the slot (its number among
/// the pieces of one load) its bytes go to.
#[derive(Debug, Clone, Copy)]
struct PieceRead {
    slot: usize,
    range: [u64; 2],
    crc32c: u32,
}

/// A key renaming rule applied on load: every match of `pattern` becomes `replacement`
/// (`$1` etc. refer to groups), e.g. `^module\.` → `` strips DDP's prefix.
#[derive(Debug, Clone)]
pub struct RenameRule {
    pattern: Regex,
    replacement: String,
}

impl RenameRule {
    /// A rule from a regex pattern and its replacement.
    pub fn new(pattern: &str, replacement: impl Into<String>) -> Result<RenameRule> {
        let pattern = Regex::new(pattern)
            .map_err(|e| Error::invalid(format!("invalid rename pattern pattern=`{pattern}`")).with_source(e))?;
        Ok(RenameRule { pattern, replacement: replacement.into() })
    }

    fn apply(&self, key: &str) -> String {
        self.pattern.replace_all(key, self.replacement.as_str()).into_owned()
    }
}

/// What to load and how.
///
/// ```
/// let opts = cairn::LoadOptions::default().with_prefix("model.");
/// assert_eq!(opts.prefixes, vec!["model.".to_string()]);
/// ```
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Load only keys starting with one of these (all keys when empty).
    pub prefixes: Vec<String>,
    /// Load exactly these keys; a missing one is [`ErrorKind::NotFound`].
    pub keys: Option<Vec<String>>,
    /// Renaming rules applied in order to each selected key.
    pub rename: Vec<RenameRule>,
    /// Load only a box of these tensors (by stored key). Only the pieces that overlap a
    /// box are read. A box outside the global shape is [`ErrorKind::Invalid`].
    pub boxes: BTreeMap<String, TensorBox>,
    /// The global shape each of these tensors must have (by stored key), e.g. the shape
    /// of the tensor a load fills; another shape is [`ErrorKind::Invalid`], naming both.
    pub shapes: BTreeMap<String, Vec<u64>>,
    /// The rank whose own values, structure and tensors to read: a multi-rank save keeps
    /// each rank's plain values and structure where they differ from rank 0's, and its
    /// whole tensors where ranks held different contents under one key. `None`: the
    /// shared ones (rank 0's values and structure, the lowest-ranked holder's tensors).
    pub rank: Option<u32>,
    /// Verify each piece's checksum (on by default).
    pub verify: bool,
    /// Files read at once.
    pub concurrency: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            prefixes: Vec::new(),
            keys: None,
            rename: Vec::new(),
            boxes: BTreeMap::new(),
            shapes: BTreeMap::new(),
            rank: None,
            verify: true,
            concurrency: std::thread::available_parallelism().map_or(4, |n| n.get()).clamp(2, 16),
        }
    }
}

impl LoadOptions {
    /// Adds a key prefix to select.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefixes.push(prefix.into());
        self
    }

    /// Selects exactly `keys`.
    pub fn with_keys<I: IntoIterator<Item = S>, S: Into<String>>(mut self, keys: I) -> Self {
        self.keys = Some(keys.into_iter().map(Into::into).collect());
        self
    }

    /// Adds a renaming rule.
    pub fn with_rename(mut self, rule: RenameRule) -> Self {
        self.rename.push(rule);
        self
    }

    /// Loads only the box `(offsets, shape)` of the tensor `key` (resharding on load).
    pub fn with_box(mut self, key: impl Into<String>, offsets: Vec<u64>, shape: Vec<u64>) -> Self {
        self.boxes.insert(key.into(), TensorBox { offsets, shape });
        self
    }

    /// Reads the plain values and structure that rank `rank` saved.
    pub fn with_rank(mut self, rank: u32) -> Self {
        self.rank = Some(rank);
        self
    }

    /// Requires the tensor `key` to have the global shape `shape`.
    pub fn with_shape(mut self, key: impl Into<String>, shape: Vec<u64>) -> Self {
        self.shapes.insert(key.into(), shape);
        self
    }
}

/// A committed checkpoint whose manifest has been read and validated.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    location: Location,
    manifest: Manifest,
    /// The run around the checkpoint, when its manifest names files of other checkpoints.
    run: Option<Location>,
}

impl Checkpoint {
    /// Opens the checkpoint folder at `location`; [`ErrorKind::NotFound`] if it has no
    /// manifest (never committed), [`ErrorKind::Corrupt`] if the manifest is damaged or
    /// names another step than its `step-N` folder (a checkpoint copied in by hand: it
    /// would mislead resumption and retention).
    pub async fn open_async(location: Location) -> Result<Checkpoint> {
        let path = location.path(MANIFEST_FILE);
        let file = format!("{}/{MANIFEST_FILE}", location.uri());
        let got = location.store().get(&path).await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => {
                Error::not_found(format!("no committed checkpoint (manifest missing) file=`{file}`"))
            }
            other => Error::from_store(other, "reading manifest", &format!("file=`{file}`")),
        })?;
        if got.meta.size > MAX_MANIFEST_BYTES {
            return Err(Error::corrupt(format!("manifest of {} bytes exceeds the limit file=`{file}`", got.meta.size)));
        }
        let bytes =
            got.bytes().await.map_err(|e| Error::from_store(e, "reading manifest", &format!("file=`{file}`")))?;
        let manifest = Manifest::decode(&bytes, &file)?;
        let folder = location.uri().trim_end_matches('/').rsplit('/').next().unwrap_or_default();
        if let Some(step) = layout::parse_step_dir(folder).filter(|&step| step != manifest.step) {
            return Err(Error::corrupt(format!(
                "manifest says step {} but its folder is step {step} (copied from another run?) file=`{file}`",
                manifest.step
            )));
        }
        let run = match manifest.has_references() {
            true => Some(location.parent().ok_or_else(|| {
                Error::corrupt(format!(
                    "manifest names other checkpoints' files but has no run around it file=`{file}`"
                ))
            })?),
            false => None,
        };
        Ok(Checkpoint { location, manifest, run })
    }

    /// Where the data file `file` of the manifest lives: the folder that holds it (this
    /// checkpoint's, or for a reference another checkpoint's of the same run) and its
    /// path there. Only names the manifest's validation accepted reach here.
    pub(crate) fn data_file(&self, file: &str) -> Result<(Location, String)> {
        match (layout::parse_data_file(file), &self.run) {
            (Some(DataFile::Own(shard)), _) => Ok((self.location.clone(), shard.to_string())),
            (Some(DataFile::Sibling { step, shard }), Some(run)) => {
                Ok((run.child(&layout::step_dir(step)), shard.to_string()))
            }
            _ => Err(Error::corrupt(format!(
                "data file outside the run data_file=`{}` checkpoint=`{}`",
                crate::error::escape_control(file),
                self.location.uri()
            ))),
        }
    }

    /// The validated manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Where the checkpoint lives.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Its summary.
    pub fn info(&self) -> CheckpointInfo {
        CheckpointInfo::from_manifest(&self.manifest, self.location.uri())
    }

    /// Loads the selected keys. Checksums are verified unless `opts.verify` is off.
    pub async fn load_async(&self, opts: &LoadOptions) -> Result<State> {
        self.load_async_with(opts, &crate::progress::quiet).await
    }

    /// [`Checkpoint::load_async`], telling `progress` the bytes of the tensors of each
    /// data file once they are read and checked
    /// ([`Stage::Reading`](crate::progress::Stage::Reading)).
    pub async fn load_async_with(&self, opts: &LoadOptions, progress: crate::progress::Progress<'_>) -> Result<State> {
        match self.read_selected(opts, progress).await {
            Err(e) if e.kind() == ErrorKind::Corrupt && !self.still_committed().await => Err(Error::not_found(
                format!("checkpoint was deleted while it was being read checkpoint=`{}`", self.location.uri()),
            )),
            other => other,
        }
    }

    /// Whether the manifest is still there (a reader racing a deletion sees missing data
    /// files; that checkpoint is gone, not corrupt).
    async fn still_committed(&self) -> bool {
        crate::commit::is_committed(&self.location).await.unwrap_or(true)
    }

    async fn read_selected(&self, opts: &LoadOptions, progress: crate::progress::Progress<'_>) -> Result<State> {
        let (values, structure) = self.manifest.held_by(opts.rank);
        let selected = self.select(opts)?;
        let boxes = self.boxes(&selected, opts)?;
        // Every piece to read gets a slot; `owners[slot]` is its tensor's key and its index
        // among the tensor's pieces, and the slots of one tensor are consecutive.
        let mut owners: Vec<(&str, usize)> = Vec::new();
        let mut slots_of: Vec<std::ops::Range<usize>> = Vec::with_capacity(selected.len());
        let mut by_file: BTreeMap<&str, Vec<PieceRead>> = BTreeMap::new();
        // Each selected key's tensor record (None: a plain value), looked up once.
        let records: Vec<Option<&TensorRecord>> =
            selected.iter().map(|(key, _)| self.manifest.tensor_for(key, opts.rank)).collect();
        for ((key, _), record) in selected.iter().zip(&records) {
            let first = owners.len();
            if let Some(record) = record {
                if let Some(rank) = self.manifest.part {
                    self.check_held(key, record, boxes.get(*key).copied(), rank)?;
                }
                for (index, piece) in record.pieces.iter().enumerate() {
                    let overlaps = boxes.get(*key).is_none_or(|r| {
                        geometry::intersection(&r.offsets, &r.shape, &piece.offsets, &piece.shape).is_some()
                    });
                    if overlaps {
                        let read = PieceRead { slot: owners.len(), range: piece.range, crc32c: piece.crc32c };
                        by_file.entry(piece.file.as_str()).or_default().push(read);
                        owners.push((key, index));
                    }
                }
            }
            slots_of.push(first..owners.len());
        }
        let jobs = by_file.into_iter().map(|(file, pieces)| async {
            let read = self.read_file(file, pieces, opts.verify, &owners).await?;
            progress(crate::progress::Stage::Reading, read.iter().map(|(_, bytes)| bytes.len() as u64).sum());
            Ok::<_, Error>(read)
        });
        let read: Vec<Vec<(usize, Bytes)>> =
            futures::stream::iter(jobs).buffer_unordered(opts.concurrency.max(1)).try_collect().await?;
        let mut slots: Vec<Bytes> = vec![Bytes::new(); owners.len()];
        for (slot, bytes) in read.into_iter().flatten() {
            slots[slot] = bytes;
        }

        let mut entries = Vec::with_capacity(selected.len());
        for (((key, new_key), range), record) in selected.into_iter().zip(slots_of).zip(records) {
            let entry = if let Some(record) = record {
                let whole = TensorBox { offsets: vec![0; record.shape.len()], shape: record.shape.clone() };
                let wanted = boxes.get(key).copied().unwrap_or(&whole);
                let pieces = range.map(|slot| (owners[slot].1, std::mem::take(&mut slots[slot])));
                Entry::Tensor(self.assemble(key, record, wanted, pieces)?)
            } else if let Some(value) = values.get(key) {
                Entry::Value(value.clone())
            } else {
                continue;
            };
            entries.push((new_key, entry));
        }
        let mut state: State = entries.into_iter().collect();
        state.set_structure(structure.map(str::to_string));
        Ok(state)
    }

    /// The requested boxes of selected tensors, each checked against its global shape
    /// (and that shape against the one required, if any).
    fn boxes<'o>(&self, selected: &[(&str, String)], opts: &'o LoadOptions) -> Result<BTreeMap<String, &'o TensorBox>> {
        for (key, shape) in &opts.shapes {
            match self.manifest.tensor_for(key, opts.rank) {
                Some(record) if &record.shape != shape => {
                    return Err(Error::invalid(format!(
                        "tensor has shape {:?} in the checkpoint, {shape:?} is required key=`{key}` checkpoint=`{}`",
                        record.shape,
                        self.location.uri()
                    )))
                }
                Some(_) => {}
                None if self.manifest.held_by(opts.rank).0.contains_key(key) => {
                    return Err(Error::invalid(format!(
                        "the checkpoint holds a plain value where a tensor is required key=`{key}` checkpoint=`{}`",
                        self.location.uri()
                    )))
                }
                None => {
                    return Err(Error::not_found(format!(
                        "tensor not in checkpoint key=`{key}` checkpoint=`{}`",
                        self.location.uri()
                    )))
                }
            }
        }
        let mut out = BTreeMap::new();
        for (key, wanted) in &opts.boxes {
            let Some(record) = self.manifest.tensor_for(key, opts.rank) else {
                return Err(Error::not_found(format!(
                    "tensor to load a box of is not in checkpoint key=`{key}` checkpoint=`{}`",
                    self.location.uri()
                )));
            };
            let inside = wanted.offsets.len() == record.shape.len()
                && wanted.shape.len() == record.shape.len()
                && wanted
                    .offsets
                    .iter()
                    .zip(&wanted.shape)
                    .zip(&record.shape)
                    .all(|((&o, &l), &d)| o.checked_add(l).is_some_and(|e| e <= d));
            if !inside {
                return Err(Error::invalid(format!(
                    "requested box offsets {:?} shape {:?} lies outside global shape {:?} key=`{key}`",
                    wanted.offsets, wanted.shape, record.shape
                )));
            }
            if selected.iter().any(|(k, _)| k == key) {
                out.insert(key.clone(), wanted);
            }
        }
        Ok(out)
    }

    /// Selected stored keys with their new names, in stored-key order.
    fn select<'m>(&'m self, opts: &LoadOptions) -> Result<Vec<(&'m str, String)>> {
        let (values, _) = self.manifest.held_by(opts.rank);
        let all = self.manifest.tensors.keys().chain(values.keys());
        let mut chosen: Vec<&str> = match &opts.keys {
            Some(keys) => {
                let mut out = Vec::with_capacity(keys.len());
                for key in keys {
                    let found = self
                        .manifest
                        .tensors
                        .get_key_value(key)
                        .map(|(k, _)| k.as_str())
                        .or_else(|| values.get_key_value(key).map(|(k, _)| k.as_str()));
                    match found {
                        Some(k) => out.push(k),
                        None => {
                            return Err(Error::not_found(format!(
                                "key not in checkpoint key=`{key}` checkpoint=`{}`",
                                self.location.uri()
                            )))
                        }
                    }
                }
                out
            }
            None if opts.prefixes.is_empty() => all.map(String::as_str).collect(),
            None => {
                all.filter(|k| opts.prefixes.iter().any(|p| k.starts_with(p.as_str()))).map(String::as_str).collect()
            }
        };
        chosen.sort_unstable();
        chosen.dedup();
        if opts.rename.is_empty() {
            return Ok(chosen.into_iter().map(|key| (key, key.to_string())).collect());
        }
        let mut seen: HashMap<String, &str> = HashMap::with_capacity(chosen.len());
        let mut out = Vec::with_capacity(chosen.len());
        for key in chosen {
            let new_key = opts.rename.iter().fold(key.to_string(), |k, rule| rule.apply(&k));
            if let Some(previous) = seen.insert(new_key.clone(), key) {
                return Err(Error::invalid(format!(
                    "renaming maps two keys to one key=`{previous}` key=`{key}` renamed=`{new_key}`"
                )));
            }
            out.push((key, new_key));
        }
        Ok(out)
    }

    /// Reads `pieces` of `file` and verifies their checksums (and the header's): each
    /// piece's bytes under its slot. `owners` names the slots in errors.
    async fn read_file(
        &self,
        file: &str,
        mut pieces: Vec<PieceRead>,
        verify: bool,
        owners: &[(&str, usize)],
    ) -> Result<Vec<(usize, Bytes)>> {
        // In file order: a cold file is then read front to back, as the kernel's readahead
        // expects, whatever the order of the keys.
        pieces.sort_unstable_by_key(|p| p.range[0]);
        let ranges: Vec<std::ops::Range<u64>> = pieces.iter().map(|p| p.range[0]..p.range[1]).collect();
        // A file that is missing or of the wrong size: say which tensor needed it.
        let (record, chunks) = self.fetch(file, ranges).await.map_err(|e| match (e.kind(), pieces.first()) {
            (ErrorKind::Corrupt, Some(first)) => {
                Error::corrupt(format!("{} tensor=`{}`", e.message(), owners[first.slot].0))
            }
            _ => e,
        })?;
        let shown = format!("{}/{file}", self.location.uri());
        let header_crc = record.header_crc32c;
        // Err(None): the header's checksum failed; Err(Some(slot)): that piece's.
        let checked = tokio::task::spawn_blocking(move || {
            let mut chunks = chunks.into_iter();
            let header = chunks.next().unwrap_or_default();
            if verify && checksum::crc32c(&header) != header_crc {
                return Err(None);
            }
            let mut out = Vec::with_capacity(pieces.len());
            for (piece, data) in pieces.into_iter().zip(chunks) {
                if verify && checksum::crc32c(&data) != piece.crc32c {
                    return Err(Some(piece.slot));
                }
                out.push((piece.slot, data));
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("checksum task failed file=`{file}`")).with_source(e))?;
        checked.map_err(|failed| match failed {
            None => Error::corrupt(format!("checksum mismatch in shard header file=`{shown}`")),
            Some(slot) => Error::corrupt(format!("checksum mismatch tensor=`{}` file=`{shown}`", owners[slot].0)),
        })
    }

    /// Fetches the header of `file` followed by `ranges` (no copy when local),
    /// after checking the file's real size against the manifest.
    async fn fetch(&self, file: &str, ranges: Vec<std::ops::Range<u64>>) -> Result<(FileRecord, Vec<Bytes>)> {
        let record = self.manifest.files.get(file).cloned().ok_or_else(|| {
            Error::corrupt(format!(
                "piece references unknown data file data_file=`{file}` checkpoint=`{}`",
                self.location.uri()
            ))
        })?;
        let (folder, inner) = self.data_file(file)?;
        let shown = format!("{}/{inner}", folder.uri());
        let mut all = Vec::with_capacity(ranges.len() + 1);
        all.push(0..record.header_len);
        all.extend(ranges);
        let chunks = match folder.local_root() {
            Some(root) => {
                let root = root.clone();
                let path = folder.path(&inner);
                let record = record.clone();
                let task = tokio::task::spawn_blocking(move || map_local(&root, &path, &record, &all, &shown));
                task.await.map_err(|e| {
                    Error::new(ErrorKind::Internal, format!("read task failed file=`{file}`")).with_source(e)
                })??
            }
            None => get_remote(&folder.path(&inner), folder.store().as_ref(), &record, &all, &shown).await?,
        };
        Ok((record, chunks))
    }

    /// Reads every byte of the checkpoint and checks every size and checksum. Returns
    /// one error per problem found (empty when intact); fails only when the store
    /// itself cannot be read.
    pub async fn verify_async(&self) -> Result<Vec<Error>> {
        self.verify_async_with(&crate::progress::quiet).await
    }

    /// [`Checkpoint::verify_async`], telling `progress` the bytes of each data file once
    /// it is checked ([`Stage::Verifying`](crate::progress::Stage::Verifying)).
    pub async fn verify_async_with(&self, progress: crate::progress::Progress<'_>) -> Result<Vec<Error>> {
        let mut problems = Vec::new();
        let mut by_file: BTreeMap<&str, Vec<(&str, &PieceRecord)>> = BTreeMap::new();
        for (key, record) in self.manifest.all_tensors() {
            for piece in &record.pieces {
                by_file.entry(piece.file.as_str()).or_default().push((key.as_str(), piece));
            }
        }
        for file in self.manifest.files.keys() {
            let pieces = by_file.remove(file.as_str()).unwrap_or_default();
            let ranges = pieces.iter().map(|(_, p)| p.range[0]..p.range[1]).collect();
            let shown = format!("{}/{file}", self.location.uri());
            let size = self.manifest.files.get(file).map_or(0, |f| f.size);
            let fetched = self.fetch(file, ranges).await;
            progress(crate::progress::Stage::Verifying, size);
            let (record, chunks) = match fetched {
                Ok(fetched) => fetched,
                Err(e) if e.kind() == ErrorKind::Corrupt => {
                    problems.push(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut chunks = chunks.into_iter();
            if checksum::crc32c(&chunks.next().unwrap_or_default()) != record.header_crc32c {
                problems.push(Error::corrupt(format!("checksum mismatch in shard header file=`{shown}`")));
            }
            for ((key, piece), data) in pieces.into_iter().zip(chunks) {
                if checksum::crc32c(&data) != piece.crc32c {
                    problems.push(Error::corrupt(format!("checksum mismatch tensor=`{key}` file=`{shown}`")));
                }
            }
        }
        Ok(problems)
    }

    /// In one rank's part (see [`Manifest::part`]), refuses a load of the box `wanted` (the
    /// whole tensor when `None`) of the tensor `key` that its pieces do not cover: the
    /// rest of it is in the other ranks' parts.
    fn check_held(&self, key: &str, record: &TensorRecord, wanted: Option<&TensorBox>, rank: u32) -> Result<()> {
        let whole = TensorBox { offsets: vec![0; record.shape.len()], shape: record.shape.clone() };
        let wanted = wanted.unwrap_or(&whole);
        let covered: u64 = record
            .pieces
            .iter()
            .filter_map(|p| geometry::intersection(&wanted.offsets, &wanted.shape, &p.offsets, &p.shape))
            .map(|(_, shape)| checked_numel(&shape).unwrap_or(0))
            .sum();
        if covered < checked_numel(&wanted.shape).unwrap_or(u64::MAX) {
            return Err(Error::new(
                ErrorKind::Incompatible,
                format!(
                    "this copy holds only rank {rank}'s part, not all of box offsets {:?} shape {:?} tensor=`{key}` checkpoint=`{}`",
                    wanted.offsets,
                    wanted.shape,
                    self.location.uri()
                ),
            ));
        }
        Ok(())
    }

    /// Builds the box `wanted` of the tensor `key` from its read pieces (`(index among the
    /// tensor's pieces, bytes)`): no copy when a single piece is exactly that box, else a
    /// buffer of the box's size (bounded by the verified file sizes) filled from every
    /// overlapping piece.
    fn assemble(
        &self,
        key: &str,
        record: &TensorRecord,
        wanted: &TensorBox,
        mut pieces: impl Iterator<Item = (usize, Bytes)>,
    ) -> Result<Tensor> {
        let shown = || format!("tensor=`{key}` checkpoint=`{}`", self.location.uri());
        let exact = record.pieces.iter().position(|p| p.offsets == wanted.offsets && p.shape == wanted.shape);
        if let Some(index) = exact {
            let data = pieces.find(|(i, _)| *i == index).map(|(_, data)| data).unwrap_or_default();
            return Tensor::new(record.dtype, wanted.shape.clone(), data)
                .map_err(|e| Error::corrupt(format!("{} {}", e.message(), shown())));
        }
        let nbytes = checked_nbytes(record.dtype, &wanted.shape)
            .ok_or_else(|| Error::corrupt(format!("shape overflows {}", shown())))?;
        let mut buffer = vec![0u8; nbytes as usize];
        for (index, data) in pieces {
            let piece = &record.pieces[index];
            geometry::copy_intersection(
                &mut buffer,
                &wanted.offsets,
                &wanted.shape,
                &data,
                &piece.offsets,
                &piece.shape,
                record.dtype.size(),
            );
        }
        Tensor::new(record.dtype, wanted.shape.clone(), buffer)
    }
}

impl Checkpoint {
    /// What a save just wrote into `location`, before any manifest: `files`, and the
    /// tensors whose pieces lie in them (as recorded in no manifest yet), to verify them.
    pub(crate) fn written(
        location: Location,
        files: BTreeMap<String, FileRecord>,
        tensors: BTreeMap<String, TensorRecord>,
    ) -> Checkpoint {
        let manifest =
            crate::save::manifest_of(&State::new(), 0, &crate::save::SaveOptions::default(), "", 1, tensors, files);
        Checkpoint { location, manifest, run: None }
    }
}

/// The blocking forms, for callers outside an async runtime (the CLI, Python, tests).
impl Checkpoint {
    /// Opens the checkpoint folder `uri`; see [`Checkpoint::open_async`].
    pub fn open(uri: &str) -> Result<Checkpoint> {
        Checkpoint::open_at(Location::open(uri)?)
    }

    /// Opens the checkpoint folder at an already resolved location.
    pub fn open_at(location: Location) -> Result<Checkpoint> {
        block_on(Checkpoint::open_async(location))
    }

    /// Loads the selected keys; see [`Checkpoint::load_async`].
    pub fn load(&self, opts: &LoadOptions) -> Result<State> {
        block_on(self.load_async(opts))
    }

    /// [`Checkpoint::load`], telling `progress` how far it got (see
    /// [`Checkpoint::load_async_with`]).
    pub fn load_with(&self, opts: &LoadOptions, progress: crate::progress::Progress<'_>) -> Result<State> {
        block_on(self.load_async_with(opts, progress))
    }

    /// Reads every byte and checks every size and checksum; returns one error per
    /// problem found, empty when the checkpoint is intact. See [`Checkpoint::verify_async`].
    pub fn verify(&self) -> Result<Vec<Error>> {
        block_on(self.verify_async())
    }

    /// [`Checkpoint::verify`], telling `progress` how far it got (see
    /// [`Checkpoint::verify_async_with`]).
    pub fn verify_with(&self, progress: crate::progress::Progress<'_>) -> Result<Vec<Error>> {
        block_on(self.verify_async_with(progress))
    }
}

/// Reads `ranges` of the remote data file at `path` after checking its size against the
/// manifest: each range into a buffer of its own (see `ranged_read`).
async fn get_remote(
    path: &object_store::path::Path,
    store: &dyn object_store::ObjectStore,
    record: &FileRecord,
    ranges: &[std::ops::Range<u64>],
    shown: &str,
) -> Result<Vec<Bytes>> {
    let meta = store.head(path).await.map_err(|e| ranged_read::shard_read_error(e, shown))?;
    check_size(meta.size, record.size, shown)?;
    if ranged_read::disjoint(ranges) {
        let buffers = ranged_read::read_ranges(store, path, ranges, shown).await?;
        return Ok(buffers.into_iter().map(Bytes::from).collect());
    }
    // Ranges that share bytes (no Cairn writer makes them; a hand-made file may): read
    // once per coalesced span and sliced, so memory stays within the file's size.
    // Stores reject empty ranges: fetch the others and put empty buffers back in place.
    let wanted: Vec<std::ops::Range<u64>> = ranges.iter().filter(|r| !r.is_empty()).cloned().collect();
    let mut fetched =
        store.get_ranges(path, &wanted).await.map_err(|e| ranged_read::shard_read_error(e, shown))?.into_iter();
    Ok(ranges.iter().map(|r| if r.is_empty() { Bytes::new() } else { fetched.next().unwrap_or_default() }).collect())
}

fn check_size(actual: u64, expected: u64, shown: &str) -> Result<()> {
    if actual != expected {
        let what = if actual < expected { "truncated data file" } else { "data file has extra bytes" };
        return Err(Error::corrupt(format!("{what}: {actual} bytes, manifest says {expected} file=`{shown}`")));
    }
    Ok(())
}

/// Maps a local shard read-only and slices out `ranges` without copying. The file is
/// opened inside the run without following symlinks (see `local_store`).
fn map_local(
    root: &Root,
    path: &object_store::path::Path,
    record: &FileRecord,
    ranges: &[std::ops::Range<u64>],
    shown: &str,
) -> Result<Vec<Bytes>> {
    let file = root.open_regular(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::corrupt(format!("data file missing file=`{shown}`")).with_source(e)
        } else {
            Error::from_io(e, "opening data file", &format!("file=`{shown}`"))
        }
    })?;
    let meta = file.metadata().map_err(|e| Error::from_io(e, "reading data file", &format!("file=`{shown}`")))?;
    check_size(meta.len(), record.size, shown)?;
    if record.size == 0 {
        return Ok(ranges.iter().map(|_| Bytes::new()).collect());
    }
    // SAFETY: committed checkpoint files are never modified in place (saves write new
    // files, deletes unlink), so the mapping's contents do not change under us. The
    // mapping is private (copy-on-write): a frontend may hand it out writable, and writes
    // land in private pages, never in the file.
    let map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }.map_err(|e| {
        Error::new(ErrorKind::Unavailable, format!("cannot map data file file=`{shown}`")).with_source(e)
    })?;
    check_size(map.len() as u64, record.size, shown)?;
    let bytes = Bytes::from_owner(map);
    Ok(ranges.iter().map(|r| bytes.slice(r.start as usize..r.end as usize)).collect())
}
