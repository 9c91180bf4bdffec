//! What a caller learns about a checkpoint without loading its tensors.

use std::collections::BTreeMap;

use crate::format::manifest::{Manifest, SaveTimings};
use crate::state::Value;

/// Summary of one committed checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// Training step.
    pub step: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Whether it is temporary (deleted once a newer checkpoint commits).
    pub temporary: bool,
    /// Metrics recorded with it.
    pub metrics: BTreeMap<String, Value>,
    /// User metadata recorded with it.
    pub metadata: serde_json::Value,
    /// Id of the save that committed it.
    pub save_id: String,
    /// Where it lives.
    pub uri: String,
    /// Number of tensors.
    pub num_tensors: usize,
    /// Total bytes of tensor data stored: the shared tensors and every rank's own (its
    /// logical size, whether the data is in its own folder or referred to).
    pub tensor_bytes: u64,
    /// Bytes of the data files in its own folder, headers included: what its save wrote.
    /// An incremental save that found tensors already stored wrote less than
    /// `tensor_bytes`; a full save writes slightly more (the shard headers).
    pub written_bytes: u64,
    /// How long its save took, as the save measured itself (absent for multi-rank saves
    /// and older writers).
    pub timings: Option<SaveTimings>,
}

impl CheckpointInfo {
    /// Summarizes `manifest`, found at `uri`.
    pub fn from_manifest(manifest: &Manifest, uri: &str) -> CheckpointInfo {
        // Each stored piece once (ranks holding the same own tensor share its piece).
        let pieces: std::collections::BTreeMap<(&str, u64), u64> = manifest
            .all_tensors()
            .flat_map(|(_, t)| &t.pieces)
            .map(|p| ((p.file.as_str(), p.range[0]), p.range[1].saturating_sub(p.range[0])))
            .collect();
        let tensor_bytes = pieces.values().fold(0u64, |a, &b| a.saturating_add(b));
        CheckpointInfo {
            step: manifest.step,
            created_unix_ms: manifest.created_unix_ms,
            temporary: manifest.temporary,
            metrics: manifest.metrics.clone(),
            metadata: manifest.metadata.clone(),
            save_id: manifest.save_id.clone(),
            uri: uri.to_string(),
            num_tensors: manifest.tensors.len(),
            tensor_bytes,
            written_bytes: manifest.own_file_bytes(),
            timings: manifest.timings,
        }
    }

    /// The metric `name` as a float, if recorded and numeric.
    pub fn metric(&self, name: &str) -> Option<f64> {
        match self.metrics.get(name)? {
            Value::Float(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
}
