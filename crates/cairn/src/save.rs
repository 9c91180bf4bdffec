//! Saving: plan the shards (pure), write them in parallel (to object stores straight
//! from the state's buffers; to local disk with direct I/O through a few aligned buffers,
//! see `local_write`), then commit by creating the manifest only if absent.
//!
//! Invariants: no manifest is written before every shard is durable; the manifest is
//! created with `PutMode::Create`, so a committed checkpoint is never overwritten; shard
//! names carry a per-attempt id, so two attempts never write the same file; a failed save
//! removes the shards it wrote (a killed one leaves orphans that no reader sees).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutPayload};

use crate::commit;
use crate::error::{Error, ErrorKind, Result};
use crate::format::checksum;
use crate::format::layout;
use crate::format::manifest::{
    check_structure_size, count_value_maps, FileRecord, Manifest, PieceRecord, SaveTimings, TensorRecord, Writer,
    FORMAT_NAME, FORMAT_VERSION_STANDALONE, MAX_METADATA_BYTES, MAX_VALUE_MAPS,
};
use crate::format::shard::{self, ShardEntry, DATA_ALIGN};
use crate::incremental::Dedup;
use crate::info::CheckpointInfo;
use crate::local_write;
use crate::state::{Entry, State, Tensor, Value};
use crate::store::{self, Location};

/// Default upper bound on the bytes of one shard file.
pub const DEFAULT_SHARD_BYTES: u64 = 512 << 20;
/// Default size from which a shard goes to an object store as a multipart upload.
pub const DEFAULT_MULTIPART_BYTES: u64 = 64 << 20;
/// Default part size of a multipart upload (S3 needs at least 5 MiB per part).
pub const DEFAULT_PART_BYTES: u64 = 16 << 20;
/// Parts of one upload sent at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Shards are not split below this size just to gain parallelism.
const MIN_SPLIT_SHARD_BYTES: u64 = 32 << 20;

/// How to save a checkpoint.
///
/// ```
/// let opts = cairn::SaveOptions::default().with_step(100).with_temporary(true);
/// assert_eq!(opts.step, Some(100));
/// ```
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Step of the checkpoint. With a step, the target is a run and the checkpoint goes to
    /// `<run>/step-<step>`; without, the target is the checkpoint folder itself (step 0).
    pub step: Option<u64>,
    /// Mark the checkpoint temporary (retention deletes it once a newer one commits).
    pub temporary: bool,
    /// Numeric metrics (ints or floats) recorded for keep-best retention.
    pub metrics: BTreeMap<String, Value>,
    /// Free-form user metadata.
    pub metadata: serde_json::Value,
    /// Upper bound on one shard file's size (a larger tensor gets a shard of its own).
    pub shard_bytes: u64,
    /// Files written at once.
    pub concurrency: usize,
    /// On object stores, shards of at least this size are sent as multipart uploads.
    pub multipart_bytes: u64,
    /// Part size of multipart uploads.
    pub part_bytes: u64,
    /// Save into a run incrementally: write only the tensors whose content no committed
    /// checkpoint of the run holds, and refer to the stored copies (see
    /// `docs/format.md`, "Incremental saves"). Needs a step; multi-rank saves write
    /// everything.
    pub incremental: bool,
    /// How long the caller was blocked taking the state's snapshot before this save
    /// (a manager's asynchronous save), recorded in the manifest's timings.
    pub snapshot_time: Option<std::time::Duration>,
    /// In a multi-rank save, each rank reads back every file it wrote and checks its
    /// checksums before the commit; a mismatch fails the save on every rank, nothing
    /// committed (an upload from a local tier, which must not stand unverified).
    pub verify_written: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            step: None,
            temporary: false,
            metrics: BTreeMap::new(),
            metadata: serde_json::Value::Null,
            shard_bytes: DEFAULT_SHARD_BYTES,
            concurrency: std::thread::available_parallelism().map_or(4, |n| n.get()).clamp(2, 16),
            multipart_bytes: DEFAULT_MULTIPART_BYTES,
            part_bytes: DEFAULT_PART_BYTES,
            incremental: false,
            snapshot_time: None,
            verify_written: false,
        }
    }
}

impl SaveOptions {
    /// Sets the step.
    pub fn with_step(mut self, step: u64) -> Self {
        self.step = Some(step);
        self
    }

    /// Sets the temporary flag.
    pub fn with_temporary(mut self, temporary: bool) -> Self {
        self.temporary = temporary;
        self
    }

    /// Records a metric.
    pub fn with_metric(mut self, name: impl Into<String>, value: f64) -> Self {
        self.metrics.insert(name.into(), Value::Float(value));
        self
    }

    /// Sets the user metadata.
    pub fn with_metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets the shard size bound.
    pub fn with_shard_bytes(mut self, shard_bytes: u64) -> Self {
        self.shard_bytes = shard_bytes.max(1);
        self
    }

    /// Turns incremental saving on or off (see [`SaveOptions::incremental`]).
    pub fn with_incremental(mut self, incremental: bool) -> Self {
        self.incremental = incremental;
        self
    }

    /// Sets the multipart threshold and part size for object stores.
    pub fn with_multipart(mut self, multipart_bytes: u64, part_bytes: u64) -> Self {
        self.multipart_bytes = multipart_bytes;
        self.part_bytes = part_bytes.max(1);
        self
    }
}

/// One planned shard: its file and the tensors it holds, in layout order.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardPlan {
    /// Path relative to the checkpoint folder.
    pub file: String,
    /// Keys of the tensors in the shard, in layout order: those whose size is a multiple
    /// of [`DATA_ALIGN`] first (each then starts [`DATA_ALIGN`]-aligned), then the others
    /// by decreasing element size (each aligned to its element size).
    pub keys: Vec<String>,
}

/// Splits the tensors of `state` into shards of at most `shard_bytes` (a bigger tensor
/// gets its own), and into at least `parallelism` shards when each would still hold
/// `MIN_SPLIT_SHARD_BYTES`. The shard count is rounded up to a multiple of `parallelism`
/// and the shards are of about equal size, so the parallel writers finish together.
/// Pure: the same input gives the same plan.
pub fn plan_shards(state: &State, shard_bytes: u64, parallelism: usize, rank: u32, attempt: &str) -> Vec<ShardPlan> {
    let total = state.tensor_bytes();
    let shard_bytes = shard_bytes.max(1);
    let needed = total.div_ceil(shard_bytes).max(1);
    let balanced = needed.next_multiple_of(parallelism.max(1) as u64);
    let count = if total / balanced >= MIN_SPLIT_SHARD_BYTES {
        balanced
    } else {
        needed.max((total / MIN_SPLIT_SHARD_BYTES).min(balanced)).max(1)
    };
    // Each tensor goes to the shard its middle byte falls in when the state is cut into
    // `count` equal parts; a shard is also closed before it would pass the bound.
    let mut groups: Vec<Vec<(&String, &Tensor)>> = Vec::new();
    let mut current: Vec<(&String, &Tensor)> = Vec::new();
    let (mut current_bytes, mut current_part, mut before) = (0u64, 0u64, 0u64);
    for (key, tensor) in state.tensors() {
        let size = tensor.data().len() as u64;
        let part = ((u128::from(before + size / 2) * u128::from(count)) / u128::from(total.max(1))) as u64;
        if !current.is_empty() && (part != current_part || current_bytes + size > shard_bytes) {
            groups.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        if current.is_empty() {
            current_part = part;
        }
        current.push((key, tensor));
        current_bytes += size;
        before += size;
    }
    if !current.is_empty() {
        groups.push(current);
    }
    let count = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(index, mut group)| {
            group.sort_by_key(|&(key, t)| (t.data().len() % DATA_ALIGN != 0, Reverse(t.dtype().size()), key));
            ShardPlan {
                file: layout::shard_file(rank, index, count, attempt),
                keys: group.into_iter().map(|(k, _)| k.clone()).collect(),
            }
        })
        .collect()
}

/// What one shard write produced.
pub(crate) struct WrittenShard {
    pub(crate) file: String,
    pub(crate) record: FileRecord,
    pub(crate) pieces: Vec<(String, PieceRecord)>,
}

/// Saves `state` into the checkpoint folder `dest` and commits it. See the module docs
/// for the guarantees. Fails with [`ErrorKind::AlreadyExists`] if `dest` is committed.
pub async fn save_checkpoint(dest: &Location, state: &State, step: u64, opts: &SaveOptions) -> Result<CheckpointInfo> {
    validate_state(state, opts)?;
    if commit::is_committed(dest).await? {
        return Err(commit::already_committed(step, dest));
    }

    let save_id = uuid::Uuid::new_v4().simple().to_string();
    // Only a step folder of a run refers to its siblings (a folder saved as a checkpoint
    // of its own has none that deletions would see).
    let in_run = dest.uri().rsplit('/').next().and_then(layout::parse_step_dir) == Some(step);
    // What is stored could not be read or pinned: the save writes everything instead.
    let dedup = match opts.incremental && in_run {
        true => Dedup::prepare(dest, step, &save_id).await.ok(),
        false => None,
    };
    let (committed, may_land) = write_and_commit(dest, state, step, opts, &save_id, dedup.as_ref()).await;
    // A commit whose outcome is unknown may still land: its pin stays (prune removes it
    // once older than the grace period), so deletions keep what it refers to meanwhile.
    if let (Some(dedup), false) = (&dedup, may_land) {
        dedup.unpin(dest).await;
    }
    committed
}

/// Writes what is not stored yet of `state` (everything without `dedup`), then commits
/// the manifest. Also says whether a failed commit may still land (its outcome unknown).
async fn write_and_commit(
    dest: &Location,
    state: &State,
    step: u64,
    opts: &SaveOptions,
    save_id: &str,
    dedup: Option<&Dedup>,
) -> (Result<CheckpointInfo>, bool) {
    let started = std::time::Instant::now();
    let shares = match write_share_with(dest, state, 0, &save_id[..12], opts, dedup.map(|d| (d, step))).await {
        Ok(shares) => shares,
        Err(e) => return (Err(e), false),
    };
    if let Some(dedup) = dedup {
        // Pinned now: only what this save refers to (a pin left by a killed save then
        // keeps no more than that).
        let referred = shares.referred.iter().map(|(_, piece, _)| piece.file.as_str());
        if let Err(e) = dedup.narrow_pin(dest, step, referred).await {
            return (Err(e), false);
        }
    }
    let files: Vec<String> = shares.written.iter().map(|w| w.file.clone()).collect();
    let mut manifest = build_manifest(state, step, opts, save_id, shares);
    manifest.timings = Some(SaveTimings {
        snapshot_ms: opts.snapshot_time.map(|d| d.as_millis() as u64),
        write_ms: started.elapsed().as_millis() as u64,
    });
    let outcome = match commit::create_manifest(dest, &manifest, step).await {
        Ok(()) => Ok(CheckpointInfo::from_manifest(&manifest, dest.uri())),
        // Another writer committed this step: ours never landed, so our files can go.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            remove_files(dest, files.iter().map(String::as_str)).await;
            Err(e)
        }
        // On local disk a failed write is over when it returns (a full disk, say): with
        // no manifest there, none will come, and our files can go.
        Err(e) if dest.local_root().is_some() && !commit::is_committed(dest).await.unwrap_or(true) => {
            remove_files(dest, files.iter().map(String::as_str)).await;
            Err(e)
        }
        // Unknown outcome (the request may still land): keep the data a manifest may
        // point at; if nothing was committed, prune removes it as orphans.
        Err(e) => return (Err(e), true),
    };
    (outcome, false)
}

/// A tensor an incremental save found stored: its key, its piece, and the file that piece
/// names (its name in the manifest, and its record).
pub(crate) type Referred = (String, PieceRecord, (String, FileRecord));

/// What the shards of a save produced: the files written, and the tensors found stored.
pub(crate) struct Shares {
    pub(crate) written: Vec<WrittenShard>,
    pub(crate) referred: Vec<Referred>,
}

/// Writes the tensors of `state` as this rank's shard files (names carry `rank` and
/// `attempt`), durably; on failure removes what it wrote.
pub(crate) async fn write_share(
    dest: &Location,
    state: &State,
    rank: u32,
    attempt: &str,
    opts: &SaveOptions,
) -> Result<Vec<WrittenShard>> {
    Ok(write_share_with(dest, state, rank, attempt, opts, None).await?.written)
}

/// [`write_share`], and with `dedup` (what is stored, and the step of the checkpoint
/// being saved) each shard's tensors are hashed as it is written (other shards are being
/// written meanwhile): those found stored are referred to instead of written.
async fn write_share_with(
    dest: &Location,
    state: &State,
    rank: u32,
    attempt: &str,
    opts: &SaveOptions,
    dedup: Option<(&Dedup, u64)>,
) -> Result<Shares> {
    let plans = plan_shards(state, opts.shard_bytes, opts.concurrency, rank, attempt);
    let written = async {
        let shards_dir = dest.local_dir().map(|dir| dir.join(layout::SHARDS_DIR));
        if let (Some(dir), Some(root)) = (&shards_dir, dest.local_root()) {
            root.check_folder(&dest.path(layout::SHARDS_DIR))
                .map_err(|e| Error::from_io(e, "creating shard folder", &format!("dir=`{}`", dir.display())))?;
            store::create_dirs_durably(dir)
                .map_err(|e| Error::from_io(e, "creating shard folder", &format!("dir=`{}`", dir.display())))?;
        }
        let written = write_shards(dest, state, &plans, opts, dedup).await?;
        // The new files' names become durable with their folder's fsync.
        if let Some(dir) = &shards_dir {
            sync_dir(dir)
                .map_err(|e| Error::from_io(e, "syncing shard folder", &format!("dir=`{}`", dir.display())))?;
        }
        Ok::<_, Error>(written)
    };
    match written.await {
        Ok(written) => Ok(written),
        Err(e) => {
            remove_files(dest, plans.iter().map(|p| p.file.as_str())).await;
            Err(e)
        }
    }
}

fn validate_state(state: &State, opts: &SaveOptions) -> Result<()> {
    if let Some(key) = state.pieces().keys().next() {
        return Err(Error::invalid(format!(
            "pieces of sharded tensors are saved through dist::save_as_rank (even by one process) key=`{key}`"
        )));
    }
    for (key, _) in state.iter() {
        if key.is_empty() {
            return Err(Error::invalid("empty key in state key=``"));
        }
    }
    for (name, value) in &opts.metrics {
        if !matches!(value, Value::Int(_) | Value::Float(_)) {
            return Err(Error::invalid(format!("metric must be a number metric=`{name}`")));
        }
    }
    if let Some(structure) = state.structure() {
        serde_json::from_str::<serde::de::IgnoredAny>(structure)
            .map_err(|e| Error::invalid("the state's structure is not json").with_source(e))?;
        check_structure_size(structure, state.iter().map(|(key, _)| key)).map_err(Error::invalid)?;
    }
    let values = state.iter().filter_map(|(_, entry)| match entry {
        Entry::Value(value) => Some(value),
        _ => None,
    });
    if count_value_maps(values) > MAX_VALUE_MAPS {
        return Err(Error::invalid(format!("the state's values hold more than {MAX_VALUE_MAPS} maps")));
    }
    let sizes = [("metadata", serde_json::to_vec(&opts.metadata)), ("metrics", serde_json::to_vec(&opts.metrics))];
    for (field, encoded) in sizes {
        let len = encoded.map_err(|e| Error::invalid(format!("cannot encode {field}")).with_source(e))?.len();
        if len > MAX_METADATA_BYTES {
            return Err(Error::invalid(format!(
                "{field} is {len} bytes of json, more than the {MAX_METADATA_BYTES} a checkpoint holds"
            )));
        }
    }
    Ok(())
}

async fn write_shards(
    dest: &Location,
    state: &State,
    plans: &[ShardPlan],
    opts: &SaveOptions,
    dedup: Option<(&Dedup, u64)>,
) -> Result<Shares> {
    let files_at_once = opts.concurrency.max(1).min(plans.len());
    let outcomes: Vec<(Option<WrittenShard>, Vec<Referred>)> =
        futures::stream::iter(plans.iter().map(|plan| write_shard(dest, state, plan, files_at_once, opts, dedup)))
            .buffer_unordered(files_at_once.max(1))
            .try_collect()
            .await?;
    let mut shares = Shares { written: Vec::new(), referred: Vec::new() };
    for (written, referred) in outcomes {
        shares.written.extend(written);
        shares.referred.extend(referred);
    }
    Ok(shares)
}

/// The content id (when it was computed) and sample of a tensor an incremental save writes.
type Identity = (Option<u128>, u64);

/// Runs `f` over the tensors of `work` off the async threads.
async fn over_tensors<T: Send + 'static>(work: Vec<(String, Tensor)>, f: fn(&[u8]) -> T) -> Result<Vec<T>> {
    tokio::task::spawn_blocking(move || work.iter().map(|(_, t)| f(t.data())).collect())
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, "content hashing task failed").with_source(e))
}

/// Takes out of `tensors` those `dedup` finds stored: each tensor's sample is taken, and
/// only those whose sample some stored piece has are hashed whole (off the async
/// threads). Returns the identity of each one left, and the records of those taken out.
async fn take_stored(
    tensors: &mut Vec<(String, Tensor)>,
    dedup: &Dedup,
    step: u64,
) -> Result<(HashMap<String, Identity>, Vec<Referred>)> {
    let samples = over_tensors(tensors.clone(), checksum::content_sample).await?;
    let needs: Vec<bool> =
        tensors.iter().zip(&samples).map(|((_, t), &sample)| dedup.needs_id(sample, t.data().len() as u64)).collect();
    let to_hash: Vec<(String, Tensor)> =
        tensors.iter().zip(&needs).filter(|(_, &need)| need).map(|(t, _)| t.clone()).collect();
    let mut ids = over_tensors(to_hash, checksum::content_id).await?.into_iter();
    let mut kept = HashMap::new();
    let mut referred = Vec::new();
    for (((key, tensor), sample), need) in std::mem::take(tensors).into_iter().zip(samples).zip(needs) {
        let id = if need { ids.next() } else { None };
        match id.and_then(|id| dedup.refer(id, sample, &tensor, step)) {
            Some((piece, record)) => {
                let file = piece.file.clone();
                referred.push((key, piece, (file, record)));
            }
            None => {
                kept.insert(key.clone(), (id, sample));
                tensors.push((key, tensor));
            }
        }
    }
    Ok((kept, referred))
}

/// Writes one shard file while `files_at_once - 1` others are being written; with
/// `dedup`, only its tensors not stored yet (no file at all if every one is).
async fn write_shard(
    dest: &Location,
    state: &State,
    plan: &ShardPlan,
    files_at_once: usize,
    opts: &SaveOptions,
    dedup: Option<(&Dedup, u64)>,
) -> Result<(Option<WrittenShard>, Vec<Referred>)> {
    let mut tensors: Vec<(String, Tensor)> =
        plan.keys.iter().filter_map(|k| state.tensor(k).map(|t| (k.clone(), t.clone()))).collect();
    let (ids, referred) = match dedup {
        Some((dedup, step)) => take_stored(&mut tensors, dedup, step).await?,
        None => (HashMap::new(), Vec::new()),
    };
    if tensors.is_empty() && dedup.is_some() {
        return Ok((None, referred));
    }
    let file = plan.file.clone();
    let shown = format!("file=`{}/{file}`", dest.uri());
    let entries: Vec<ShardEntry> = tensors
        .iter()
        .map(|(k, t)| ShardEntry {
            name: shard::piece_name(k, &vec![0; t.shape().len()], true),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
        })
        .collect();
    let metadata =
        HashMap::from([("format".to_string(), "pt".to_string()), ("producer".to_string(), "cairn".to_string())]);
    let header = shard::build_header(&entries, metadata)?;
    let header_len = header.bytes.len() as u64;
    let mut chunks: Vec<Bytes> = Vec::with_capacity(tensors.len() + 1);
    chunks.push(Bytes::from(header.bytes));
    chunks.extend(tensors.iter().map(|(_, t)| t.data().clone()));
    // Local files: written here, checksummed in the same pass. Elsewhere: checksums first,
    // then the upload. Both are CPU or blocking work: keep them off the async threads.
    let local_path = dest.local_dir().map(|dir| dir.join(&file));
    let task_chunks = chunks.clone();
    let task_shown = shown.clone();
    let crcs = tokio::task::spawn_blocking(move || {
        let slices: Vec<&[u8]> = task_chunks.iter().map(|c| c.as_ref()).collect();
        match local_path {
            Some(path) => local_write::write_new_file(&path, &slices, files_at_once)
                .map_err(|e| Error::from_io(e, "writing", &task_shown)),
            None => Ok(slices.iter().map(|c| checksum::crc32c(c)).collect::<Vec<u32>>()),
        }
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Internal, format!("write task failed {shown}")).with_source(e))??;
    if dest.local_dir().is_none() {
        let multipart = header.file_size >= opts.multipart_bytes;
        chunks.retain(|c| !c.is_empty());
        put_file(dest, &file, chunks, multipart.then_some(opts.part_bytes)).await?;
    }
    let Some((&header_crc32c, piece_crcs)) = crcs.split_first() else {
        return Err(Error::new(ErrorKind::Unavailable, format!("no checksum for the shard header {shown}")));
    };
    let pieces = tensors
        .into_iter()
        .zip(piece_crcs)
        .zip(header.ranges)
        .map(|(((key, tensor), &crc32c), range)| {
            let rank = tensor.shape().len();
            let (xxh3, sample) = ids.get(&key).map_or((None, None), |&(id, sample)| (id, Some(sample)));
            (
                key,
                PieceRecord {
                    file: file.clone(),
                    range,
                    offsets: vec![0; rank],
                    shape: tensor.shape().to_vec(),
                    crc32c,
                    xxh3,
                    sample,
                },
            )
        })
        .collect();
    let written =
        WrittenShard { file, record: FileRecord { size: header.file_size, header_len, header_crc32c }, pieces };
    Ok((Some(written), referred))
}

/// Writes `chunks` as the file `file` under `dest`: one PUT, or a multipart upload with
/// parts of `part_bytes` (aborted on failure, so no incomplete upload is left behind).
pub(crate) async fn put_file(dest: &Location, file: &str, chunks: Vec<Bytes>, part_bytes: Option<u64>) -> Result<()> {
    let path = dest.path(file);
    let shown = || format!("file=`{}/{file}`", dest.uri());
    let Some(part_bytes) = part_bytes else {
        let payload: PutPayload = chunks.into_iter().collect();
        dest.store().put(&path, payload).await.map_err(|e| Error::from_store(e, "writing", &shown()))?;
        return Ok(());
    };
    let mut upload =
        dest.store().put_multipart(&path).await.map_err(|e| Error::from_store(e, "starting upload", &shown()))?;
    let parts: Vec<_> = split_into_parts(chunks, part_bytes).into_iter().map(|part| upload.put_part(part)).collect();
    let sent: Result<Vec<()>, object_store::Error> =
        futures::stream::iter(parts).buffer_unordered(PARTS_IN_FLIGHT).try_collect().await;
    match sent {
        Ok(_) => upload.complete().await.map(|_| ()).map_err(|e| Error::from_store(e, "completing upload", &shown())),
        Err(e) => {
            let _ = upload.abort().await;
            Err(Error::from_store(e, "uploading part", &shown()))
        }
    }
}

/// Regroups `chunks` into payloads of exactly `part_bytes` (the last may be smaller) by
/// slicing, without copying any byte.
pub fn split_into_parts(chunks: Vec<Bytes>, part_bytes: u64) -> Vec<PutPayload> {
    let part_bytes = part_bytes.max(1) as usize;
    let mut parts = Vec::new();
    let mut current: Vec<Bytes> = Vec::new();
    let mut filled = 0usize;
    for mut chunk in chunks {
        while !chunk.is_empty() {
            let take = (part_bytes - filled).min(chunk.len());
            current.push(chunk.split_to(take));
            filled += take;
            if filled == part_bytes {
                parts.push(std::mem::take(&mut current).into_iter().collect());
                filled = 0;
            }
        }
    }
    if !current.is_empty() {
        parts.push(current.into_iter().collect());
    }
    parts
}

/// The manifest of a one-process save: the shards written, and the tensors found stored.
fn build_manifest(state: &State, step: u64, opts: &SaveOptions, save_id: &str, shares: Shares) -> Manifest {
    let mut files = BTreeMap::new();
    let mut pieces = Vec::new();
    for shard in shares.written {
        files.insert(shard.file, shard.record);
        pieces.extend(shard.pieces);
    }
    for (key, piece, (file, record)) in shares.referred {
        files.insert(file, record);
        pieces.push((key, piece));
    }
    let mut tensors = BTreeMap::new();
    for (key, piece) in pieces {
        if let Some(t) = state.tensor(&key) {
            tensors.insert(key, TensorRecord { dtype: t.dtype(), shape: t.shape().to_vec(), pieces: vec![piece] });
        }
    }
    manifest_of(state, step, opts, save_id, 1, tensors, files)
}

/// The manifest of a save: its tensors and files, plus the state's values and structure
/// and the options' metadata.
pub(crate) fn manifest_of(
    state: &State,
    step: u64,
    opts: &SaveOptions,
    save_id: &str,
    world_size: u32,
    tensors: BTreeMap<String, TensorRecord>,
    files: BTreeMap<String, FileRecord>,
) -> Manifest {
    let mut manifest = Manifest {
        format: FORMAT_NAME.to_string(),
        format_version: FORMAT_VERSION_STANDALONE,
        step,
        created_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        temporary: opts.temporary,
        save_id: save_id.to_string(),
        writer: Writer { library: "cairn".into(), version: env!("CARGO_PKG_VERSION").into(), world_size },
        metrics: opts.metrics.clone(),
        metadata: opts.metadata.clone(),
        values: state.values().map(|(k, v)| (k.clone(), v.clone())).collect(),
        structure: state.structure().map(str::to_string),
        tensors,
        files,
        ranks: BTreeMap::new(),
        timings: None,
        part: None,
    };
    manifest.format_version = manifest.required_version();
    manifest
}

/// Flushes the entries of the local folder `dir` to disk.
fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Best-effort removal of `files` under `dest` (cleanup after a failed save).
async fn remove_files<'a>(dest: &Location, files: impl Iterator<Item = &'a str>) {
    for file in files {
        let _ = dest.store().delete(&dest.path(file)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DType;

    fn state_of(sizes: &[usize]) -> State {
        let mut s = State::new();
        for (i, &n) in sizes.iter().enumerate() {
            s.insert_tensor(format!("t{i:02}"), Tensor::new(DType::U8, vec![n as u64], vec![0u8; n]).unwrap());
        }
        s
    }

    #[test]
    fn plan_puts_every_tensor_in_exactly_one_shard() {
        let s = state_of(&[10, 20, 30, 40, 50]);
        let plans = plan_shards(&s, 45, 1, 0, "a");
        let mut keys: Vec<String> = plans.iter().flat_map(|p| p.keys.clone()).collect();
        keys.sort();
        assert_eq!(keys, vec!["t00", "t01", "t02", "t03", "t04"]);
        assert!(plans.len() >= 3);
    }

    #[test]
    fn plan_orders_shard_contents_by_alignment() {
        let mut s = State::new();
        s.insert_tensor("a", Tensor::new(DType::U8, vec![1], vec![0u8]).unwrap());
        s.insert_tensor("b", Tensor::new(DType::F64, vec![1], vec![0u8; 8]).unwrap());
        s.insert_tensor("c", Tensor::new(DType::U8, vec![64], vec![0u8; 64]).unwrap());
        s.insert_tensor("d", Tensor::new(DType::F32, vec![32], vec![0u8; 128]).unwrap());
        let plans = plan_shards(&s, u64::MAX, 1, 0, "a");
        // Sizes that are multiples of 64 first (d at 0, c at 128: 64-aligned), then by
        // element size (b at 192, a at 200).
        assert_eq!(plans[0].keys, vec!["d", "c", "b", "a"]);
    }

    #[test]
    fn parts_are_exact_slices_of_the_chunks() {
        let chunks = vec![Bytes::from(vec![1u8; 7]), Bytes::new(), Bytes::from(vec![2u8; 5])];
        let parts = split_into_parts(chunks, 4);
        let sizes: Vec<usize> = parts.iter().map(|p| p.content_length()).collect();
        assert_eq!(sizes, vec![4, 4, 4]);
        let joined: Vec<u8> = parts.iter().flat_map(|p| p.iter().flat_map(|b| b.to_vec())).collect();
        assert_eq!(joined, [vec![1u8; 7], vec![2u8; 5]].concat());
    }

    #[test]
    fn plan_gives_each_parallel_writer_an_equal_share() {
        // 1,000 tensors of 1 MiB with 512 MiB shards and 2 writers: 2 shards of 500 MiB,
        // not 512 + 488; with 3 writers, 3 shards.
        let s = state_of(&[1 << 20; 1000]);
        let sizes = |plans: &[ShardPlan]| plans.iter().map(|p| p.keys.len()).collect::<Vec<_>>();
        assert_eq!(sizes(&plan_shards(&s, 512 << 20, 2, 0, "a")), vec![500, 500]);
        let three = sizes(&plan_shards(&s, 512 << 20, 3, 0, "a"));
        assert_eq!(three.len(), 3);
        assert!(three.iter().all(|&n| (333..=334).contains(&n)), "{three:?}");
        // The bound still holds when it forces more shards than writers.
        let many = plan_shards(&s, 100 << 20, 4, 0, "a");
        assert_eq!(many.len(), 12);
        assert!(many.iter().all(|p| p.keys.len() <= 100));
    }

    #[test]
    fn plan_of_a_state_without_tensors_is_empty() {
        assert!(plan_shards(&State::new(), 100, 4, 0, "a").is_empty());
    }
}
