//! A run: the checkpoints of one training job under one location, found by listing.
//! Only folders named `step-<12+ digits>` that hold a manifest count; anything else
//! (unfinished saves, stray files) is invisible to readers.

use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};

use crate::commit;
use crate::error::{Error, Result};
use std::collections::BTreeSet;

use crate::format::layout::{self, DataFile, LATEST_FILE, MANIFEST_FILE};
use crate::incremental;

/// Most bytes of the `LATEST` hint read (a folder name, or an older hint's URI).
const MAX_HINT_BYTES: usize = 4096;
use crate::info::CheckpointInfo;
use crate::load::{Checkpoint, LoadOptions};
use crate::policy::{self, Candidate, Retention};
use crate::runtime::block_on;
use crate::save::{save_checkpoint, SaveOptions};
use crate::state::State;
use crate::store::Location;

/// A committed checkpoint found by listing a run (its manifest not yet read).
#[derive(Debug, Clone)]
pub struct CheckpointRef {
    /// Step of the checkpoint.
    pub step: u64,
    /// Its folder.
    pub location: Location,
}

impl CheckpointRef {
    /// Reads and validates its manifest.
    pub fn open(&self) -> Result<Checkpoint> {
        block_on(Checkpoint::open_async(self.location.clone()))
    }
}

/// What [`Run::prune`] did, or on a dry run would do.
#[derive(Debug, Default)]
pub struct PruneReport {
    /// Steps retention deleted (would delete, on a dry run).
    pub deleted: Vec<u64>,
    /// Readable committed checkpoints kept.
    pub kept: usize,
    /// One error per damaged checkpoint, kept whole.
    pub damaged: Vec<Error>,
    /// Leftovers of unfinished saves removed (would remove, on a dry run).
    pub removed: Vec<String>,
}

/// What [`Run::survey`] found.
#[derive(Debug, Default)]
pub struct Survey {
    /// Summaries of the readable committed checkpoints, in step order.
    pub checkpoints: Vec<CheckpointInfo>,
    /// One error (naming the manifest) per committed checkpoint that cannot be read.
    pub damaged: Vec<Error>,
    /// Bytes of the distinct data files the readable checkpoints name: what the run
    /// occupies (less than the sum of their sizes when incremental saves share data).
    pub stored_bytes: u64,
}

/// Whether `err` says a checkpoint itself is unusable (damaged, or written by a newer
/// Cairn), as opposed to the store failing.
fn is_damaged(err: &Error) -> bool {
    matches!(err.kind(), crate::ErrorKind::Corrupt | crate::ErrorKind::Incompatible)
}

/// Whether `err` says a checkpoint is damaged or was deleted meanwhile: either way it is
/// passed over, never an error of the whole run.
fn is_gone_or_damaged(err: &Error) -> bool {
    err.kind() == crate::ErrorKind::NotFound || is_damaged(err)
}

/// How long a pin keeps the data an incremental save refers to when a checkpoint is
/// deleted (prune uses its grace period instead): the time a save may take between
/// pinning and committing.
pub const PIN_LIFETIME: std::time::Duration = crate::manager::DEFAULT_ORPHAN_GRACE;

/// What deletions must keep (see [`Run::live_files`]).
pub(crate) struct Live {
    /// The data files (`step-<n>/shards/<name>`, relative to the run) that committed
    /// checkpoints or pins name; `None` when some manifest or pin cannot be read, so
    /// every data file must stay.
    files: Option<BTreeSet<String>>,
    /// The committed checkpoints whose manifests were read.
    readable: BTreeSet<u64>,
}

impl Live {
    /// Whether `file` (a path inside the folder of `step`) must stay.
    fn keeps(&self, step: u64, file: &str) -> bool {
        match &self.files {
            Some(files) => files.contains(&format!("{}/{file}", layout::step_dir(step))),
            None => file.starts_with(layout::SHARDS_DIR),
        }
    }
}

/// The checkpoints of one training run.
///
/// ```
/// use cairn::{DType, Run, SaveOptions, State, Tensor};
/// let run = Run::create("memory://doc-run/job").unwrap();
/// let mut state = State::new();
/// state.insert_tensor("w", Tensor::new(DType::U8, vec![2], vec![1, 2]).unwrap());
/// run.save(&state, &SaveOptions::default().with_step(10)).unwrap();
/// assert_eq!(run.latest().unwrap().unwrap().info().step, 10);
/// ```
#[derive(Debug, Clone)]
pub struct Run {
    location: Location,
}

impl Run {
    /// Opens an existing run for reading.
    pub fn open(uri: &str) -> Result<Run> {
        Ok(Run { location: Location::open(uri)? })
    }

    /// Opens a run for writing, creating a local directory if needed.
    pub fn create(uri: &str) -> Result<Run> {
        Ok(Run { location: Location::create(uri)? })
    }

    /// A run at an already resolved location.
    pub fn at(location: Location) -> Run {
        Run { location }
    }

    /// Where the run lives.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The folder of the checkpoint of `step` in this run.
    pub fn step_location(&self, step: u64) -> Location {
        self.location.child(&layout::step_dir(step))
    }

    /// The committed checkpoints, in step order.
    pub fn list(&self) -> Result<Vec<CheckpointRef>> {
        block_on(self.list_async())
    }

    /// Every object under the run, with the number of path parts of the run's prefix.
    async fn objects(&self) -> Result<(usize, Vec<object_store::ObjectMeta>)> {
        let prefix = self.location.prefix();
        let objects = self
            .location
            .store()
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| Error::from_store(e, "listing run", &format!("run=`{}`", self.location.uri())))?;
        Ok((prefix.parts().count(), objects))
    }

    pub(crate) async fn list_async(&self) -> Result<Vec<CheckpointRef>> {
        let (depth, objects) = self.objects().await?;
        let mut found: Vec<CheckpointRef> = objects
            .iter()
            .filter_map(|meta| {
                let parts: Vec<_> = meta.location.parts().skip(depth).collect();
                match parts.as_slice() {
                    [dir, file] if file.as_ref() == MANIFEST_FILE => layout::parse_step_dir(dir.as_ref()),
                    _ => None,
                }
            })
            .map(|step| CheckpointRef { step, location: self.step_location(step) })
            .collect();
        found.sort_by_key(|c| c.step);
        Ok(found)
    }

    /// The summaries of the committed checkpoints that can be read, in step order, and
    /// an error for each whose manifest is damaged or of an unknown version: those are
    /// reported, never deleted by retention, and never block the others. A checkpoint
    /// deleted between the listing and the read of its manifest (retention running
    /// elsewhere) is skipped.
    pub fn survey(&self) -> Result<Survey> {
        let mut survey = Survey::default();
        let mut files = std::collections::BTreeMap::new();
        for c in self.list()? {
            match c.open() {
                Ok(ckpt) => {
                    for (file, record) in &ckpt.manifest().files {
                        if let Some(data) = layout::parse_data_file(file) {
                            files.insert(data.in_run(c.step), record.size);
                        }
                    }
                    survey.checkpoints.push(ckpt.info());
                }
                Err(e) if e.kind() == crate::ErrorKind::NotFound => {}
                Err(e) if is_damaged(&e) => survey.damaged.push(e),
                Err(e) => return Err(e),
            }
        }
        survey.stored_bytes = files.values().fold(0u64, |total, &size| total.saturating_add(size));
        Ok(survey)
    }

    /// The summaries of the readable committed checkpoints, in step order (see
    /// [`Run::survey`] for those skipped).
    pub fn infos(&self) -> Result<Vec<CheckpointInfo>> {
        Ok(self.survey()?.checkpoints)
    }

    /// The readable committed checkpoint with the highest step, if any: newer ones whose
    /// manifest is damaged are passed over, so a run resumes from its newest healthy
    /// checkpoint.
    ///
    /// A store that cannot list (a plain HTTP server) is asked for the checkpoint the
    /// `LATEST` hint names instead, opened and checked like any other.
    pub fn latest(&self) -> Result<Option<Checkpoint>> {
        let listed = match self.list() {
            Ok(listed) => listed,
            Err(err) if self.location.uri().starts_with("http://") || self.location.uri().starts_with("https://") => {
                return self.hinted().map(Some).map_err(|_| err);
            }
            Err(err) => return Err(err),
        };
        for c in listed.iter().rev() {
            match c.open() {
                Ok(ckpt) => return Ok(Some(ckpt)),
                Err(e) if is_gone_or_damaged(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Opens the committed checkpoint of `step`; [`crate::ErrorKind::NotFound`] if none.
    pub fn checkpoint(&self, step: u64) -> Result<Checkpoint> {
        block_on(Checkpoint::open_async(self.step_location(step)))
    }

    /// Saves `state` as the checkpoint of `opts.step` (required) and commits it.
    pub fn save(&self, state: &State, opts: &SaveOptions) -> Result<CheckpointInfo> {
        let step = opts
            .step
            .ok_or_else(|| Error::invalid(format!("saving into a run needs a step run=`{}`", self.location.uri())))?;
        let dest = self.step_location(step);
        block_on(save_checkpoint(&dest, state, step, opts))
    }

    /// Deletes the checkpoint of `step`: its manifest first (it stops existing), then its
    /// data that nothing else refers to: the files in its folder and the files of other
    /// folders it referred to, unless a remaining committed checkpoint or a save in flight
    /// (pinned within the last [`PIN_LIFETIME`]) names them. A damaged manifest keeps
    /// what its bytes still name; while one of an unknown version or a pin cannot be
    /// read, no data file is deleted (their references are unknown).
    /// Deleting a step that does not exist is not an error.
    pub fn delete(&self, step: u64) -> Result<()> {
        block_on(self.delete_async(step))
    }

    async fn delete_async(&self, step: u64) -> Result<()> {
        let dir = self.step_location(step);
        // What it refers to in other folders, read before it goes.
        let referred: Vec<(u64, String)> = match Checkpoint::open_async(dir.clone()).await {
            Ok(ckpt) => ckpt
                .manifest()
                .files
                .keys()
                .filter_map(|f| match layout::parse_data_file(f)? {
                    DataFile::Sibling { step, shard } => Some((step, shard.to_string())),
                    DataFile::Own(_) => None,
                })
                .collect(),
            Err(e) if is_gone_or_damaged(&e) => Vec::new(),
            Err(e) => return Err(e),
        };
        commit::remove_manifest(&dir).await?;
        let live = self.live_files(PIN_LIFETIME).await?;
        let kept = |step: u64, file: &str| live.keeps(step, file);
        commit::remove_written_files(&dir, &|file| kept(step, file)).await?;
        // Best effort, and only where no manifest is (a committed folder's files are its
        // own to keep): what stays is a leftover that prune removes.
        for (other, shard) in referred.iter().filter(|(other, shard)| !kept(*other, shard)) {
            let folder = self.step_location(*other);
            if matches!(commit::is_committed(&folder).await, Ok(false)) {
                let _ = self.location.store().delete(&folder.path(shard)).await;
            }
        }
        Ok(())
    }

    /// The data files that must stay: those the committed checkpoints name (read first),
    /// then those the pins of saves in flight younger than `pin_lifetime` name, then those
    /// of checkpoints committed meanwhile (a save removes its pin once committed: read
    /// again, its manifest is seen). See `incremental` for why this order keeps every
    /// reference of a committed checkpoint alive.
    pub(crate) async fn live_files(&self, pin_lifetime: std::time::Duration) -> Result<Live> {
        let mut live = Live { files: Some(BTreeSet::new()), readable: BTreeSet::new() };
        self.read_manifests(&mut live).await?;
        let (depth, objects) = self.objects().await?;
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        for meta in &objects {
            let parts: Vec<String> = meta.location.parts().skip(depth).map(|p| p.as_ref().to_string()).collect();
            let [dir, rest @ ..] = parts.as_slice() else { continue };
            let young = now_ms - meta.last_modified.timestamp_millis() < pin_lifetime.as_millis() as i64;
            if layout::parse_step_dir(dir).is_none() || !incremental::is_pin(&rest.join("/")) || !young {
                continue;
            }
            match self.read_pin(meta).await? {
                Some(pin) => {
                    if let Some(files) = &mut live.files {
                        files.extend(pin.files);
                    }
                }
                // A pin that cannot be read names unknown files: keep every data file.
                None => live.files = None,
            }
        }
        self.read_manifests(&mut live).await?;
        Ok(live)
    }

    /// Adds to `live` what the committed checkpoints name. A damaged
    /// manifest keeps every reference that can still be read in its bytes; one of a
    /// newer format, whose references are unknown, keeps every data file.
    async fn read_manifests(&self, live: &mut Live) -> Result<()> {
        // Every manifest, each time: one read before may have been replaced since (its
        // step deleted and saved again).
        let mut seen = BTreeSet::new();
        for c in self.list_async().await? {
            match Checkpoint::open_async(c.location.clone()).await {
                Ok(ckpt) => {
                    seen.insert(c.step);
                    let named = ckpt.manifest().files.keys().filter_map(|f| layout::parse_data_file(f));
                    if let Some(files) = &mut live.files {
                        files.extend(named.map(|d| d.in_run(c.step)));
                    }
                }
                Err(e) if e.kind() == crate::ErrorKind::NotFound => {}
                Err(e) if e.kind() == crate::ErrorKind::Corrupt => match self.references_in(&c.location).await? {
                    Some(named) => {
                        if let Some(files) = &mut live.files {
                            files.extend(named);
                        }
                    }
                    None => live.files = None,
                },
                Err(e) if is_damaged(&e) => live.files = None,
                Err(e) => return Err(e),
            }
        }
        live.readable = seen;
        Ok(())
    }

    /// The references (`step-<n>/shards/<name>`, relative to the run) written in the bytes
    /// of the damaged manifest of the folder `dir`; `None` if it is too large to read.
    async fn references_in(&self, dir: &Location) -> Result<Option<Vec<String>>> {
        let shown = format!("file=`{}/{MANIFEST_FILE}`", dir.uri());
        let got = match dir.store().get(&dir.path(MANIFEST_FILE)).await {
            Ok(got) if got.meta.size <= crate::format::manifest::MAX_MANIFEST_BYTES => got,
            Ok(_) => return Ok(None),
            Err(object_store::Error::NotFound { .. }) => return Ok(Some(Vec::new())),
            Err(e) => return Err(Error::from_store(e, "reading manifest", &shown)),
        };
        let bytes = got.bytes().await.map_err(|e| Error::from_store(e, "reading manifest", &shown))?;
        static REFERENCE: std::sync::OnceLock<regex::bytes::Regex> = std::sync::OnceLock::new();
        let pattern = REFERENCE.get_or_init(|| {
            regex::bytes::Regex::new(r"\.\./(step-[0-9]{12,}/shards/[A-Za-z0-9_-][A-Za-z0-9._-]{0,199})")
                .unwrap_or_else(|_| unreachable!("a fixed pattern"))
        });
        let named = pattern.captures_iter(&bytes).filter_map(|c| c.get(1));
        Ok(Some(named.map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned()).collect()))
    }

    /// The pin at `meta`, if it can be read and decoded (gone: an empty one).
    async fn read_pin(&self, meta: &object_store::ObjectMeta) -> Result<Option<incremental::Pin>> {
        if meta.size > incremental::MAX_PIN_BYTES {
            return Ok(None);
        }
        let got = match self.location.store().get(&meta.location).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(Some(incremental::Pin { files: BTreeSet::new() })),
            Err(e) => return Err(Error::from_store(e, "reading pin", &format!("file=`{}`", meta.location))),
        };
        if got.meta.size > incremental::MAX_PIN_BYTES {
            return Ok(None);
        }
        let bytes =
            got.bytes().await.map_err(|e| Error::from_store(e, "reading pin", &format!("file=`{}`", meta.location)))?;
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Removes the whole run: every checkpoint (each manifest first, so none is ever seen
    /// half-deleted; damaged ones too), then at once whatever unfinished saves left (so
    /// only call it on a run nobody is saving into), then on local disk the run's folder
    /// once empty — a user's own files stay, and their folder with them. The one way
    /// Cairn deletes a run: `remove_checkpoint` of the Lightning plugin.
    pub fn remove(&self) -> Result<()> {
        for checkpoint in self.list()? {
            self.delete(checkpoint.step)?;
        }
        self.prune_orphans(std::time::Duration::ZERO)?;
        if let Some(dir) = self.location.local_dir() {
            match std::fs::remove_dir(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(Error::from_io(e, "removing run folder", &format!("run=`{}`", self.location.uri())));
                }
                // Gone already, or it holds the user's own files (or is a symlink).
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes the run's `LATEST` hint: the folder name of `newest` (`step-000000000100`,
    /// relative to the run, so it holds wherever the run is copied or served), which the
    /// caller knows to be the newest checkpoint (like mmengine's `last_checkpoint`). Only
    /// a hint: Cairn lists manifests, and reads the hint only where the store cannot list.
    pub fn write_latest_hint(&self, newest: &CheckpointInfo) -> Result<()> {
        let body = PutPayload::from(format!("{}\n", layout::step_dir(newest.step)).into_bytes());
        block_on(async {
            self.location
                .store()
                .put(&self.location.path(LATEST_FILE), body)
                .await
                .map(drop)
                .map_err(|e| Error::from_store(e, "writing hint", &self.hint_shown()))
        })
    }

    /// Removes the run's `LATEST` hint; a missing hint is not an error.
    pub fn remove_latest_hint(&self) -> Result<()> {
        block_on(async {
            match self.location.store().delete(&self.location.path(LATEST_FILE)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(Error::from_store(e, "deleting hint", &self.hint_shown())),
            }
        })
    }

    /// The checkpoint the `LATEST` hint names (its last path part, so a hint holding a
    /// URI is read too), opened and checked: its manifest must say the step its folder
    /// does. The hint is read up to `MAX_HINT_BYTES`.
    fn hinted(&self) -> Result<Checkpoint> {
        let shown = self.hint_shown();
        let text = block_on(async {
            let failed = |e| Error::from_store(e, "reading hint", &shown);
            // A whole GET (a plain HTTP server may not serve ranges), read no further than
            // the limit.
            let mut body =
                self.location.store().get(&self.location.path(LATEST_FILE)).await.map_err(failed)?.into_stream();
            let mut text = Vec::new();
            while let Some(chunk) = body.try_next().await.map_err(failed)? {
                text.extend_from_slice(&chunk[..chunk.len().min(MAX_HINT_BYTES - text.len())]);
                if text.len() == MAX_HINT_BYTES {
                    break;
                }
            }
            Ok::<_, Error>(text)
        })?;
        let text = String::from_utf8_lossy(&text);
        let name = text.trim().rsplit('/').next().unwrap_or_default();
        let step = layout::parse_step_dir(name)
            .ok_or_else(|| Error::corrupt(format!("the hint names no checkpoint folder {shown}")))?;
        let ckpt = self.checkpoint(step)?;
        if ckpt.info().step != step {
            return Err(Error::corrupt(format!("the hint's checkpoint says step {} {shown}", ckpt.info().step)));
        }
        Ok(ckpt)
    }

    fn hint_shown(&self) -> String {
        format!("file=`{}/{LATEST_FILE}`", self.location.uri())
    }

    /// Applies `retention` to the readable committed checkpoints (never the latest,
    /// never a damaged one), then removes the leftovers of unfinished saves older than
    /// `grace` (see [`Run::prune_orphans`]). A dry run deletes nothing and reports what
    /// retention would delete.
    pub fn prune(&self, retention: &Retention, grace: std::time::Duration, dry_run: bool) -> Result<PruneReport> {
        let survey = self.survey()?;
        let candidates: Vec<Candidate> =
            survey.checkpoints.iter().map(|info| Candidate::from_info(info, retention.metric())).collect();
        let deleted = policy::to_delete(retention, &candidates, &Default::default());
        let mut report = PruneReport {
            kept: candidates.len() - deleted.len(),
            deleted,
            damaged: survey.damaged,
            removed: Vec::new(),
        };
        if dry_run {
            report.removed = self.orphans(grace)?;
            return Ok(report);
        }
        for &step in &report.deleted {
            self.delete(step)?;
        }
        report.removed = self.prune_orphans(grace)?;
        Ok(report)
    }

    /// Removes what failed or killed saves left behind, once it is older than `grace` (so
    /// a save in progress is never touched): folders without a manifest, files a
    /// committed checkpoint does not reference (staged manifests among them), staged
    /// `LATEST` hints, and, on local disk, empty step folders. A damaged checkpoint is
    /// left whole. Returns the removed paths. Incomplete multipart uploads are aborted by
    /// the saves themselves; on S3, a lifecycle rule (AbortIncompleteMultipartUpload)
    /// covers killed writers.
    pub fn prune_orphans(&self, grace: std::time::Duration) -> Result<Vec<String>> {
        block_on(self.prune_orphans_async(grace, false))
    }

    /// The leftovers [`Run::prune_orphans`] would remove (files; not the empty step
    /// folders it would also remove on local disk), removing nothing.
    pub fn orphans(&self, grace: std::time::Duration) -> Result<Vec<String>> {
        block_on(self.prune_orphans_async(grace, true))
    }

    async fn prune_orphans_async(&self, grace: std::time::Duration, dry_run: bool) -> Result<Vec<String>> {
        let live = self.live_files(grace).await?;
        let (depth, objects) = self.objects().await?;
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let old_enough =
            |m: &object_store::ObjectMeta| now_ms - m.last_modified.timestamp_millis() >= grace.as_millis() as i64;
        let mut by_step: std::collections::BTreeMap<u64, Vec<(String, &object_store::ObjectMeta)>> = Default::default();
        let mut orphans: Vec<&object_store::ObjectMeta> = Vec::new();
        for meta in &objects {
            let parts: Vec<String> = meta.location.parts().skip(depth).map(|p| p.as_ref().to_string()).collect();
            match parts.as_slice() {
                [name] if layout::is_staged_hint(name) && old_enough(meta) => orphans.push(meta),
                [dir, rest @ ..] if !rest.is_empty() => {
                    if let Some(step) = layout::parse_step_dir(dir) {
                        by_step.entry(step).or_default().push((rest.join("/"), meta));
                    }
                }
                _ => {}
            }
        }
        for (step, files) in &by_step {
            // Only what Cairn writes and nothing refers to is ever removed: a user's own
            // file in a step folder stays, and so does data another checkpoint names.
            let leftovers = files.iter().filter(|(f, _)| layout::is_written_by_cairn(f) && !live.keeps(*step, f));
            if files.iter().any(|(f, _)| f == MANIFEST_FILE) {
                // A damaged checkpoint is the user's to inspect (leave all of it); one
                // committed after the manifests were read is left for the next prune.
                if live.readable.contains(step) {
                    orphans.extend(leftovers.filter(|(_, m)| old_enough(m)).map(|(_, m)| *m));
                }
            } else if files.iter().all(|(_, m)| old_enough(m))
                && !commit::is_committed(&self.step_location(*step)).await?
            {
                // A save still writing keeps making new files: all must be old. And the
                // folder must still have no manifest (one may have landed since listing).
                orphans.extend(leftovers.map(|(_, m)| *m));
            }
        }
        if dry_run {
            return Ok(orphans.iter().map(|m| m.location.to_string()).collect());
        }
        let mut removed = Vec::new();
        for meta in orphans {
            match self.location.store().delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => removed.push(meta.location.to_string()),
                Err(e) => return Err(Error::from_store(e, "removing orphan", &format!("file=`{}`", meta.location))),
            }
        }
        if let Some(root) = self.location.local_root() {
            removed.extend(self.remove_empty_step_folders(root, &by_step, grace).await?);
        }
        Ok(removed)
    }

    /// Removes the step folders that hold no file at all (a save killed before its
    /// first write), once older than `grace`.
    async fn remove_empty_step_folders(
        &self,
        root: &std::sync::Arc<crate::local_store::Root>,
        with_files: &std::collections::BTreeMap<u64, Vec<(String, &object_store::ObjectMeta)>>,
        grace: std::time::Duration,
    ) -> Result<Vec<String>> {
        let listed = self
            .location
            .store()
            .list_with_delimiter(Some(self.location.prefix()))
            .await
            .map_err(|e| Error::from_store(e, "listing run", &format!("run=`{}`", self.location.uri())))?;
        let mut removed = Vec::new();
        for folder in listed.common_prefixes {
            let Some(step) = folder.filename().and_then(layout::parse_step_dir) else { continue };
            // A folder holding files was handled above (its files went, and with the
            // last of them the folder); one with files younger than `grace` stays.
            if with_files.contains_key(&step) {
                continue;
            }
            let gone = root
                .remove_empty_folder(&folder, grace)
                .map_err(|e| Error::from_io(e, "removing empty folder", &format!("dir=`{folder}`")))?;
            if gone {
                removed.push(folder.to_string());
            }
        }
        Ok(removed)
    }

    /// Loads the latest committed checkpoint; [`crate::ErrorKind::NotFound`] if none.
    pub fn load_latest(&self, opts: &LoadOptions) -> Result<(State, CheckpointInfo)> {
        let ckpt = self
            .latest()?
            .ok_or_else(|| Error::not_found(format!("no committed checkpoint run=`{}`", self.location.uri())))?;
        Ok((ckpt.load(opts)?, ckpt.info()))
    }
}
