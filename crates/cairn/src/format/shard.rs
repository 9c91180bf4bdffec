//! Shard files: plain safetensors files, so any safetensors reader can open them. This
//! module builds the header for a list of tensor pieces; the data that follows is the
//! pieces' bytes back to back, written straight from the caller's buffers (no copy).

use std::collections::HashMap;

use safetensors::tensor::{Metadata, TensorInfo};

use crate::error::{Error, Result};
use crate::state::DType;

/// Safetensors' reserved header key, which a tensor may not use as its name in a shard.
const RESERVED_NAME: &str = "__metadata__";
/// Alignment of a shard's data section: the header is padded so the data starts at a
/// multiple of it (64 bytes: what XLA needs to use host memory in place, and a cache line).
pub const DATA_ALIGN: usize = 64;

/// One piece to place in a shard.
#[derive(Debug, Clone)]
pub struct ShardEntry {
    /// Name of the piece inside the shard (see [`piece_name`]).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape of the piece.
    pub shape: Vec<u64>,
}

/// A built header: the bytes to write first, and each entry's absolute byte range.
#[derive(Debug, Clone)]
pub struct ShardHeader {
    /// 8-byte little-endian length, then the JSON header padded with spaces so the data
    /// starts at a multiple of [`DATA_ALIGN`] (a multiple of 8, as safetensors requires).
    pub bytes: Vec<u8>,
    /// Absolute `[start, end)` of each entry's data in the file, in entry order.
    pub ranges: Vec<[u64; 2]>,
    /// Total file size.
    pub file_size: u64,
}

/// The name a piece gets inside its shard: the tensor key when the piece is the whole
/// tensor, else `key@o0,o1,...` (its offsets). Safetensors' reserved `__metadata__` gets
/// an `@` suffix. Names are informational: the manifest, not the name, locates data.
pub fn piece_name(key: &str, offsets: &[u64], whole: bool) -> String {
    if whole {
        return if key == RESERVED_NAME { format!("{key}@") } else { key.to_string() };
    }
    let offsets: Vec<String> = offsets.iter().map(u64::to_string).collect();
    format!("{key}@{}", offsets.join(","))
}

/// Builds the safetensors header for `entries`, laid out in the given order.
/// `metadata` becomes the header's `__metadata__` map.
pub fn build_header(entries: &[ShardEntry], metadata: HashMap<String, String>) -> Result<ShardHeader> {
    let mut infos = Vec::with_capacity(entries.len());
    let mut offset: usize = 0;
    for entry in entries {
        let shape: Vec<usize> = entry
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| Error::invalid(format!("shape does not fit in memory tensor=`{}`", entry.name)))?;
        let nbytes = shape
            .iter()
            .try_fold(entry.dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::invalid(format!("tensor size overflows tensor=`{}`", entry.name)))?;
        let end = offset
            .checked_add(nbytes)
            .ok_or_else(|| Error::invalid(format!("shard size overflows tensor=`{}`", entry.name)))?;
        infos.push((
            entry.name.clone(),
            TensorInfo { dtype: entry.dtype.to_safetensors(), shape, data_offsets: (offset, end) },
        ));
        offset = end;
    }
    let header = Metadata::new(Some(metadata), infos)
        .map_err(|e| Error::invalid(format!("cannot build shard header: {e:?}")))?;
    let mut json =
        serde_json::to_vec(&header).map_err(|e| Error::invalid("cannot encode shard header").with_source(e))?;
    json.resize((8 + json.len()).next_multiple_of(DATA_ALIGN) - 8, b' ');
    let header_len = 8 + json.len() as u64;
    let mut bytes = Vec::with_capacity(header_len as usize);
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    let ranges = header_ranges(&header, entries, header_len);
    Ok(ShardHeader { bytes, ranges, file_size: header_len + offset as u64 })
}

fn header_ranges(header: &Metadata, entries: &[ShardEntry], header_len: u64) -> Vec<[u64; 2]> {
    entries
        .iter()
        .filter_map(|e| header.info(&e.name))
        .map(|info| [header_len + info.data_offsets.0 as u64, header_len + info.data_offsets.1 as u64])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_a_valid_safetensors_file() {
        let entries = vec![
            ShardEntry { name: "a".into(), dtype: DType::F64, shape: vec![2] },
            ShardEntry { name: "__metadata__@".into(), dtype: DType::U8, shape: vec![3] },
            ShardEntry { name: "empty".into(), dtype: DType::F32, shape: vec![0, 4] },
        ];
        let header = build_header(&entries, HashMap::new()).unwrap();
        let mut file = header.bytes.clone();
        file.resize(header.file_size as usize, 7);
        let parsed = safetensors::SafeTensors::deserialize(&file).unwrap();
        assert_eq!(parsed.tensor("a").unwrap().data().len(), 16);
        assert_eq!(parsed.tensor("__metadata__@").unwrap().shape(), &[3]);
        assert_eq!(header.ranges[0][0] % DATA_ALIGN as u64, 0);
        assert_eq!(header.ranges.len(), 3);
    }

    #[test]
    fn piece_names_never_collide_with_the_reserved_key() {
        assert_eq!(piece_name("__metadata__", &[], true), "__metadata__@");
        assert_eq!(piece_name("__metadata__", &[0, 0], true), "__metadata__@");
        assert_eq!(piece_name("w", &[2, 0], false), "w@2,0");
        assert_eq!(piece_name("w", &[0, 0], true), "w");
    }
}
