//! The training state: a flat, ordered map from dotted keys to tensors and plain values.
//!
//! Keys are data, never paths. Tensor bytes are held as [`Bytes`], so a state can point at
//! caller-owned memory (no copy before a synchronous save) or at a read buffer (no copy
//! after a load). Frontends that nest containers (Python dicts, lists, tuples) flatten them
//! into keys and keep their own description of the nesting in [`State::structure`].

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fp8::Fp8;

/// Element type of a tensor. Serialized with the safetensors names (`F32`, `BF16`,
/// `F8_E4M3`, `BOOL`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[allow(non_camel_case_types)]
pub enum DType {
    /// IEEE 754 binary64.
    F64,
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16.
    BF16,
    /// FP8 with 4 exponent and 3 mantissa bits (`float8_e4m3fn`).
    F8_E4M3,
    /// FP8 with 5 exponent and 2 mantissa bits.
    F8_E5M2,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 64-bit integer.
    U64,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 8-bit integer.
    U8,
    /// Boolean, one byte per element (0 or 1).
    BOOL,
    /// Complex with binary32 real and imaginary parts (real first), 8 bytes per element.
    C64,
}

impl DType {
    /// Every supported dtype.
    pub const ALL: [DType; 16] = [
        DType::F64,
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F8_E4M3,
        DType::F8_E5M2,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U64,
        DType::U32,
        DType::U16,
        DType::U8,
        DType::BOOL,
        DType::C64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 | DType::C64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F8_E4M3 | DType::F8_E5M2 | DType::I8 | DType::U8 | DType::BOOL => 1,
        }
    }

    /// The safetensors name (`"F32"`, `"F8_E4M3"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8_E4M3 => "F8_E4M3",
            DType::F8_E5M2 => "F8_E5M2",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U64 => "U64",
            DType::U32 => "U32",
            DType::U16 => "U16",
            DType::U8 => "U8",
            DType::BOOL => "BOOL",
            DType::C64 => "C64",
        }
    }

    /// Parses a safetensors name; case-insensitive.
    pub fn from_name(name: &str) -> Result<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| Error::invalid(format!("unknown dtype dtype=`{name}`")))
    }

    /// The dtype of a safetensors file, if Cairn supports it.
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.to_safetensors() == dtype)
    }

    /// The same dtype in the safetensors crate's enum.
    pub fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::F64 => S::F64,
            DType::F32 => S::F32,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::F8_E4M3 => S::F8_E4M3,
            DType::F8_E5M2 => S::F8_E5M2,
            DType::I64 => S::I64,
            DType::I32 => S::I32,
            DType::I16 => S::I16,
            DType::I8 => S::I8,
            DType::U64 => S::U64,
            DType::U32 => S::U32,
            DType::U16 => S::U16,
            DType::U8 => S::U8,
            DType::BOOL => S::BOOL,
            DType::C64 => S::C64,
        }
    }
}

/// Number of elements of `shape`, or `None` on overflow.
pub fn checked_numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Byte length of a tensor of `dtype` and `shape`, or `None` on overflow.
pub fn checked_nbytes(dtype: DType, shape: &[u64]) -> Option<u64> {
    checked_numel(shape)?.checked_mul(dtype.size() as u64)
}

/// A dense, row-major (C-order) tensor: dtype, shape and its bytes in native little-endian.
///
/// ```
/// use cairn::{DType, Tensor};
/// let t = Tensor::new(DType::F32, vec![2], 1.5f32.to_le_bytes().repeat(2)).unwrap();
/// assert_eq!(t.data().len(), 8);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<u64>,
    data: Bytes,
}

impl Tensor {
    /// A tensor over `data`, which must be exactly `numel(shape) * dtype.size()` bytes.
    /// Passing [`Bytes`] that wrap caller memory (`Bytes::from_owner`) avoids any copy.
    pub fn new(dtype: DType, shape: Vec<u64>, data: impl Into<Bytes>) -> Result<Tensor> {
        let data = data.into();
        let expected = checked_nbytes(dtype, &shape)
            .ok_or_else(|| Error::invalid(format!("tensor shape overflows shape={shape:?}")))?;
        if data.len() as u64 != expected {
            return Err(Error::invalid(format!(
                "tensor data has {} bytes, dtype={} shape={shape:?} needs {expected}",
                data.len(),
                dtype.name()
            )));
        }
        Ok(Tensor { dtype, shape, data })
    }

    /// Copies a strided (possibly non-contiguous) source into a dense tensor.
    ///
    /// `strides` are in bytes, one per dimension, and may be negative; element
    /// `(i0, i1, ...)` is read at `offset + sum(i_k * strides[k])` in `base`. Every element
    /// read is bounds-checked against `base` before anything is copied.
    pub fn from_strided(dtype: DType, shape: Vec<u64>, strides: &[i64], base: &[u8], offset: usize) -> Result<Tensor> {
        if strides.len() != shape.len() {
            return Err(Error::invalid(format!("strides {strides:?} do not match shape {shape:?}")));
        }
        let nbytes = checked_nbytes(dtype, &shape)
            .ok_or_else(|| Error::invalid(format!("tensor shape overflows shape={shape:?}")))?;
        let elem = dtype.size() as i128;
        if nbytes > 0 {
            // The lowest and highest byte touched must lie inside `base`.
            let (mut lo, mut hi) = (offset as i128, offset as i128 + elem);
            for (&dim, &stride) in shape.iter().zip(strides) {
                let reach = (dim as i128 - 1) * stride as i128;
                if reach < 0 {
                    lo += reach;
                } else {
                    hi += reach;
                }
            }
            if lo < 0 || hi > base.len() as i128 {
                return Err(Error::invalid(format!(
                    "strided view reaches outside its buffer shape={shape:?} strides={strides:?}"
                )));
            }
        }
        let mut out = Vec::with_capacity(nbytes as usize);
        copy_strided(&mut out, base, offset as i64, &shape, strides, dtype.size());
        Tensor::new(dtype, shape, out)
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Global shape; empty for a 0-d (scalar) tensor.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// The dense row-major bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Splits into its parts.
    pub fn into_parts(self) -> (DType, Vec<u64>, Bytes) {
        (self.dtype, self.shape, self.data)
    }

    /// The elements as `f64`, for floating-point dtypes (F64, F32, F16, BF16, F8_E4M3,
    /// F8_E5M2); `None` for others. Used to compare tensors numerically.
    pub fn to_f64s(&self) -> Option<Vec<f64>> {
        let data = self.data.as_ref();
        Some(match self.dtype {
            DType::F64 => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default())).collect(),
            DType::F32 => {
                data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()) as f64).collect()
            }
            DType::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
            DType::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
            DType::F8_E4M3 => data.iter().map(|&b| Fp8::E4M3.decode(b)).collect(),
            DType::F8_E5M2 => data.iter().map(|&b| Fp8::E5M2.decode(b)).collect(),
            _ => return None,
        })
    }

    /// This tensor converted to the floating-point dtype `to` (F64, F32, F16, BF16,
    /// F8_E4M3 or F8_E5M2), rounding to nearest even (past E4M3's range: NaN, as
    /// `ml_dtypes` and torch); the same tensor when `to` is its dtype.
    pub fn cast(&self, to: DType) -> Result<Tensor> {
        if to == self.dtype {
            return Ok(self.clone());
        }
        let unsupported = || {
            Error::invalid(format!(
                "cannot cast {} to {}: only F64, F32, F16, BF16, F8_E4M3 and F8_E5M2 convert",
                self.dtype.name(),
                to.name()
            ))
        };
        let values = self.to_f64s().ok_or_else(unsupported)?;
        let bytes: Vec<u8> = match to {
            DType::F64 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F32 => values.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect(),
            DType::F16 => values.iter().flat_map(|v| half::f16::from_f64(*v).to_le_bytes()).collect(),
            DType::BF16 => values.iter().flat_map(|v| half::bf16::from_f64(*v).to_le_bytes()).collect(),
            DType::F8_E4M3 => values.iter().map(|v| Fp8::E4M3.encode(*v)).collect(),
            DType::F8_E5M2 => values.iter().map(|v| Fp8::E5M2.encode(*v)).collect(),
            _ => return Err(unsupported()),
        };
        Tensor::new(to, self.shape.clone(), bytes)
    }
}

fn copy_strided(out: &mut Vec<u8>, base: &[u8], offset: i64, shape: &[u64], strides: &[i64], elem: usize) {
    match shape.split_first() {
        None => {
            let start = offset as usize;
            out.extend_from_slice(&base[start..start + elem]);
        }
        Some((&dim, rest)) => {
            let stride = strides[0];
            let inner_dense = rest.is_empty() && stride == elem as i64;
            if inner_dense {
                let start = offset as usize;
                out.extend_from_slice(&base[start..start + dim as usize * elem]);
                return;
            }
            for i in 0..dim as i64 {
                copy_strided(out, base, offset + i * stride, rest, &strides[1..], elem);
            }
        }
    }
}

/// A plain (non-tensor) value: what a training loop keeps beside its tensors (step, RNG
/// state, config, metrics). Floats keep NaN payloads and signed zeros bit-exact.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    /// Absent value (`None`).
    Null,
    /// Boolean.
    Bool(bool),
    /// Signed 64-bit integer.
    Int(i64),
    /// An integer outside the 64-bit range (Python's ints are unbounded: numpy's PCG64
    /// RNG state holds 128-bit ones), in canonical decimal: an optional `-`, then at most
    /// [`MAX_BIG_INT_DIGITS`] digits without leading zeros. Use [`Value::int`] to make one.
    #[serde(deserialize_with = "big_int::deserialize")]
    BigInt(String),
    /// 64-bit float; non-finite values are stored by their bit pattern.
    #[serde(with = "float_bits")]
    Float(f64),
    /// UTF-8 text.
    Str(String),
    /// Raw bytes (e.g. an RNG state), base64 in the manifest.
    #[serde(with = "base64_bytes")]
    Bytes(Vec<u8>),
    /// Ordered list.
    List(Vec<Value>),
    /// Map with string keys, kept in key order.
    #[serde(deserialize_with = "map_budget::deserialize")]
    Map(BTreeMap<String, Value>),
}

/// While a budget is set on a thread, every [`Value::Map`] deserialized there spends one
/// unit of it, before the map is built: a hostile manifest cannot turn a few bytes each
/// into many small maps (~600 bytes apiece).
pub(crate) mod map_budget {
    use std::cell::Cell;
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::Value;

    thread_local! {
        static LEFT: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// Runs `f` with at most `maps` maps deserialized on this thread.
    pub(crate) fn with<T>(maps: usize, f: impl FnOnce() -> T) -> T {
        let previous = LEFT.replace(Some(maps));
        let out = f();
        LEFT.set(previous);
        out
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Value>, D::Error> {
        if let Some(left) = LEFT.get() {
            let left = left.checked_sub(1).ok_or_else(|| serde::de::Error::custom("too many maps among the values"))?;
            LEFT.set(Some(left));
        }
        BTreeMap::deserialize(deserializer)
    }
}

impl PartialEq for Value {
    /// Bit-exact equality: `NaN == NaN` when the payloads match, `0.0 != -0.0`.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::BigInt(a), Value::BigInt(b)) => a == b,
            (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Bytes(a), Value::Bytes(b)) => a == b,
            (Value::List(a), Value::List(b)) => a == b,
            (Value::Map(a), Value::Map(b)) => a == b,
            _ => false,
        }
    }
}

/// The most digits of a [`Value::BigInt`] (Python's default limit on converting ints to
/// and from text).
pub const MAX_BIG_INT_DIGITS: usize = 4300;

impl Value {
    /// The integer written in decimal by `text` (an optional `-`, then digits): an
    /// [`Value::Int`] when it fits in 64 bits, else a [`Value::BigInt`]. `None` when
    /// `text` is not such a decimal or has more than [`MAX_BIG_INT_DIGITS`] digits.
    pub fn int(text: &str) -> Option<Value> {
        if let Ok(small) = text.parse::<i64>() {
            return Some(Value::Int(small));
        }
        big_int::canonical(text).then(|| Value::BigInt(text.to_string()))
    }
}

impl Value {
    /// The first [`Value::BigInt`] in this value (nested ones included) that
    /// [`Value::int`] would not have made: such a value is refused on saving and corrupt
    /// on reading.
    pub fn non_canonical_big_int(&self) -> Option<&str> {
        match self {
            Value::BigInt(text) if !big_int::canonical(text) => Some(text),
            Value::List(items) => items.iter().find_map(Value::non_canonical_big_int),
            Value::Map(map) => map.values().find_map(Value::non_canonical_big_int),
            _ => None,
        }
    }
}

/// Big integers: refused on reading unless in the canonical form [`Value::int`] makes.
mod big_int {
    use serde::{Deserialize, Deserializer};

    /// Whether `text` is a canonical decimal of at most `MAX_BIG_INT_DIGITS` digits that
    /// does not fit in 64 bits.
    pub fn canonical(text: &str) -> bool {
        let digits = text.strip_prefix('-').unwrap_or(text);
        !digits.is_empty()
            && digits.len() <= super::MAX_BIG_INT_DIGITS
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0')
            && text.parse::<i64>().is_err()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let text = String::deserialize(d)?;
        if !canonical(&text) {
            let shown: String = text.chars().take(40).collect();
            return Err(serde::de::Error::custom(format!(
                "not a canonical big integer (decimal, outside 64 bits, at most {} digits): `{shown}`",
                super::MAX_BIG_INT_DIGITS
            )));
        }
        Ok(text)
    }
}

/// Floats as JSON numbers when finite, else as `{"bits": u64}`.
mod float_bits {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f64),
        Bits { bits: u64 },
    }

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() { Repr::Number(*v) } else { Repr::Bits { bits: v.to_bits() } }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(match Repr::deserialize(d)? {
            Repr::Number(v) => v,
            Repr::Bits { bits } => f64::from_bits(bits),
        })
    }
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// One entry of a [`State`]: what one key holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A tensor, stored in a shard file.
    Tensor(Tensor),
    /// A plain value, stored in the manifest.
    Value(Value),
}

/// A box of a tensor held by one rank of a multi-rank save: its data, its offsets in the
/// global shape, and the global shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The rank's local data (its shape is the box's shape).
    pub tensor: Tensor,
    /// Offset of the box in the global tensor, one per dimension.
    pub offsets: Vec<u64>,
    /// Shape of the whole tensor.
    pub global_shape: Vec<u64>,
}

/// A training state: entries under dotted keys, in key order, plus an optional frontend
/// description of how the keys nest (opaque to the engine, stored in the manifest).
/// In a multi-rank save a state may also hold [`Piece`]s: this rank's boxes of sharded
/// tensors.
///
/// ```
/// use cairn::{DType, State, Tensor, Value};
/// let mut state = State::new();
/// state.insert_tensor("model.w", Tensor::new(DType::U8, vec![3], vec![1, 2, 3]).unwrap());
/// state.insert_value("step", Value::Int(7));
/// assert_eq!(state.len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    entries: BTreeMap<String, Entry>,
    pieces: BTreeMap<String, Vec<Piece>>,
    structure: Option<String>,
}

impl State {
    /// An empty state.
    pub fn new() -> State {
        State::default()
    }

    /// Inserts or replaces a tensor.
    pub fn insert_tensor(&mut self, key: impl Into<String>, tensor: Tensor) {
        self.entries.insert(key.into(), Entry::Tensor(tensor));
    }

    /// Inserts or replaces a plain value.
    pub fn insert_value(&mut self, key: impl Into<String>, value: Value) {
        self.entries.insert(key.into(), Entry::Value(value));
    }

    /// Inserts or replaces an entry.
    pub fn insert(&mut self, key: impl Into<String>, entry: Entry) {
        self.entries.insert(key.into(), entry);
    }

    /// Adds a piece this rank holds of the sharded tensor `key` (a rank may hold several
    /// pieces of one tensor).
    pub fn insert_piece(&mut self, key: impl Into<String>, piece: Piece) {
        self.pieces.entry(key.into()).or_default().push(piece);
    }

    /// This rank's pieces of sharded tensors, by key.
    pub fn pieces(&self) -> &BTreeMap<String, Vec<Piece>> {
        &self.pieces
    }

    /// The entry under `key`.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// The tensor under `key`, if that entry is a tensor.
    pub fn tensor(&self, key: &str) -> Option<&Tensor> {
        match self.entries.get(key) {
            Some(Entry::Tensor(t)) => Some(t),
            _ => None,
        }
    }

    /// The value under `key`, if that entry is a plain value.
    pub fn value(&self, key: &str) -> Option<&Value> {
        match self.entries.get(key) {
            Some(Entry::Value(v)) => Some(v),
            _ => None,
        }
    }

    /// Removes and returns the entry under `key`.
    pub fn remove(&mut self, key: &str) -> Option<Entry> {
        self.entries.remove(key)
    }

    /// Leaves in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter()
    }

    /// Consumes the state, yielding its entries in key order: a tensor's bytes come out
    /// with no other handle on them left in the state.
    pub fn into_entries(self) -> impl Iterator<Item = (String, Entry)> {
        self.entries.into_iter()
    }

    /// Tensors in key order.
    pub fn tensors(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.entries.iter().filter_map(|(k, e)| match e {
            Entry::Tensor(t) => Some((k, t)),
            Entry::Value(_) => None,
        })
    }

    /// Plain values in key order.
    pub fn values(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.entries.iter().filter_map(|(k, e)| match e {
            Entry::Value(v) => Some((k, v)),
            Entry::Tensor(_) => None,
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total tensor bytes (whole tensors and pieces).
    pub fn tensor_bytes(&self) -> u64 {
        let pieces: u64 = self.pieces.values().flatten().map(|s| s.tensor.data().len() as u64).sum();
        self.tensors().map(|(_, t)| t.data().len() as u64).sum::<u64>() + pieces
    }

    /// The frontend's nesting description, if any.
    pub fn structure(&self) -> Option<&str> {
        self.structure.as_deref()
    }

    /// Sets the frontend's nesting description.
    pub fn set_structure(&mut self, structure: Option<String>) {
        self.structure = structure;
    }

    /// A copy whose tensors own their bytes, detached from the memory behind this one: the
    /// snapshot an asynchronous save writes from. All bytes are copied at once into one
    /// arena, in parallel, so the caller waits about as long as a plain memory copy.
    pub fn to_owned_copy(&self) -> State {
        self.snapshot_in(&crate::snapshot::ArenaPool::default())
    }

    /// [`to_owned_copy`](Self::to_owned_copy) into an arena of `pool` (reused across saves).
    pub(crate) fn snapshot_in(&self, pool: &crate::snapshot::ArenaPool) -> State {
        let tensors = self
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::Tensor(t) => Some(t),
                Entry::Value(_) => None,
            })
            .chain(self.pieces.values().flatten().map(|s| &s.tensor));
        let sources: Vec<&[u8]> = tensors.map(|t| t.data.as_ref()).collect();
        let mut copies = pool.copy_all(&sources).into_iter();
        let mut owned =
            |t: &Tensor| Tensor { dtype: t.dtype, shape: t.shape.clone(), data: copies.next().unwrap_or_default() };
        let entries = self
            .entries
            .iter()
            .map(|(k, e)| {
                let e = match e {
                    Entry::Tensor(t) => Entry::Tensor(owned(t)),
                    Entry::Value(v) => Entry::Value(v.clone()),
                };
                (k.clone(), e)
            })
            .collect();
        let pieces = self
            .pieces
            .iter()
            .map(|(k, held)| {
                (k.clone(), held.iter().map(|s| Piece { tensor: owned(&s.tensor), ..s.clone() }).collect())
            })
            .collect();
        State { entries, pieces, structure: self.structure.clone() }
    }
}

impl FromIterator<(String, Entry)> for State {
    fn from_iter<I: IntoIterator<Item = (String, Entry)>>(iter: I) -> Self {
        State { entries: iter.into_iter().collect(), pieces: BTreeMap::new(), structure: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_wider_than_64_bits_are_kept_exactly_and_only_in_canonical_form() {
        let wide = (1u128 << 127).to_string();
        assert_eq!(Value::int("42"), Some(Value::Int(42)));
        assert_eq!(Value::int(&i64::MIN.to_string()), Some(Value::Int(i64::MIN)));
        assert_eq!(Value::int(&wide), Some(Value::BigInt(wide.clone())));
        let json = serde_json::to_string(&Value::int(&format!("-{wide}")).unwrap()).unwrap();
        assert_eq!(json, format!("{{\"big_int\":\"-{wide}\"}}"));
        assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), Value::BigInt(format!("-{wide}")));
        let too_long = "9".repeat(MAX_BIG_INT_DIGITS + 1);
        for bad in
            ["", "-", "0", "42", "-0", "007", "+123456789012345678901", "1e30", " 123456789012345678901", &too_long]
        {
            assert_eq!(Value::int(bad).filter(|v| matches!(v, Value::BigInt(_))), None, "{bad}");
            let json = serde_json::json!({ "big_int": bad }).to_string();
            assert!(serde_json::from_str::<Value>(&json).is_err(), "accepted big_int {bad:?}");
        }
    }

    #[test]
    fn a_non_canonical_big_integer_is_refused_on_saving() {
        let mut state = State::new();
        state.insert_value("rng", Value::List(vec![Value::BigInt("12".into())]));
        let err =
            crate::save("memory://state/big-int", &state, &crate::SaveOptions::default().with_step(1)).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Invalid);
        assert!(err.to_string().contains("big integer") && err.to_string().contains("key=`rng`"), "{err}");
        assert!(crate::Run::open("memory://state/big-int").unwrap().list().unwrap().is_empty());
    }

    #[test]
    fn complex64_is_a_safetensors_dtype_of_eight_bytes() {
        assert_eq!(DType::from_name("c64").unwrap(), DType::C64);
        assert_eq!(DType::C64.size(), 8);
        assert_eq!(DType::from_safetensors(safetensors::Dtype::C64), Some(DType::C64));
    }

    #[test]
    fn tensor_rejects_wrong_byte_count() {
        let err = Tensor::new(DType::F32, vec![2, 2], vec![0u8; 15]).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Invalid);
        assert!(err.to_string().contains("needs 16"), "{err}");
    }

    #[test]
    fn zero_d_and_empty_tensors_are_valid() {
        assert!(Tensor::new(DType::F64, vec![], vec![0u8; 8]).is_ok());
        assert!(Tensor::new(DType::F64, vec![3, 0], Vec::<u8>::new()).is_ok());
    }

    #[test]
    fn from_strided_copies_a_transposed_view() {
        // 2x3 u16 matrix stored row-major, read as its 3x2 transpose.
        let src: Vec<u8> = (0u16..6).flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::from_strided(DType::U16, vec![3, 2], &[2, 6], &src, 0).unwrap();
        let got: Vec<u16> = t.data().chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(got, vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn from_strided_handles_negative_strides() {
        let src = vec![1u8, 2, 3, 4];
        let t = Tensor::from_strided(DType::U8, vec![4], &[-1], &src, 3).unwrap();
        assert_eq!(t.data().as_ref(), &[4, 3, 2, 1]);
    }

    #[test]
    fn from_strided_rejects_views_outside_the_buffer() {
        let src = vec![0u8; 4];
        let err = Tensor::from_strided(DType::U8, vec![4], &[2], &src, 0).unwrap_err();
        assert!(err.to_string().contains("outside its buffer"), "{err}");
    }

    #[test]
    fn cast_converts_between_float_dtypes() {
        let t =
            Tensor::new(DType::F32, vec![2], [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
                .unwrap();
        let b = t.cast(DType::BF16).unwrap();
        assert_eq!(b.to_f64s().unwrap(), vec![1.5, -2.0]);
        assert!(Tensor::new(DType::I32, vec![1], vec![0u8; 4]).unwrap().cast(DType::F32).is_err());
    }

    #[test]
    fn value_equality_is_bit_exact() {
        assert_eq!(Value::Float(f64::NAN), Value::Float(f64::NAN));
        assert_ne!(Value::Float(0.0), Value::Float(-0.0));
    }

    #[test]
    fn non_finite_floats_survive_json() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 1e308, 5e-324] {
            let json = serde_json::to_string(&Value::Float(v)).unwrap();
            let back: Value = serde_json::from_str(&json).unwrap();
            assert_eq!(back, Value::Float(v), "{json}");
        }
    }
}
