//! The manifest: Cairn's commit record for one checkpoint (serde types, encoding and
//! validation). A manifest is parsed as hostile input: its size is bounded before it is
//! read, its version is checked before its schema, and every reference it makes (files,
//! byte ranges, offsets) is checked against limits before anything is allocated from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::layout::{self, DataFile};
use crate::geometry;
use crate::state::{checked_nbytes, checked_numel, map_budget, DType, Value};

/// The value of the manifest's `format` field.
pub const FORMAT_NAME: &str = "cairn";
/// The newest format version this library reads and writes: 2, whose manifests may name
/// data files in other checkpoint folders of the same run (incremental saves).
pub const FORMAT_VERSION: u64 = 2;
/// The oldest format version this library reads, and the one it writes for every
/// manifest that names only its own files (so that older readers still read them).
pub const FORMAT_VERSION_STANDALONE: u64 = 1;
/// Every format version this library reads.
const READ_VERSIONS: std::ops::RangeInclusive<u64> = FORMAT_VERSION_STANDALONE..=FORMAT_VERSION;
/// Largest manifest accepted, checked before reading it.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;
/// Pieces of one tensor are checked for overlaps by a sweep whose comparisons are capped
/// at this many per piece (row, column and grid layouts of thousands of pieces need a
/// handful); a layout past the cap is refused as corrupt instead of taking quadratic time.
pub const MAX_OVERLAP_COMPARISONS_PER_PIECE: u64 = 256;
/// Largest tensor rank accepted.
pub const MAX_RANK: usize = 64;

/// One checkpoint's commit record (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION_STANDALONE`], or [`FORMAT_VERSION`] when the manifest names data
    /// files of other checkpoints (see [`Manifest::required_version`]).
    pub format_version: u64,
    /// Training step of the checkpoint.
    pub step: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Whether retention may delete it once a newer checkpoint is committed.
    pub temporary: bool,
    /// Unique id of the save that committed it (reconciles retried commits).
    pub save_id: String,
    /// Who wrote it.
    pub writer: Writer,
    /// Numeric metrics (e.g. `loss`) for keep-best retention; at most
    /// [`MAX_METADATA_BYTES`] of JSON.
    #[serde(default, deserialize_with = "bounded_metrics")]
    pub metrics: BTreeMap<String, Value>,
    /// Free-form user metadata (config, notes); at most [`MAX_METADATA_BYTES`] of JSON.
    #[serde(default, deserialize_with = "bounded_metadata")]
    pub metadata: serde_json::Value,
    /// Plain (non-tensor) values by key; at most [`MAX_VALUE_MAPS`] maps among them.
    #[serde(default, deserialize_with = "unique_keys")]
    pub values: BTreeMap<String, Value>,
    /// A frontend's description of how keys nest, as JSON text (opaque to the engine,
    /// kept as text so that it costs its size in memory).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "raw_json")]
    pub structure: Option<String>,
    /// Every tensor by key.
    #[serde(deserialize_with = "unique_keys")]
    pub tensors: BTreeMap<String, TensorRecord>,
    /// Every data file by path relative to the checkpoint folder.
    #[serde(deserialize_with = "unique_keys")]
    pub files: BTreeMap<String, FileRecord>,
    /// In a multi-rank save, the plain values and structure of each rank (by its number,
    /// in decimal) whose own differ from rank 0's (those are `values` and `structure`), so
    /// that every rank gets its own back; absent when every rank held what rank 0 did.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "unique_keys")]
    pub ranks: BTreeMap<String, RankRecord>,
    /// How long the save that committed it took, as it measured itself (absent in
    /// manifests of multi-rank saves and of older writers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<SaveTimings>,
    /// Set when the checkpoint holds only what one rank of a job of `writer.world_size`
    /// ranks held (each rank's copy on a local tier): the rank's number. Its tensors may
    /// then have holes (the other ranks' pieces), and a load reads only boxes its pieces
    /// cover; any other box is refused ([`ErrorKind::Incompatible`](crate::ErrorKind)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<u32>,
}

/// How long a save took, as the saving process measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveTimings {
    /// Milliseconds the training loop was blocked taking the state's snapshot before the
    /// save was handed to the background (a manager's save; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_ms: Option<u64>,
    /// Milliseconds from the start of the save to the commit: writing every data file
    /// durably.
    pub write_ms: u64,
}

/// What one rank of a multi-rank save held besides the shared tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankRecord {
    /// The rank's plain values by key.
    #[serde(default, deserialize_with = "unique_keys")]
    pub values: BTreeMap<String, Value>,
    /// The rank's frontend structure, as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "raw_json")]
    pub structure: Option<String>,
    /// The rank's own whole tensors where they differ from the shared ones of the same
    /// keys (per-rank RNG states, buffers): each key is also in the manifest's `tensors`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "unique_keys")]
    pub tensors: BTreeMap<String, TensorRecord>,
}

/// Largest `metadata` and `metrics` accepted, each as JSON text (refused on save and on
/// load before parsing): free-form JSON costs up to ~150x its text once parsed.
pub const MAX_METADATA_BYTES: usize = 1 << 20;
/// Most maps accepted among the plain values (each costs ~600 bytes parsed, from a few
/// bytes of text).
pub const MAX_VALUE_MAPS: usize = 100_000;
/// The structure may hold this many bytes per key byte, plus [`STRUCTURE_BYTES_PER_KEY`]
/// per key and [`STRUCTURE_SLACK_BYTES`]: what the Python frontend writes fits easily.
pub const STRUCTURE_BYTES_PER_KEY_BYTE: usize = 4;
/// See [`STRUCTURE_BYTES_PER_KEY_BYTE`].
pub const STRUCTURE_BYTES_PER_KEY: usize = 64;
/// See [`STRUCTURE_BYTES_PER_KEY_BYTE`]; room for containers that hold no key (a state
/// of a million empty dicts fits).
pub const STRUCTURE_SLACK_BYTES: usize = 16 << 20;

/// Whether a structure of `structure.len()` bytes fits the keys it describes (see
/// [`STRUCTURE_BYTES_PER_KEY_BYTE`]); checked on save and on load alike.
pub fn check_structure_size<'k>(structure: &str, keys: impl Iterator<Item = &'k String>) -> Result<(), String> {
    let (count, bytes) = key_totals(keys);
    structure_fits(structure, count, bytes)
}

/// The number of `keys` and their total length.
fn key_totals<'k>(keys: impl Iterator<Item = &'k String>) -> (usize, usize) {
    keys.fold((0usize, 0usize), |(n, b), k| (n + 1, b.saturating_add(k.len())))
}

/// [`check_structure_size`] for `count` keys of `bytes` bytes in all.
fn structure_fits(structure: &str, count: usize, bytes: usize) -> Result<(), String> {
    let limit = STRUCTURE_BYTES_PER_KEY_BYTE
        .saturating_mul(bytes)
        .saturating_add(STRUCTURE_BYTES_PER_KEY.saturating_mul(count))
        .saturating_add(STRUCTURE_SLACK_BYTES);
    if structure.len() > limit {
        return Err(format!("structure of {} bytes exceeds {limit} bytes for {count} keys", structure.len()));
    }
    Ok(())
}

/// The number of maps in `values`, nested ones included (at most [`MAX_VALUE_MAPS`]
/// are accepted).
pub fn count_value_maps<'v>(values: impl Iterator<Item = &'v Value>) -> usize {
    let mut pending: Vec<&Value> = values.collect();
    let mut maps = 0;
    while let Some(value) = pending.pop() {
        match value {
            Value::Map(m) => {
                maps += 1;
                pending.extend(m.values());
            }
            Value::List(l) => pending.extend(l),
            _ => {}
        }
    }
    maps
}

/// The raw JSON text of a field, refused past `limit` bytes before it is parsed.
fn raw_within<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
    limit: usize,
    field: &str,
) -> Result<Box<serde_json::value::RawValue>, D::Error> {
    let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
    if raw.get().len() > limit {
        return Err(serde::de::Error::custom(format!("{field} larger than {limit} bytes")));
    }
    Ok(raw)
}

fn bounded_metadata<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<serde_json::Value, D::Error> {
    let raw = raw_within(deserializer, MAX_METADATA_BYTES, "metadata")?;
    serde_json::from_str(raw.get()).map_err(serde::de::Error::custom)
}

fn bounded_metrics<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, Value>, D::Error> {
    let raw = raw_within(deserializer, MAX_METADATA_BYTES, "metrics")?;
    unique_keys(&mut serde_json::Deserializer::from_str(raw.get())).map_err(serde::de::Error::custom)
}

/// A JSON document kept as its text: written inline, read back as the exact text.
mod raw_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::value::RawValue;

    pub fn serialize<S: Serializer>(text: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = text.as_ref().map(|t| RawValue::from_string(t.clone())).transpose();
        raw.map_err(serde::ser::Error::custom)?.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
        Ok(Option::<Box<RawValue>>::deserialize(deserializer)?.map(|raw| raw.get().to_string()))
    }
}

/// Deserializes a JSON object into a map, refusing duplicate keys (which plain serde
/// would silently resolve to the last one).
fn unique_keys<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Unique<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Unique<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object with unique keys")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((key, value)) = map.next_entry::<String, V>()? {
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
                }
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_map(Unique(std::marker::PhantomData))
}

/// The writer of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    /// Library name (`cairn`).
    pub library: String,
    /// Library version.
    pub version: String,
    /// Number of ranks that wrote the checkpoint.
    pub world_size: u32,
}

/// A tensor: dtype, global shape, and the pieces that cover it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRecord {
    /// Element type.
    pub dtype: DType,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Pieces, each a dense box of the global tensor stored in one file.
    pub pieces: Vec<PieceRecord>,
}

/// A dense box of a tensor stored contiguously (row-major) in one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceRecord {
    /// Data file, relative to the checkpoint folder (`shards/...`).
    pub file: String,
    /// Byte range `[start, end)` within the file.
    pub range: [u64; 2],
    /// Offset of the box within the global shape, one per dimension.
    pub offsets: Vec<u64>,
    /// Shape of the box.
    pub shape: Vec<u64>,
    /// CRC-32C (Castagnoli) of the piece's bytes.
    pub crc32c: u32,
    /// XXH3-128 of the piece's bytes (32 lowercase hex digits), written by incremental
    /// saves so that a later save can find the piece by its content; readers that do not
    /// deduplicate ignore it (an optional field, allowed in version 1 too).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex128")]
    pub xxh3: Option<u128>,
    /// The piece's content sample (`checksum::content_sample`, 16 lowercase hex digits),
    /// written by incremental saves: a later save whose tensor has another sample knows
    /// it changed without hashing all of it. Optional like `xxh3`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex64")]
    pub sample: Option<u64>,
}

/// Fixed-width lowercase hex for the content fields (`xxh3`, `sample`): written with
/// every digit, read back only in exactly that form.
mod hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: Option<u128>, digits: usize, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => serializer.serialize_str(&format!("{value:0digits$x}")),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D, digits: usize) -> Result<u128, D::Error> {
        let text = <&str>::deserialize(deserializer)?;
        let canonical = text.len() == digits && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !canonical {
            return Err(serde::de::Error::custom(format!("expected {digits} lowercase hex digits")));
        }
        u128::from_str_radix(text, 16).map_err(serde::de::Error::custom)
    }
}

/// A 64-bit content sample as 16 lowercase hex digits.
mod hex64 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sample: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
        super::hex::serialize(sample.map(u128::from), 16, serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
        // 16 hex digits always fit.
        super::hex::deserialize(deserializer, 16).map(|v| Some(v as u64))
    }
}

/// A 128-bit content hash as 32 lowercase hex digits.
mod hex128 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(hash: &Option<u128>, serializer: S) -> Result<S::Ok, S::Error> {
        super::hex::serialize(*hash, 32, serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u128>, D::Error> {
        super::hex::deserialize(deserializer, 32).map(Some)
    }
}

/// A data file of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Exact size in bytes.
    pub size: u64,
    /// Length of the safetensors header region (8-byte length + JSON), where data starts.
    pub header_len: u64,
    /// CRC-32C of the header region.
    pub header_crc32c: u32,
}

#[derive(Deserialize)]
struct VersionProbe {
    format: Option<serde_json::Value>,
    format_version: Option<serde_json::Value>,
}

impl Manifest {
    /// Encodes the manifest as JSON; one larger than readers accept
    /// ([`MAX_MANIFEST_BYTES`]) is refused.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let bytes = serde_json::to_vec(self)
            .map_err(|e| Error::invalid(format!("cannot encode manifest step={}", self.step)).with_source(e))?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::invalid(format!(
                "the manifest would take {} bytes, more than readers accept ({MAX_MANIFEST_BYTES}) step={}",
                bytes.len(),
                self.step
            )));
        }
        Ok(bytes)
    }

    /// Decodes and validates a manifest read from `file` (named in every error).
    pub fn decode(bytes: &[u8], file: &str) -> Result<Manifest> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::corrupt(format!("manifest larger than {MAX_MANIFEST_BYTES} bytes file=`{file}`")));
        }
        // One parse in the common case; only a manifest of no version this library reads
        // is parsed again, by the probe, to say what it is instead.
        let parsed: Result<Manifest, _> = map_budget::with(MAX_VALUE_MAPS, || serde_json::from_slice(bytes));
        let manifest = parsed.map_err(|e| {
            Self::unreadable(bytes, file).unwrap_or_else(|| {
                Error::corrupt(format!("manifest does not match the cairn format file=`{file}`")).with_source(e)
            })
        })?;
        if manifest.format != FORMAT_NAME || !READ_VERSIONS.contains(&manifest.format_version) {
            return Err(Self::unreadable(bytes, file)
                .unwrap_or_else(|| Error::corrupt(format!("not a cairn manifest file=`{file}`"))));
        }
        manifest.validate(file)?;
        Ok(manifest)
    }

    /// Why `bytes` is not a Cairn manifest this library reads, if its `format` or
    /// `format_version` says: not JSON, not Cairn's, or a version it does not know.
    fn unreadable(bytes: &[u8], file: &str) -> Option<Error> {
        let probe: VersionProbe = match serde_json::from_slice(bytes) {
            Ok(probe) => probe,
            Err(e) => return Some(Error::corrupt(format!("manifest is not valid json file=`{file}`")).with_source(e)),
        };
        if probe.format.as_ref().and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            return Some(Error::corrupt(format!("not a cairn manifest file=`{file}`")));
        }
        match probe.format_version.as_ref().and_then(|v| v.as_u64()) {
            Some(version) if READ_VERSIONS.contains(&version) => None,
            Some(other) => Some(Error::incompatible(format!(
                "unsupported format version {other} (this cairn reads {FORMAT_VERSION_STANDALONE} to {FORMAT_VERSION}) file=`{file}`"
            ))),
            None => Some(Error::corrupt(match &probe.format_version {
                Some(other) => format!("format_version must be an integer, not {other} file=`{file}`"),
                None => format!("manifest has no format_version file=`{file}`"),
            })),
        }
    }

    /// The lowest format version that describes this manifest: [`FORMAT_VERSION`] if it
    /// names a data file of another checkpoint, else [`FORMAT_VERSION_STANDALONE`].
    pub fn required_version(&self) -> u64 {
        let sibling = self.files.keys().any(|f| matches!(layout::parse_data_file(f), Some(DataFile::Sibling { .. })));
        if sibling {
            FORMAT_VERSION
        } else {
            FORMAT_VERSION_STANDALONE
        }
    }

    /// Whether some data file lives in another checkpoint's folder.
    pub fn has_references(&self) -> bool {
        self.required_version() > FORMAT_VERSION_STANDALONE
    }

    /// The bytes of the data files in the checkpoint's own folder: what its save wrote.
    pub fn own_file_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter(|(f, _)| matches!(layout::parse_data_file(f), Some(DataFile::Own(_))))
            .fold(0u64, |total, (_, r)| total.saturating_add(r.size))
    }

    /// This manifest as it reads with every data file in its own folder: each reference
    /// `../step-<n>/shards/<name>` becomes `shards/<name>` (what a copy that stands alone
    /// holds), at the lowest version that describes it. Two files that would get one
    /// name are refused (no Cairn writer makes them).
    pub fn standalone(&self) -> Result<Manifest> {
        let local = |file: &str| match layout::parse_data_file(file) {
            Some(DataFile::Sibling { shard, .. }) => shard.to_string(),
            _ => file.to_string(),
        };
        let mut out = self.clone();
        out.files = BTreeMap::new();
        for (file, record) in &self.files {
            if out.files.insert(local(file), record.clone()).is_some() {
                return Err(Error::corrupt(format!(
                    "two data files of the checkpoint have one name data_file=`{}` step={}",
                    crate::error::escape_control(&local(file)),
                    self.step
                )));
            }
        }
        let records = out.tensors.values_mut().chain(out.ranks.values_mut().flat_map(|r| r.tensors.values_mut()));
        for piece in records.flat_map(|t| t.pieces.iter_mut()) {
            piece.file = local(&piece.file);
        }
        out.format_version = out.required_version();
        Ok(out)
    }

    /// The plain values and structure rank `rank` saved: its own record if it has one,
    /// else rank 0's (`values`, `structure`).
    pub fn held_by(&self, rank: Option<u32>) -> (&BTreeMap<String, Value>, Option<&str>) {
        match rank.and_then(|r| self.ranks.get(&r.to_string())) {
            Some(record) => (&record.values, record.structure.as_deref()),
            None => (&self.values, self.structure.as_deref()),
        }
    }

    /// The tensor `key` as rank `rank` saved it: its own if it has one, else the shared
    /// one (`tensors`).
    pub fn tensor_for(&self, key: &str, rank: Option<u32>) -> Option<&TensorRecord> {
        rank.and_then(|r| self.ranks.get(&r.to_string()))
            .and_then(|record| record.tensors.get(key))
            .or_else(|| self.tensors.get(key))
    }

    /// Every tensor record with its key: the shared ones, then each rank's own.
    pub fn all_tensors(&self) -> impl Iterator<Item = (&String, &TensorRecord)> {
        self.tensors.iter().chain(self.ranks.values().flat_map(|r| r.tensors.iter()))
    }

    /// Checks every internal reference: file names, byte ranges, shapes, offsets, keys,
    /// and the size limits of the free-form fields.
    pub fn validate(&self, file: &str) -> Result<()> {
        if let Some(structure) = &self.structure {
            check_structure_size(structure, self.tensors.keys().chain(self.values.keys()))
                .map_err(|msg| Error::corrupt(format!("{msg} file=`{file}`")))?;
        }
        let maps = count_value_maps(self.values.values().chain(self.ranks.values().flat_map(|r| r.values.values())));
        if maps > MAX_VALUE_MAPS {
            return Err(Error::corrupt(format!(
                "{maps} maps among the plain values of all ranks, more than {MAX_VALUE_MAPS} file=`{file}`"
            )));
        }
        let mut values = self.values.iter().chain(self.ranks.values().flat_map(|r| r.values.iter()));
        if let Some(key) = values.find_map(|(key, value)| value.non_canonical_big_int().map(|_| key)) {
            return Err(Error::corrupt(format!(
                "a big integer that is not a canonical decimal outside 64 bits key=`{}` file=`{file}`",
                crate::error::escape_control(key)
            )));
        }
        let (tensor_count, tensor_bytes) = key_totals(self.tensors.keys());
        for (rank, record) in &self.ranks {
            let canonical =
                rank.parse::<u32>().is_ok_and(|r| r > 0 && r < self.writer.world_size && r.to_string() == *rank);
            if !canonical {
                return Err(Error::corrupt(format!(
                    "a rank record for rank `{}` of a save by {} ranks file=`{file}`",
                    crate::error::escape_control(rank),
                    self.writer.world_size
                )));
            }
            if let Some(structure) = &record.structure {
                let (count, bytes) = key_totals(record.values.keys());
                structure_fits(structure, tensor_count + count, tensor_bytes.saturating_add(bytes))
                    .map_err(|msg| Error::corrupt(format!("{msg} rank={rank} file=`{file}`")))?;
            }
            if let Some(key) = record.values.keys().find(|k| self.tensors.contains_key(*k)) {
                return Err(Error::corrupt(format!(
                    "rank {rank} holds a value under a tensor's key key=`{}` file=`{file}`",
                    crate::error::escape_control(key)
                )));
            }
            for (key, tensor) in &record.tensors {
                if !self.tensors.contains_key(key) {
                    return Err(Error::corrupt(format!(
                        "rank {rank} holds its own tensor under a key no shared tensor has key=`{}` file=`{file}`",
                        crate::error::escape_control(key)
                    )));
                }
                validate_tensor(key, tensor, &self.files, false)
                    .map_err(|msg| Error::corrupt(format!("{msg} tensor=`{key}` rank={rank} file=`{file}`")))?;
            }
        }
        for (name, record) in &self.files {
            match layout::parse_data_file(name) {
                Some(DataFile::Own(_)) => {}
                Some(DataFile::Sibling { step, .. }) if step == self.step => {
                    return Err(Error::corrupt(format!(
                        "manifest refers to its own folder as another checkpoint's (a cycle) data_file=`{}` file=`{file}`",
                        crate::error::escape_control(name)
                    )));
                }
                Some(DataFile::Sibling { .. }) if self.format_version >= FORMAT_VERSION => {}
                Some(DataFile::Sibling { .. }) => {
                    return Err(Error::corrupt(format!(
                        "a version {} manifest names another checkpoint's file data_file=`{}` file=`{file}`",
                        self.format_version,
                        crate::error::escape_control(name)
                    )));
                }
                None => {
                    return Err(Error::corrupt(format!(
                        "manifest names a file outside the run's shards folders data_file=`{}` file=`{file}`",
                        crate::error::escape_control(name)
                    )));
                }
            }
            if record.header_len < 8 || record.header_len > record.size {
                return Err(Error::corrupt(format!(
                    "header length {} does not fit file size {} data_file=`{name}` file=`{file}`",
                    record.header_len, record.size
                )));
            }
        }
        if let Some(rank) = self.part.filter(|&r| r >= self.writer.world_size) {
            return Err(Error::corrupt(format!(
                "the part of rank {rank} of a save by {} ranks file=`{file}`",
                self.writer.world_size
            )));
        }
        let partial = self.part.is_some();
        for (key, record) in &self.tensors {
            validate_tensor(key, record, &self.files, partial)
                .map_err(|msg| Error::corrupt(format!("{msg} tensor=`{key}` file=`{file}`")))?;
            if self.values.contains_key(key) {
                return Err(Error::corrupt(format!("key is both a tensor and a value key=`{key}` file=`{file}`")));
            }
        }
        Ok(())
    }
}

/// Checks one tensor record: every piece inside the global shape and its file, no two
/// overlapping, and (unless `partial`, a rank's part) every element covered.
fn validate_tensor(
    key: &str,
    record: &TensorRecord,
    files: &BTreeMap<String, FileRecord>,
    partial: bool,
) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty tensor key".into());
    }
    let rank = record.shape.len();
    if rank > MAX_RANK {
        return Err(format!("rank {rank} exceeds {MAX_RANK}"));
    }
    let total = checked_numel(&record.shape).ok_or("shape overflows")?;
    if record.pieces.is_empty() {
        return Err("tensor has no pieces".into());
    }
    let mut covered: u64 = 0;
    for piece in &record.pieces {
        let Some(file) = files.get(&piece.file) else {
            return Err(format!("piece references unknown data file data_file=`{}`", piece.file));
        };
        if piece.offsets.len() != rank || piece.shape.len() != rank {
            return Err(format!("piece rank does not match tensor rank data_file=`{}`", piece.file));
        }
        for ((&off, &len), &dim) in piece.offsets.iter().zip(&piece.shape).zip(&record.shape) {
            if off.checked_add(len).is_none_or(|end| end > dim) {
                return Err(format!(
                    "piece offsets {:?} shape {:?} fall outside global shape {:?}",
                    piece.offsets, piece.shape, record.shape
                ));
            }
        }
        let [start, end] = piece.range;
        let nbytes = checked_nbytes(record.dtype, &piece.shape).ok_or("piece shape overflows")?;
        if end.checked_sub(start) != Some(nbytes) {
            return Err(format!(
                "piece byte range {start}..{end} does not hold {nbytes} bytes data_file=`{}`",
                piece.file
            ));
        }
        if start < file.header_len || end > file.size {
            return Err(format!(
                "piece byte range {start}..{end} lies outside the data of a {}-byte file data_file=`{}`",
                file.size, piece.file
            ));
        }
        covered = covered.saturating_add(checked_numel(&piece.shape).unwrap_or(u64::MAX));
    }
    if covered < total && !partial {
        return Err(format!("pieces cover {covered} of {total} elements"));
    }
    let boxes: Vec<(&[u64], &[u64])> = record.pieces.iter().map(|p| (&p.offsets[..], &p.shape[..])).collect();
    let budget = MAX_OVERLAP_COMPARISONS_PER_PIECE.saturating_mul(boxes.len() as u64);
    match geometry::any_overlap(&boxes, budget) {
        Ok(false) => Ok(()),
        Ok(true) => Err("overlapping pieces".into()),
        Err(()) => Err(format!("{} pieces too entangled to check for overlaps", boxes.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let file = layout::shard_file(0, 0, 1, "a1");
        let mut files = BTreeMap::new();
        files.insert(file.clone(), FileRecord { size: 8 + 64 + 16, header_len: 72, header_crc32c: 0 });
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "w".to_string(),
            TensorRecord {
                dtype: DType::F32,
                shape: vec![2, 2],
                pieces: vec![PieceRecord {
                    file,
                    range: [72, 88],
                    offsets: vec![0, 0],
                    shape: vec![2, 2],
                    crc32c: 0,
                    xxh3: None,
                    sample: None,
                }],
            },
        );
        Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION_STANDALONE,
            step: 5,
            created_unix_ms: 1,
            temporary: false,
            save_id: "s".into(),
            writer: Writer { library: "cairn".into(), version: "0".into(), world_size: 1 },
            metrics: BTreeMap::new(),
            metadata: serde_json::Value::Null,
            values: BTreeMap::new(),
            structure: None,
            tensors,
            files,
            ranks: BTreeMap::new(),
            timings: None,
            part: None,
        }
    }

    fn decode_err(m: &Manifest) -> Error {
        Manifest::decode(&m.encode().unwrap(), "m.json").unwrap_err()
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode().unwrap(), "m.json").unwrap(), m);
    }

    #[test]
    fn only_a_ranks_part_may_leave_holes_and_its_rank_is_one_of_the_job() {
        // The tensor's one piece covers its first row only.
        let mut holed = sample();
        holed.writer.world_size = 2;
        let w = holed.tensors.get_mut("w").unwrap();
        w.shape = vec![4, 2];
        assert!(decode_err(&holed).to_string().contains("pieces cover 4 of 8 elements"));
        let mut part = holed.clone();
        part.part = Some(1);
        assert_eq!(Manifest::decode(&part.encode().unwrap(), "m.json").unwrap(), part);
        part.part = Some(2);
        let err = decode_err(&part);
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.to_string().contains("the part of rank 2 of a save by 2 ranks"), "{err}");
        // Overlaps stay refused in a part.
        let mut overlapping = holed.clone();
        overlapping.part = Some(0);
        let again = overlapping.tensors["w"].pieces[0].clone();
        overlapping.tensors.get_mut("w").unwrap().pieces.push(again);
        assert!(decode_err(&overlapping).to_string().contains("overlapping pieces"));
    }

    #[test]
    fn rank_records_round_trip_and_bad_ones_are_corrupt() {
        let mut m = sample();
        m.writer.world_size = 4;
        let record = RankRecord {
            values: BTreeMap::from([("pos".into(), Value::Int(3))]),
            structure: None,
            tensors: BTreeMap::new(),
        };
        m.ranks.insert("2".into(), record.clone());
        assert_eq!(Manifest::decode(&m.encode().unwrap(), "m.json").unwrap(), m);
        assert_eq!(m.held_by(Some(2)).0["pos"], Value::Int(3));
        assert!(m.held_by(Some(1)).0.is_empty() && m.held_by(None).0.is_empty());
        for rank in ["0", "4", "02", "x", "-1", "+1"] {
            let mut bad = m.clone();
            bad.ranks = BTreeMap::from([(rank.to_string(), record.clone())]);
            let err = decode_err(&bad);
            assert_eq!(err.kind(), crate::ErrorKind::Corrupt, "rank {rank}: {err}");
        }
        let mut bad = m.clone();
        bad.ranks.get_mut("2").unwrap().values.insert("w".into(), Value::Null);
        assert!(decode_err(&bad).to_string().contains("tensor's key key=`w`"));
        // The bound on maps holds for every rank's values together, as the writer checks.
        let mut many = m.clone();
        let maps = Value::List(vec![Value::Map(BTreeMap::new()); MAX_VALUE_MAPS / 2 + 1]);
        many.values.insert("a".into(), maps.clone());
        many.ranks.get_mut("2").unwrap().values.insert("a".into(), maps);
        assert!(many.validate("m.json").unwrap_err().to_string().contains("maps among the plain values"));
    }

    #[test]
    fn a_ranks_own_tensors_are_read_for_it_and_bad_ones_are_corrupt() {
        let mut m = sample();
        m.writer.world_size = 3;
        let mut own = m.tensors["w"].clone();
        own.pieces[0].crc32c = 7;
        m.ranks.insert(
            "1".into(),
            RankRecord {
                values: BTreeMap::new(),
                structure: None,
                tensors: BTreeMap::from([("w".into(), own.clone())]),
            },
        );
        let read = Manifest::decode(&m.encode().unwrap(), "m.json").unwrap();
        assert_eq!(read.tensor_for("w", Some(1)), Some(&own));
        assert_eq!(read.tensor_for("w", Some(2)), Some(&m.tensors["w"]));
        assert_eq!(read.tensor_for("w", None), Some(&m.tensors["w"]));
        assert_eq!(read.all_tensors().count(), 2);
        // A rank's own tensor under a key no shared tensor has, or naming a file outside
        // the checkpoint, or out of its shape: corrupt, naming the rank.
        let mut stray = m.clone();
        let w = stray.ranks.get_mut("1").unwrap().tensors.remove("w").unwrap();
        stray.ranks.get_mut("1").unwrap().tensors.insert("x".into(), w);
        assert!(decode_err(&stray).to_string().contains("under a key no shared tensor has key=`x`"));
        let mut outside = m.clone();
        outside.ranks.get_mut("1").unwrap().tensors.get_mut("w").unwrap().pieces[0].file = "../../etc/passwd".into();
        let err = decode_err(&outside);
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.to_string().contains("rank=1"), "{err}");
        let mut shifted = m.clone();
        shifted.ranks.get_mut("1").unwrap().tensors.get_mut("w").unwrap().pieces[0].offsets = vec![1, 0];
        assert!(decode_err(&shifted).to_string().contains("rank=1"));
    }

    #[test]
    fn unknown_format_version_is_incompatible() {
        let mut m = sample();
        m.format_version = 3;
        let err = decode_err(&m);
        assert_eq!(err.kind(), crate::ErrorKind::Incompatible);
        assert!(err.to_string().contains("format version 3"), "{err}");
    }

    /// `sample` with its data file moved to the folder of step `step` of the run.
    fn referencing(step: u64) -> Manifest {
        let mut m = sample();
        let (own, record) = m.files.pop_first().unwrap();
        let sibling = layout::sibling_file(step, &own);
        m.files.insert(sibling.clone(), record);
        m.tensors.get_mut("w").unwrap().pieces[0].file = sibling;
        m.format_version = m.required_version();
        m
    }

    #[test]
    fn references_need_version_2_and_never_point_at_their_own_folder() {
        let m = referencing(3);
        assert_eq!(m.format_version, FORMAT_VERSION);
        assert!(m.has_references());
        assert_eq!(m.own_file_bytes(), 0);
        assert_eq!(Manifest::decode(&m.encode().unwrap(), "m.json").unwrap(), m);
        assert_eq!(sample().required_version(), FORMAT_VERSION_STANDALONE);

        let mut old = referencing(3);
        old.format_version = FORMAT_VERSION_STANDALONE;
        let err = decode_err(&old);
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.to_string().contains("version 1 manifest names another checkpoint's file"), "{err}");

        let err = decode_err(&referencing(5));
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.to_string().contains("its own folder") && err.to_string().contains("step-000000000005"), "{err}");
    }

    #[test]
    fn content_hashes_are_32_lowercase_hex_digits() {
        let mut m = sample();
        m.tensors.get_mut("w").unwrap().pieces[0].xxh3 = Some(0xabc);
        m.tensors.get_mut("w").unwrap().pieces[0].sample = Some(0xdef);
        let text = String::from_utf8(m.encode().unwrap()).unwrap();
        assert!(text.contains("\"sample\":\"0000000000000def\""), "{text}");
        let short = text.replace("\"0000000000000def\"", "\"def\"");
        assert_eq!(decode_text_err(&short).kind(), crate::ErrorKind::Corrupt);
        assert!(text.contains("\"xxh3\":\"00000000000000000000000000000abc\""), "{text}");
        assert_eq!(Manifest::decode(text.as_bytes(), "m.json").unwrap(), m);
        for bad in ["ABC", "00000000000000000000000000000ABC", "+0000000000000000000000000000abc", ""] {
            let err = decode_text_err(&text.replace("00000000000000000000000000000abc", bad));
            assert_eq!(err.kind(), crate::ErrorKind::Corrupt, "{bad}");
        }
    }

    #[test]
    fn file_reference_outside_the_checkpoint_is_corrupt() {
        let mut m = sample();
        let rec = m.files.pop_first().unwrap().1;
        m.files.insert("../../etc/passwd".into(), rec);
        m.tensors.get_mut("w").unwrap().pieces[0].file = "../../etc/passwd".into();
        let err = decode_err(&m);
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.to_string().contains("../../etc/passwd"), "{err}");
    }

    #[test]
    fn range_that_lies_about_size_is_corrupt() {
        let mut m = sample();
        m.tensors.get_mut("w").unwrap().pieces[0].range = [72, 1 << 40];
        let err = decode_err(&m);
        assert!(err.to_string().contains("tensor=`w`"), "{err}");
    }

    #[test]
    fn piece_outside_global_shape_is_corrupt() {
        let mut m = sample();
        m.tensors.get_mut("w").unwrap().pieces[0].offsets = vec![1, 0];
        assert!(decode_err(&m).to_string().contains("outside global shape"));
    }

    #[test]
    fn huge_claimed_shape_is_corrupt_not_allocated() {
        let mut m = sample();
        let t = m.tensors.get_mut("w").unwrap();
        t.shape = vec![u64::MAX, u64::MAX];
        t.pieces[0].shape = vec![u64::MAX, 2];
        assert_eq!(decode_err(&m).kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn duplicate_tensor_names_are_corrupt() {
        let json = String::from_utf8(sample().encode().unwrap()).unwrap();
        let tensor = json.split("\"tensors\":{").nth(1).unwrap().split("},\"files\"").next().unwrap();
        let doubled = json.replace(tensor, &format!("{tensor},{tensor}"));
        let err = Manifest::decode(doubled.as_bytes(), "m.json").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.full_message().contains("duplicate key `w`"), "{}", err.full_message());
    }

    #[test]
    fn deeply_nested_values_are_corrupt_not_a_stack_overflow() {
        let json = String::from_utf8(sample().encode().unwrap()).unwrap();
        let deep = format!("{}\"null\"{}", "{\"list\":[".repeat(100_000), "]}".repeat(100_000));
        let hostile = json.replace("\"values\":{}", &format!("\"values\":{{\"v\":{deep}}}"));
        assert_ne!(hostile, json);
        assert_eq!(Manifest::decode(hostile.as_bytes(), "m.json").unwrap_err().kind(), crate::ErrorKind::Corrupt);
    }

    fn decode_text_err(json: &str) -> Error {
        Manifest::decode(json.as_bytes(), "m.json").unwrap_err()
    }

    #[test]
    fn metadata_past_its_limit_is_refused_before_it_is_parsed() {
        let json = String::from_utf8(sample().encode().unwrap()).unwrap();
        let bomb = format!("[{}{{}}]", "{},".repeat(MAX_METADATA_BYTES / 3));
        let err = decode_text_err(&json.replace("\"metadata\":null", &format!("\"metadata\":{bomb}")));
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.full_message().contains("metadata larger than"), "{}", err.full_message());
    }

    #[test]
    fn duplicate_metric_names_are_corrupt() {
        let json = String::from_utf8(sample().encode().unwrap()).unwrap();
        let doubled = json.replace("\"metrics\":{}", "\"metrics\":{\"loss\":{\"float\":1.0},\"loss\":{\"float\":2.0}}");
        assert_ne!(doubled, json);
        assert!(decode_text_err(&doubled).full_message().contains("duplicate key `loss`"));
    }

    #[test]
    fn values_holding_too_many_maps_are_refused() {
        let json = String::from_utf8(sample().encode().unwrap()).unwrap();
        let with_maps = |n: usize, tag: &str| {
            // Maps however their tag is spelled, and strings that merely say "map".
            let maps = format!("{{\"{tag}\":{{}}}},{{\"str\":\"map\"}},").repeat(n);
            json.replace("\"values\":{}", &format!("\"values\":{{\"v\":{{\"list\":[{maps}{{\"null\":null}}]}}}}"))
        };
        assert!(Manifest::decode(with_maps(MAX_VALUE_MAPS, "map").as_bytes(), "m.json").is_ok());
        for tag in ["map", "\\u006dap"] {
            let err = decode_text_err(&with_maps(MAX_VALUE_MAPS + 1, tag));
            assert!(err.full_message().contains("too many maps"), "{}", err.full_message());
        }
    }

    #[test]
    fn a_structure_out_of_proportion_to_the_keys_is_corrupt() {
        let mut m = sample();
        m.structure = Some(format!("[{}0]", "0,".repeat(STRUCTURE_SLACK_BYTES)));
        assert!(decode_err(&m).to_string().contains("structure of"));
        m.structure = Some(r#"{"dict":[["w",{"tensor":"w"}]]}"#.into());
        assert_eq!(Manifest::decode(&m.encode().unwrap(), "m.json").unwrap(), m);
    }

    #[test]
    fn a_format_version_written_as_text_is_named_not_reported_missing() {
        let json = String::from_utf8(sample().encode().unwrap()).unwrap();
        let text = json.replace("\"format_version\":1", "\"format_version\":\"1\"");
        assert!(decode_text_err(&text).to_string().contains("must be an integer, not \"1\""));
    }

    #[test]
    fn garbage_is_corrupt() {
        for bytes in [&b""[..], b"{", b"[]", b"{\"format\":\"cairn\"}", b"\xff\xfe"] {
            let err = Manifest::decode(bytes, "m.json").unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Corrupt, "{:?}", bytes);
            assert!(err.to_string().contains("m.json"));
        }
    }
}
