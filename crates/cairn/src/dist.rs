//! Many writers: a checkpoint saved by N ranks (processes, possibly on hosts that share
//! only the store), committed once, loadable by any number of ranks.
//!
//! Each rank passes its whole tensors (replicated when several ranks hold the same one)
//! and its [`Piece`](crate::Piece)s (a box of a tensor's global shape). The ranks agree on a plan in
//! which every distinct box is written exactly once, by one of the ranks holding it,
//! balancing bytes across ranks; each rank writes only its own files; rank 0 commits the
//! manifest only after every rank reported its data durable; every rank returns rank 0's
//! outcome. Ranks talk through an [`Exchange`]: the store itself ([`StoreExchange`], no
//! extra service) or the caller's collectives ([`CallbackExchange`], e.g. an all-gather
//! from `torch.distributed`).
//!
//! A whole tensor several ranks hold with the same content (its XXH3-128, declared in the
//! plan) is replicated and written once; with different contents (an RNG state), or
//! different shapes, it is each rank's own: the lowest-ranked holder's is shared and the
//! other holders' are kept in their rank records, as are plain values and structure that
//! differ from rank 0's. A load for rank r reads r's own.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::format::layout;
use crate::format::manifest::{FileRecord, PieceRecord, RankRecord, TensorRecord};
use crate::format::{checksum, shard};
use crate::info::CheckpointInfo;
use crate::load::Checkpoint;
use crate::runtime::block_on;
use crate::save::{self, SaveOptions};
use crate::state::{checked_nbytes, DType, State};
use crate::store::Location;

/// How ranks exchange small messages during a save.
pub trait Exchange {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> u32;
    /// Number of ranks.
    fn world_size(&self) -> u32;
    /// Starts an attempt; returns an id that is the same on every rank.
    fn begin(&mut self) -> Result<String>;
    /// Every rank's `payload` for `round`, in rank order; [`Gathered::Superseded`] when
    /// this rank must restart with a newer attempt.
    fn all_gather(&mut self, round: &str, payload: Vec<u8>) -> Result<Gathered>;
    /// Called by rank 0 when an attempt is over, `committed` or not: no rank may join it
    /// afterwards, so a retry never replays it, and a committed one leaves nothing behind.
    fn end(&mut self, committed: bool) -> Result<()> {
        let _ = committed;
        Ok(())
    }
}

/// The result of one exchange round.
pub enum Gathered {
    /// Every rank's payload, in rank order.
    Ready(Vec<Vec<u8>>),
    /// Rank 0 started a newer attempt; start over.
    Superseded,
    /// Rank 0 committed this attempt and cleared the round files before this rank read
    /// them: the save succeeded.
    Committed,
}

/// A collective shared across threads: all-gathers one byte string per rank, in rank
/// order (every rank calls it in the same order).
pub type AllGather = std::sync::Arc<dyn Fn(Vec<u8>) -> Result<Vec<Vec<u8>>> + Send + Sync>;

/// Exchange through the caller's collectives: a function that all-gathers one byte
/// string per rank (called by every rank in the same order).
pub struct CallbackExchange<F: FnMut(Vec<u8>) -> Result<Vec<Vec<u8>>>> {
    rank: u32,
    world_size: u32,
    all_gather: F,
}

impl<F: FnMut(Vec<u8>) -> Result<Vec<Vec<u8>>>> CallbackExchange<F> {
    /// An exchange for `rank` of `world_size` over `all_gather`.
    pub fn new(rank: u32, world_size: u32, all_gather: F) -> Self {
        CallbackExchange { rank, world_size, all_gather }
    }

    /// One collective. A count of payloads other than `world_size` is found by every
    /// rank in the plan round, so that no rank leaves the others waiting in a collective.
    fn gather(&mut self, payload: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        (self.all_gather)(payload)
    }
}

impl<F: FnMut(Vec<u8>) -> Result<Vec<Vec<u8>>>> Exchange for CallbackExchange<F> {
    fn rank(&self) -> u32 {
        self.rank
    }
    fn world_size(&self) -> u32 {
        self.world_size
    }
    fn begin(&mut self) -> Result<String> {
        let nonce = uuid::Uuid::new_v4().simple().to_string().into_bytes();
        let all = self.gather(nonce)?;
        // Every rank derives the same id from every rank's nonce.
        Ok(format!("{:016x}", (checksum::content_id(&all.concat()) >> 64) as u64))
    }
    fn all_gather(&mut self, _round: &str, payload: Vec<u8>) -> Result<Gathered> {
        self.gather(payload).map(Gathered::Ready)
    }
}

/// Exchange through the store alone: small files under the checkpoint's `.cairn-coord/`.
/// Rank 0 publishes a fresh attempt id; a rank that picked up a stale one notices the
/// change while waiting and starts over, and an attempt marked over (committed, failed or
/// aborted) is never joined. In each round every rank writes its payload, rank 0 lists
/// the round's folder until all are there, reads each once and publishes them together;
/// the others read that one file. A save costs O(N) requests in all, not per rank. A
/// rank that does not show up within `timeout` fails the save on every rank (rank 0
/// publishes the abort). Once the manifest is committed rank 0 deletes the whole folder:
/// a committed checkpoint holds no coordination files, and a rank that finds its round
/// gone learns the outcome from the manifest (its `save_id` is the attempt).
pub struct StoreExchange {
    dest: Location,
    coord: Location,
    rank: u32,
    world_size: u32,
    attempt: String,
    timeout: Duration,
}

impl StoreExchange {
    /// An exchange for `rank` of `world_size` saving into the checkpoint folder `dir`.
    pub fn new(dir: &Location, rank: u32, world_size: u32, timeout: Duration) -> StoreExchange {
        StoreExchange {
            dest: dir.clone(),
            coord: dir.child(layout::COORD_DIR),
            rank,
            world_size,
            attempt: String::new(),
            timeout,
        }
    }

    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self.coord.store().get(&self.coord.path(name)).await {
            Ok(got) => Ok(Some(got.bytes().await.map_err(|e| self.store_err(e))?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_err(e)),
        }
    }

    async fn write(&self, name: &str, data: Vec<u8>) -> Result<()> {
        self.coord
            .store()
            .put(&self.coord.path(name), PutPayload::from(data))
            .await
            .map(|_| ())
            .map_err(|e| self.store_err(e))
    }

    /// Deletes what earlier attempts left, except the attempt pointer and the files of
    /// `keep`; the markers that say an attempt is over go last, so that a rank that read
    /// an old pointer either sees its attempt over or finds its files gone.
    async fn clear(&self, keep: &str) -> Result<()> {
        let listed: Vec<object_store::ObjectMeta> =
            self.coord.store().list(Some(self.coord.prefix())).try_collect().await.map_err(|e| self.store_err(e))?;
        let kept = self.coord.path("attempt");
        let current = self.coord.path(keep);
        let (markers, rest): (Vec<_>, Vec<_>) = listed
            .into_iter()
            .map(|m| m.location)
            .filter(|p| *p != kept && !p.prefix_matches(&current))
            .partition(|p| matches!(p.filename(), Some("over" | "abort")));
        self.delete_all(rest).await?;
        self.delete_all(markers).await
    }

    /// Deletes every coordination file, the attempt pointer first: no rank joins the
    /// attempt afterwards, and a rank still waiting in it, finding the pointer gone,
    /// learns the outcome from the committed manifest, whatever else is already gone.
    async fn clear_all(&self) -> Result<()> {
        self.delete(&self.coord.path("attempt")).await?;
        let listed: Vec<object_store::path::Path> = self
            .coord
            .store()
            .list(Some(self.coord.prefix()))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| self.store_err(e))?;
        self.delete_all(listed).await
    }

    /// Deletes `paths` in bulk (one request per thousand on S3); a missing one is fine.
    async fn delete_all(&self, paths: Vec<object_store::path::Path>) -> Result<()> {
        let paths = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
        let mut deleted = self.coord.store().delete_stream(paths);
        while let Some(done) = deleted.next().await {
            match done {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.store_err(e)),
            }
        }
        Ok(())
    }

    async fn delete(&self, path: &object_store::path::Path) -> Result<()> {
        match self.coord.store().delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_err(e)),
        }
    }

    /// Whether the attempt `id` is over (ended by rank 0 or aborted).
    async fn is_over(&self, id: &str) -> Result<bool> {
        Ok(self.read(&format!("{id}/over")).await?.is_some() || self.read(&format!("{id}/abort")).await?.is_some())
    }

    /// Rank 0's side of a round: waits (listing the round's folder) until every rank's
    /// payload is there, reads each once, and publishes them all in one file.
    async fn gather_all(&self, dir: &str, round: &str) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + self.timeout;
        let mut got: Vec<Option<Vec<u8>>> = vec![None; self.world_size as usize];
        let prefix = self.coord.path(dir);
        for n in 0.. {
            let listed: Vec<object_store::ObjectMeta> =
                self.coord.store().list(Some(&prefix)).try_collect().await.map_err(|e| self.store_err(e))?;
            for meta in listed {
                let Some(r) = meta.location.filename().and_then(|f| f.parse::<usize>().ok()) else { continue };
                if got.get(r).is_some_and(Option::is_none) {
                    got[r] = self.read(&format!("{dir}/{r:05}")).await?;
                }
            }
            if got.iter().all(Option::is_some) {
                let all: Vec<Vec<u8>> = got.into_iter().flatten().collect();
                self.write(&format!("{dir}/all"), frame(&all)).await?;
                return Ok(all);
            }
            if Instant::now() > deadline {
                let missing: Vec<usize> = got.iter().enumerate().filter(|(_, g)| g.is_none()).map(|(r, _)| r).collect();
                let reason = format!(
                    "timed out waiting for ranks {missing:?} round={round} dir=`{}`; nothing was committed",
                    self.coord.uri()
                );
                self.write(&format!("{}/abort", self.attempt), reason.clone().into_bytes()).await?;
                return Err(ranks_missing(reason));
            }
            tokio::time::sleep(pause(n)).await;
        }
        unreachable!("the loop above returns")
    }

    /// Whether the checkpoint is committed with this attempt's manifest.
    async fn committed(&self) -> bool {
        matches!(crate::commit::manifest_owner(&self.dest, &self.attempt).await, crate::commit::Owner::Us)
    }

    fn store_err(&self, e: object_store::Error) -> Error {
        Error::from_store(e, "coordinating ranks", &format!("dir=`{}`", self.coord.uri()))
    }
}

/// The cause of a store-coordinated save that failed because a rank did not show up in
/// time (see [`is_ranks_missing`]).
#[derive(Debug, thiserror::Error)]
#[error("a rank did not take part in time")]
struct RanksMissing;

/// A save that failed because a rank did not show up within the timeout, `reason` why.
fn ranks_missing(reason: String) -> Error {
    Error::new(ErrorKind::Unavailable, reason).with_source(RanksMissing)
}

/// Whether `err` is a store-coordinated save that failed because a rank did not show up
/// in time (not because the store failed).
pub(crate) fn is_ranks_missing(err: &Error) -> bool {
    std::error::Error::source(err).is_some_and(|cause| cause.is::<RanksMissing>())
}

fn pause(attempt: u32) -> Duration {
    Duration::from_millis((5u64 << attempt.min(6)).min(200))
}

impl Exchange for StoreExchange {
    fn rank(&self) -> u32 {
        self.rank
    }
    fn world_size(&self) -> u32 {
        self.world_size
    }

    fn begin(&mut self) -> Result<String> {
        block_on(async {
            if self.rank == 0 {
                // Publish a fresh attempt (from now on nobody joins an older one), then
                // clear what earlier attempts left.
                let attempt = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
                self.write("attempt", attempt.clone().into_bytes()).await?;
                self.clear(&attempt).await?;
                self.attempt = attempt;
                return Ok(self.attempt.clone());
            }
            let deadline = Instant::now() + self.timeout;
            for n in 0.. {
                if let Some(id) = self.read("attempt").await? {
                    let id = String::from_utf8_lossy(&id).into_owned();
                    // An attempt that is over is never joined: wait for rank 0's next one.
                    if !self.is_over(&id).await? {
                        self.attempt = id;
                        return Ok(self.attempt.clone());
                    }
                }
                if Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(pause(n)).await;
            }
            Err(ranks_missing(format!("timed out waiting for rank 0 to start the save dir=`{}`", self.coord.uri())))
        })
    }

    fn all_gather(&mut self, round: &str, payload: Vec<u8>) -> Result<Gathered> {
        block_on(async {
            let dir = format!("{}/{round}", self.attempt);
            self.write(&format!("{dir}/{:05}", self.rank), payload).await?;
            if self.rank == 0 {
                return self.gather_all(&dir, round).await.map(Gathered::Ready);
            }
            // Rank 0 gives up first and says why (the abort); the others wait a little longer.
            let deadline = Instant::now() + self.timeout + (self.timeout / 4).max(Duration::from_secs(1));
            for n in 0u32.. {
                if let Some(all) = self.read(&format!("{dir}/all")).await? {
                    return unframe(&all, self.world_size as usize).map(Gathered::Ready).ok_or_else(|| {
                        Error::corrupt(format!("unreadable round file round={round} dir=`{}`", self.coord.uri()))
                    });
                }
                if let Some(reason) = self.read(&format!("{}/abort", self.attempt)).await? {
                    // Rank 0 gives up on a rank after its commit too (the last round).
                    if self.committed().await {
                        return Ok(Gathered::Committed);
                    }
                    return Err(ranks_missing(String::from_utf8_lossy(&reason).into_owned()));
                }
                if n % 4 == 3 {
                    match self.read("attempt").await?.map(|id| String::from_utf8_lossy(&id).into_owned()) {
                        Some(id) if id != self.attempt => return Ok(Gathered::Superseded),
                        Some(_) => {}
                        // Rank 0 clears the folder only after a commit: is it this attempt's?
                        None if self.committed().await => return Ok(Gathered::Committed),
                        None => {}
                    }
                }
                if Instant::now() > deadline {
                    // A last look: rank 0 may have committed while this rank was slow.
                    if self.committed().await {
                        return Ok(Gathered::Committed);
                    }
                    let reason = format!(
                        "timed out waiting for rank 0 to gather round={round} dir=`{}`; nothing was committed",
                        self.coord.uri()
                    );
                    return Err(ranks_missing(reason));
                }
                tokio::time::sleep(pause(n)).await;
            }
            unreachable!("the loop above returns")
        })
    }

    fn end(&mut self, committed: bool) -> Result<()> {
        if self.rank != 0 || self.attempt.is_empty() {
            return Ok(());
        }
        match committed {
            true => block_on(self.clear_all()),
            false => block_on(self.write(&format!("{}/over", self.attempt), Vec::new())),
        }
    }
}

/// Every rank's payload in one byte string: per payload, its length (8 bytes, little
/// endian) then its bytes.
fn frame(all: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(all.iter().map(|p| p.len() + 8).sum());
    for payload in all {
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(payload);
    }
    out
}

/// The `ranks` payloads of a [`frame`], or `None` if the bytes are not one.
fn unframe(mut bytes: &[u8], ranks: usize) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(ranks.min(bytes.len() / 8));
    while !bytes.is_empty() {
        let (len, rest) = bytes.split_first_chunk::<8>()?;
        let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        out.push(rest[..len].to_vec());
        bytes = &rest[len..];
    }
    (out.len() == ranks).then_some(out)
}

/// One piece a rank holds (a whole tensor is the piece at offset zero), as declared to the
/// other ranks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Declared {
    key: String,
    dtype: DType,
    global_shape: Vec<u64>,
    offsets: Vec<u64>,
    shape: Vec<u64>,
    /// A whole tensor's content id ([`checksum::content_id`]; `None` for a piece of a
    /// sharded tensor): ranks holding the same content hold a replicated tensor, written
    /// once; ranks holding different contents (RNG states, say) each keep their own.
    #[serde(default)]
    content: Option<u128>,
}

impl Declared {
    /// What tells this piece apart from the others: a whole tensor by its content.
    fn id(&self) -> PieceId {
        (self.key.clone(), self.offsets.clone(), self.shape.clone(), self.content.map(|id| (self.dtype, id)))
    }
}

/// What every rank must agree on before anything is written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Terms {
    step: u64,
    dest: String,
    world_size: u32,
    temporary: bool,
}

/// A rank's first message: the terms it saves on and the pieces it holds, or why it
/// cannot save (its state could not be made).
#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    terms: Terms,
    pieces: Vec<Declared>,
    #[serde(default)]
    refused: Option<String>,
    /// The kind of the refusing rank's error, which every rank's error then has.
    #[serde(default)]
    refused_kind: Option<ErrorKind>,
}

/// Refuses a save whose ranks disagree on its terms or whose number of ranks is not the
/// world size. Every rank sees the same plans, so every rank fails the same way, in the
/// same round, and nothing is written.
fn check_terms(mine: &Terms, plans: &[Plan]) -> Result<()> {
    if let Some((r, plan)) = plans.iter().enumerate().find(|(_, p)| p.refused.is_some()) {
        let why = plan.refused.as_deref().unwrap_or_default();
        let kind = plan.refused_kind.unwrap_or(ErrorKind::Invalid);
        return Err(Error::new(kind, format!("rank {r} could not take part: {why}; nothing was saved")));
    }
    let rank0 = &plans.first().ok_or_else(|| Error::invalid("no rank took part in the save"))?.terms;
    for (r, plan) in plans.iter().enumerate() {
        let t = &plan.terms;
        let differs = if t.world_size != rank0.world_size {
            Some(format!("world_size {} (rank 0: {})", t.world_size, rank0.world_size))
        } else if t.step != rank0.step {
            Some(format!("step {} (rank 0: {})", t.step, rank0.step))
        } else if t.dest != rank0.dest {
            Some(format!("destination `{}` (rank 0: `{}`)", t.dest, rank0.dest))
        } else if t.temporary != rank0.temporary {
            Some(format!("temporary={} (rank 0: {})", t.temporary, rank0.temporary))
        } else {
            None
        };
        if let Some(what) = differs {
            return Err(Error::invalid(format!("ranks disagree: rank {r} saves with {what}; nothing was saved")));
        }
    }
    if plans.len() != mine.world_size as usize {
        return Err(Error::invalid(format!(
            "{} ranks took part in a save with world_size {}; nothing was saved",
            plans.len(),
            mine.world_size
        )));
    }
    Ok(())
}

/// What a rank reports after writing: its pieces and files, and its own plain values
/// and structure (kept per rank where they differ from rank 0's).
#[derive(Debug, Serialize, Deserialize)]
struct Written {
    pieces: Vec<WrittenPiece>,
    files: BTreeMap<String, FileRecord>,
    held: RankRecord,
}

/// One piece a rank wrote: the tensor it belongs to and where it lies in its file.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WrittenPiece {
    pub(crate) key: String,
    pub(crate) dtype: DType,
    pub(crate) global_shape: Vec<u64>,
    /// The content id the rank declared for a whole tensor (see [`Declared`]).
    pub(crate) content: Option<u128>,
    pub(crate) record: PieceRecord,
}

/// Rank 0's verdict, returned by every rank.
#[derive(Debug, Serialize, Deserialize)]
struct Outcome {
    error: Option<(ErrorKind, String)>,
}

/// A distinct piece of a tensor: key, offsets, shape, and for a whole tensor its dtype
/// and content.
type PieceId = (String, Vec<u64>, Vec<u64>, Option<(DType, u128)>);

/// Assigns every distinct piece to one rank holding it, largest first, to the holder with
/// the fewest bytes so far (ties: lowest rank). Pure: every rank computes the same plan
/// from the same gathered declarations. Fails, naming the key, when ranks disagree on a
/// sharded tensor's dtype or global shape, or one holds whole what another holds in
/// pieces (whole tensors of different contents, dtypes or shapes are each rank's own).
fn plan_writers(declared: &[Vec<Declared>]) -> Result<HashMap<PieceId, u32>> {
    let mut meta: BTreeMap<&str, (DType, &Vec<u64>, u32, bool)> = BTreeMap::new();
    let mut holders: BTreeMap<PieceId, (u64, Vec<u32>)> = BTreeMap::new();
    for (rank, list) in declared.iter().enumerate() {
        for held in list {
            let whole = held.content.is_some();
            match meta.get(held.key.as_str()) {
                Some((_, _, first, was_whole)) if *was_whole != whole => {
                    let (a, b) = if *was_whole { (*first, rank as u32) } else { (rank as u32, *first) };
                    return Err(Error::invalid(format!(
                        "rank {a} holds tensor key=`{}` whole, rank {b} holds pieces of it",
                        held.key
                    )));
                }
                Some((dtype, global, first, false)) if *dtype != held.dtype || *global != &held.global_shape => {
                    return Err(Error::invalid(format!(
                        "ranks disagree on tensor key=`{}`: rank {first} has {} {:?}, rank {rank} has {} {:?}",
                        held.key,
                        dtype.name(),
                        global,
                        held.dtype.name(),
                        held.global_shape
                    )));
                }
                Some(_) => {}
                None => {
                    meta.insert(&held.key, (held.dtype, &held.global_shape, rank as u32, whole));
                }
            }
            let bytes = checked_nbytes(held.dtype, &held.shape).unwrap_or(u64::MAX);
            let entry = holders.entry(held.id()).or_insert((bytes, Vec::new()));
            entry.1.push(rank as u32);
        }
    }
    let mut boxes: Vec<_> = holders.into_iter().collect();
    boxes.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then_with(|| a.0.cmp(&b.0)));
    let mut load = vec![0u64; declared.len()];
    let mut plan = HashMap::with_capacity(boxes.len());
    for (id, (bytes, ranks)) in boxes {
        let Some(&writer) = ranks.iter().min_by_key(|&&r| (load[r as usize], r)) else { continue };
        load[writer as usize] = load[writer as usize].saturating_add(bytes);
        plan.insert(id, writer);
    }
    Ok(plan)
}

/// What `state` holds, as declared to the other ranks; whole tensors carry their content
/// id when `contents` (what tells replicas from per-rank tensors; a save that plans with
/// nobody skips hashing them).
pub(crate) fn declared_pieces(state: &State, contents: bool) -> Result<Vec<Declared>> {
    let pieces = state.pieces();
    let mut out: Vec<Declared> = state
        .tensors()
        .map(|(k, t)| Declared {
            key: k.clone(),
            dtype: t.dtype(),
            global_shape: t.shape().to_vec(),
            offsets: vec![0; t.shape().len()],
            shape: t.shape().to_vec(),
            content: contents.then(|| checksum::content_id(t.data())),
        })
        .collect();
    for (key, s) in pieces.iter().flat_map(|(key, held)| held.iter().map(move |s| (key, s))) {
        if state.get(key).is_some() {
            return Err(Error::invalid(format!("key is both a whole tensor and a piece key=`{key}`")));
        }
        let inside = s.offsets.len() == s.global_shape.len()
            && s.tensor.shape().len() == s.global_shape.len()
            && s.offsets
                .iter()
                .zip(s.tensor.shape())
                .zip(&s.global_shape)
                .all(|((&o, &l), &d)| o.checked_add(l).is_some_and(|e| e <= d));
        if !inside {
            return Err(Error::invalid(format!(
                "piece offsets {:?} shape {:?} lies outside global shape {:?} key=`{key}`",
                s.offsets,
                s.tensor.shape(),
                s.global_shape
            )));
        }
        out.push(Declared {
            key: key.clone(),
            dtype: s.tensor.dtype(),
            global_shape: s.global_shape.clone(),
            offsets: s.offsets.clone(),
            shape: s.tensor.shape().to_vec(),
            content: None,
        });
    }
    Ok(out)
}

/// This rank's plain values and structure, as a rank record.
fn held_by(state: &State) -> RankRecord {
    RankRecord {
        values: state.values().map(|(k, v)| (k.clone(), v.clone())).collect(),
        structure: state.structure().map(str::to_string),
        tensors: BTreeMap::new(),
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::invalid("cannot encode a message for the other ranks").with_source(e))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], rank: usize) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(format!("unreadable message from rank {rank}")).with_source(e))
}

/// Which rank of how many saves, and how the ranks coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranks {
    /// This process's rank, below `world_size`.
    pub rank: u32,
    /// Number of ranks saving each checkpoint together.
    pub world_size: u32,
    /// How long a store-coordinated save waits for the other ranks.
    pub timeout: Duration,
}

impl Ranks {
    /// One process saving alone.
    pub fn single() -> Ranks {
        Ranks { rank: 0, world_size: 1, timeout: Duration::from_secs(600) }
    }
}

/// Saves `state` to `location` — a run when `opts.step` is set (into its step folder),
/// else a checkpoint folder — as rank `ranks.rank` of `ranks.world_size`: alone when there
/// is one rank and no `exchange`, else together with the other ranks through `exchange`
/// (the job's own collectives) or, without one, through the store; one process holding
/// pieces of sharded tensors saves them as a job of one. The one place that decides
/// between a single and a multi-rank save.
pub fn save_as_rank(
    location: &Location,
    state: &State,
    opts: &SaveOptions,
    ranks: Ranks,
    exchange: Option<&mut dyn Exchange>,
) -> Result<CheckpointInfo> {
    if ranks.rank >= ranks.world_size {
        return Err(Error::invalid(format!("rank {} is not below world_size {}", ranks.rank, ranks.world_size)));
    }
    if ranks.world_size == 1 && exchange.is_none() && state.pieces().is_empty() {
        return crate::save_at(location, state, opts);
    }
    together(location, opts, ranks, exchange, |dest, step, exchange| {
        save_distributed(dest, state, step, opts, exchange)
    })
}

/// Takes part in the multi-rank save of `opts.step` as rank `ranks.rank` without a state,
/// because this rank could not make its own (`reason`): the save fails on every rank in
/// its first round, naming this rank and the reason, and nothing is written, so no rank
/// is left waiting in a collective that this one would never join. Returns the error
/// every rank gets (alone, `reason` itself).
pub fn refuse_as_rank(
    location: &Location,
    opts: &SaveOptions,
    ranks: Ranks,
    exchange: Option<&mut dyn Exchange>,
    reason: &Error,
) -> Error {
    if ranks.world_size == 1 && exchange.is_none() {
        return Error::new(reason.kind(), reason.full_message());
    }
    let outcome = together(location, opts, ranks, exchange, |dest, step, exchange| {
        Ok(match block_on(crate::commit::is_committed(dest)) {
            Ok(true) => crate::commit::already_committed(step, dest),
            _ => refuse_in(dest, step, opts, exchange, reason),
        })
    });
    outcome.unwrap_or_else(|err| err)
}

/// This rank's side of a save it cannot take part in (`reason`): it joins the attempt
/// and the plan round with its refusal, so every rank fails there, with the kind of
/// `reason`; returns that error.
fn refuse_in(dest: &Location, step: u64, opts: &SaveOptions, exchange: &mut dyn Exchange, reason: &Error) -> Error {
    let why = reason.full_message();
    loop {
        if let Err(err) = exchange.begin() {
            return err;
        }
        let terms =
            Terms { step, dest: dest.uri().to_string(), world_size: exchange.world_size(), temporary: opts.temporary };
        let plan = Plan {
            terms: terms.clone(),
            pieces: Vec::new(),
            refused: Some(why.clone()),
            refused_kind: Some(reason.kind()),
        };
        let gathered = encode(&plan).and_then(|plan| round(exchange, dest, "plan", plan));
        if exchange.rank() == 0 {
            let _ = exchange.end(false);
        }
        match gathered {
            Err(err) => return err,
            Ok(ControlFlow::Continue(all)) => {
                let plans: Result<Vec<Plan>> = all.iter().enumerate().map(|(r, b)| decode(b, r)).collect();
                return match plans.and_then(|plans| check_terms(&terms, &plans)) {
                    Err(err) => err,
                    Ok(()) => Error::new(reason.kind(), format!("rank {} could not take part: {why}", exchange.rank())),
                };
            }
            // Rank 0 started a newer attempt: refuse that one.
            Ok(ControlFlow::Break(None)) => continue,
            Ok(ControlFlow::Break(Some(_))) => return crate::commit::already_committed(step, dest),
        }
    }
}

/// Runs `save` with the exchange a multi-rank save of `opts` goes through, in the
/// checkpoint folder it saves into: `exchange` (the job's own collectives), a job of one
/// (one process holding pieces), or the store.
fn together<T>(
    location: &Location,
    opts: &SaveOptions,
    ranks: Ranks,
    exchange: Option<&mut dyn Exchange>,
    save: impl FnOnce(&Location, u64, &mut dyn Exchange) -> Result<T>,
) -> Result<T> {
    let dest = match opts.step {
        Some(step) => location.child(&layout::step_dir(step)),
        None => location.clone(),
    };
    let step = opts.step.unwrap_or_default();
    match exchange {
        Some(exchange) => save(&dest, step, exchange),
        // One process holding pieces (e.g. a jax array sharded over its devices): the
        // same plan, with nobody to talk to.
        None if ranks.world_size == 1 => {
            let mut alone = CallbackExchange::new(0, 1, |payload: Vec<u8>| Ok(vec![payload]));
            save(&dest, step, &mut alone)
        }
        None => {
            let mut exchange = StoreExchange::new(&dest, ranks.rank, ranks.world_size, ranks.timeout);
            save(&dest, step, &mut exchange)
        }
    }
}

/// Saves this rank's part of a multi-rank checkpoint into the checkpoint folder `dest`
/// (`<run>/step-…`) and returns once it is committed by rank 0 — with the same outcome
/// on every rank. `state` holds this rank's whole tensors (replicated ones are written
/// once overall), its [`Piece`](crate::Piece)s of sharded tensors, and plain values
/// (rank 0's are kept).
pub fn save_distributed(
    dest: &Location,
    state: &State,
    step: u64,
    opts: &SaveOptions,
    exchange: &mut dyn Exchange,
) -> Result<CheckpointInfo> {
    let mine = match block_on(crate::commit::is_committed(dest)) {
        Ok(true) => return Err(crate::commit::already_committed(step, dest)),
        Ok(false) => declared_pieces(state, true),
        Err(err) => Err(err),
    };
    // A rank that cannot say what it holds still joins, so that no rank waits for it.
    let mine = mine.map_err(|err| refuse_in(dest, step, opts, exchange, &err))?;
    loop {
        let attempt = exchange.begin()?;
        let result = attempt_save(dest, state, step, opts, exchange, &attempt, &mine);
        if exchange.rank() == 0 {
            // Best effort: an attempt left unmarked is still cleared by the next one, and
            // files left by a committed one by `prune`.
            let _ = exchange.end(matches!(result, Ok(Some(_))));
        }
        match result? {
            Some(info) => return Ok(info),
            None => continue, // superseded by a newer attempt of rank 0
        }
    }
}

/// One round of an attempt: every rank's payload, or how the attempt ended without it
/// (`Break(None)`: superseded, start over; `Break(Some(info))`: rank 0 already committed).
fn round(
    exchange: &mut dyn Exchange,
    dest: &Location,
    name: &str,
    payload: Vec<u8>,
) -> Result<ControlFlow<Option<CheckpointInfo>, Vec<Vec<u8>>>> {
    Ok(match exchange.all_gather(name, payload)? {
        Gathered::Ready(all) => ControlFlow::Continue(all),
        Gathered::Superseded => ControlFlow::Break(None),
        Gathered::Committed => ControlFlow::Break(Some(block_on(Checkpoint::open_async(dest.clone()))?.info())),
    })
}

#[allow(clippy::too_many_arguments)]
fn attempt_save(
    dest: &Location,
    state: &State,
    step: u64,
    opts: &SaveOptions,
    exchange: &mut dyn Exchange,
    attempt: &str,
    mine: &[Declared],
) -> Result<Option<CheckpointInfo>> {
    let rank = exchange.rank();
    let terms =
        Terms { step, dest: dest.uri().to_string(), world_size: exchange.world_size(), temporary: opts.temporary };
    let mine_plan = Plan { terms: terms.clone(), pieces: mine.to_vec(), refused: None, refused_kind: None };
    let all = match round(exchange, dest, "plan", encode(&mine_plan)?)? {
        ControlFlow::Continue(all) => all,
        ControlFlow::Break(ended) => return Ok(ended),
    };
    let plans: Vec<Plan> = all.iter().enumerate().map(|(r, b)| decode(b, r)).collect::<Result<_>>()?;
    check_terms(&terms, &plans)?;
    let declared: Vec<Vec<Declared>> = plans.into_iter().map(|p| p.pieces).collect();
    let plan = plan_writers(&declared)?;

    let held = held_by(state);
    let chosen = mine.iter().filter(|held| plan.get(&held.id()) == Some(&rank));
    let written =
        write_held(dest, state, rank, &attempt[..attempt.len().min(12)], opts, chosen).and_then(|(pieces, files)| {
            match opts.verify_written {
                true => verify_written(dest, &pieces, &files).map(|()| (pieces, files)),
                false => Ok((pieces, files)),
            }
        });
    let (report, failure) = match written {
        Ok((pieces, files)) => (Written { pieces, files, held }, None),
        // A rank whose writes failed still takes part, so every rank learns the outcome.
        Err(e) => (
            Written { pieces: Vec::new(), files: BTreeMap::new(), held },
            Some((e.kind(), format!("rank {rank}: {}", e.full_message()))),
        ),
    };
    let all = match round(exchange, dest, "written", encode(&(report, failure))?)? {
        ControlFlow::Continue(all) => all,
        ControlFlow::Break(ended) => return Ok(ended),
    };

    let verdict = if rank == 0 {
        Outcome {
            error: commit(dest, state, step, opts, attempt, &declared, &all)
                .err()
                .map(|e| (e.kind(), e.full_message())),
        }
    } else {
        Outcome { error: None }
    };
    let committed = rank == 0 && verdict.error.is_none();
    let all = match round(exchange, dest, "outcome", encode(&verdict)?) {
        Ok(ControlFlow::Continue(all)) => all,
        Ok(ControlFlow::Break(ended)) => return Ok(ended),
        // Rank 0 committed: the save stands, whatever became of the last round (a rank
        // that died since finds the manifest when it looks).
        Err(_) if committed => return Ok(Some(block_on(Checkpoint::open_async(dest.clone()))?.info())),
        Err(err) => return Err(err),
    };
    let verdict: Outcome = decode(&all[0], 0)?;
    if let Some((kind, message)) = verdict.error {
        return Err(Error::new(kind, message));
    }
    let ckpt = block_on(Checkpoint::open_async(dest.clone()))?;
    Ok(Some(ckpt.info()))
}

/// Writes the pieces `chosen` of `state` (whole tensors, or pieces of sharded ones) as
/// this rank's shard files, durably, named in them `key` or `key@o0,o1,...`; returns
/// where each piece lies and the files written.
pub(crate) fn write_held<'a>(
    dest: &Location,
    state: &State,
    rank: u32,
    tag: &str,
    opts: &SaveOptions,
    chosen: impl Iterator<Item = &'a Declared>,
) -> Result<(Vec<WrittenPiece>, BTreeMap<String, FileRecord>)> {
    let mut share = State::new();
    let mut placement: BTreeMap<String, &Declared> = BTreeMap::new();
    for held in chosen {
        let piece = state.pieces().get(&held.key).and_then(|pieces| {
            pieces.iter().find(|p| p.offsets == held.offsets && p.tensor.shape() == held.shape.as_slice())
        });
        let tensor = match piece {
            Some(p) => p.tensor.clone(),
            None => state
                .tensor(&held.key)
                .cloned()
                .ok_or_else(|| Error::invalid(format!("missing tensor key=`{}`", held.key)))?,
        };
        let whole = held.shape == held.global_shape;
        let mut name = shard::piece_name(&held.key, &held.offsets, whole);
        // Names are informational: a key that looks like another's piece name (`w@2,0`)
        // gets a suffix rather than overwriting it.
        while share.get(&name).is_some() {
            name.push('~');
        }
        share.insert_tensor(name.clone(), tensor);
        placement.insert(name, held);
    }
    let shards = block_on(save::write_share(dest, &share, rank, tag, opts))?;
    let pieces = shards
        .iter()
        .flat_map(|s| s.pieces.iter())
        .filter_map(|(name, piece)| {
            let held = placement.get(name)?;
            Some(WrittenPiece {
                key: held.key.clone(),
                dtype: held.dtype,
                global_shape: held.global_shape.clone(),
                content: held.content,
                record: PieceRecord { offsets: held.offsets.clone(), ..piece.clone() },
            })
        })
        .collect();
    let files = shards.into_iter().map(|s| (s.file, s.record)).collect();
    Ok((pieces, files))
}

/// Reads back `files`, just written into `dest`, and checks every checksum of them and of
/// `pieces` in them; the first mismatch is an [`ErrorKind::Unavailable`] error naming it
/// (what was sent is intact: writing it again may well succeed).
fn verify_written(dest: &Location, pieces: &[WrittenPiece], files: &BTreeMap<String, FileRecord>) -> Result<()> {
    let tensors = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let record = TensorRecord { dtype: p.dtype, shape: p.global_shape.clone(), pieces: vec![p.record.clone()] };
            (format!("{}#{i}", p.key), record)
        })
        .collect();
    let written = Checkpoint::written(dest.clone(), files.clone(), tensors);
    match block_on(written.verify_async())?.into_iter().next() {
        Some(first) => Err(Error::new(
            ErrorKind::Unavailable,
            format!("a written file read back differently: {}", first.message()),
        )),
        None => Ok(()),
    }
}

/// Adds the piece rank `rank` wrote to the record of its tensor in `tensors`; a rank
/// that disagrees with the record on the tensor's dtype or global shape is refused,
/// naming the tensor. The one place written pieces become tensor records.
pub(crate) fn merge_piece(
    tensors: &mut BTreeMap<String, TensorRecord>,
    rank: usize,
    piece: WrittenPiece,
) -> Result<()> {
    let WrittenPiece { key, dtype, global_shape, record, .. } = piece;
    let tensor = tensors.entry(key.clone()).or_insert_with(|| TensorRecord {
        dtype,
        shape: global_shape.clone(),
        pieces: Vec::new(),
    });
    if tensor.dtype != dtype || tensor.shape != global_shape {
        return Err(Error::invalid(format!(
            "ranks disagree on tensor key=`{key}`: {} {:?}, rank {rank} wrote {} {:?}",
            tensor.dtype.name(),
            tensor.shape,
            dtype.name(),
            global_shape
        )));
    }
    tensor.pieces.push(record);
    Ok(())
}

/// Rank 0: checks that every file the ranks reported is where the manifest will say, with
/// its size (a rank that wrote somewhere rank 0 cannot see must not commit a manifest
/// naming missing files).
pub(crate) async fn confirm_files(dest: &Location, files: &BTreeMap<String, FileRecord>) -> Result<()> {
    let checks = files.iter().map(|(name, record)| async move {
        let shown = format!("file=`{}/{name}`", dest.uri());
        let meta = dest.store().head(&dest.path(name)).await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => Error::invalid(format!(
                "a rank reported a file that is not in the checkpoint folder {shown}; nothing was committed"
            )),
            e => Error::from_store(e, "checking a rank's file", &shown),
        })?;
        if meta.size != record.size {
            return Err(Error::invalid(format!(
                "a rank reported {} bytes, the store holds {} {shown}; nothing was committed",
                record.size, meta.size
            )));
        }
        Ok(())
    });
    futures::stream::iter(checks).buffer_unordered(16).try_collect::<Vec<()>>().await.map(drop)
}

/// Rank 0: merges every rank's report into one manifest and commits it (create-only).
/// A whole tensor held with different contents by several ranks is per rank: the content
/// of its lowest-ranked holder is the shared one, every other holder keeps its own in its
/// rank record.
fn commit(
    dest: &Location,
    state: &State,
    step: u64,
    opts: &SaveOptions,
    attempt: &str,
    declared: &[Vec<Declared>],
    reports: &[Vec<u8>],
) -> Result<()> {
    // Per-rank keys: the ranks holding each distinct content, in rank order.
    let mut contents: BTreeMap<&str, BTreeMap<PieceId, Vec<usize>>> = BTreeMap::new();
    for (r, list) in declared.iter().enumerate() {
        for held in list.iter().filter(|h| h.content.is_some()) {
            contents.entry(&held.key).or_default().entry(held.id()).or_default().push(r);
        }
    }
    contents.retain(|_, by_content| by_content.len() > 1);

    let mut tensors: BTreeMap<String, TensorRecord> = BTreeMap::new();
    let mut own: BTreeMap<PieceId, TensorRecord> = BTreeMap::new();
    let mut files = BTreeMap::new();
    let mut held = Vec::with_capacity(reports.len());
    for (r, bytes) in reports.iter().enumerate() {
        let (report, failure): (Written, Option<(ErrorKind, String)>) = decode(bytes, r)?;
        if let Some((kind, message)) = failure {
            return Err(Error::new(kind, message));
        }
        files.extend(report.files);
        held.push(report.held);
        for WrittenPiece { key, dtype, global_shape, content, record } in report.pieces {
            if contents.contains_key(key.as_str()) {
                let id = (key, record.offsets.clone(), record.shape.clone(), content.map(|c| (dtype, c)));
                own.insert(id, TensorRecord { dtype, shape: global_shape, pieces: vec![record] });
                continue;
            }
            merge_piece(&mut tensors, r, WrittenPiece { key, dtype, global_shape, content, record })?;
        }
    }
    let rank0 = held_by(state);
    let mut ranks: BTreeMap<String, RankRecord> = BTreeMap::new();
    for (key, by_content) in contents {
        let mut by_first_holder: Vec<(PieceId, Vec<usize>)> = by_content.into_iter().collect();
        by_first_holder.sort_by_key(|(_, holders)| holders[0]);
        for (i, (id, holders)) in by_first_holder.into_iter().enumerate() {
            let record = own.remove(&id).ok_or_else(|| {
                Error::invalid(format!("no rank reported writing its own tensor key=`{key}` ranks={holders:?}"))
            })?;
            if i == 0 {
                tensors.insert(key.to_string(), record);
                continue;
            }
            for r in holders {
                let mine = ranks.entry(r.to_string()).or_insert_with(|| held[r].clone());
                mine.tensors.insert(key.to_string(), record.clone());
            }
        }
    }
    for (r, record) in held.into_iter().enumerate().skip(1) {
        if record != rank0 {
            ranks.entry(r.to_string()).or_insert(record);
        }
    }
    let world_size = declared.len() as u32;
    let mut manifest = save::manifest_of(state, step, opts, attempt, world_size, tensors, files);
    manifest.ranks = ranks;
    block_on(confirm_files(dest, &manifest.files))?;
    // The commit validates the manifest with the reader's rules (once): holes or overlaps
    // in what the ranks hold are refused, named by tensor.
    block_on(crate::commit::create_manifest(dest, &manifest, step))
}
