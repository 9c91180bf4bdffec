//! `cairn inspect`: what a checkpoint holds, without reading its tensors.

use std::collections::BTreeMap;
use std::process::ExitCode;

use crate::output::{self, CliError};
use crate::CommandResult;

/// The shard files a tensor's pieces lie in: each name once, at most three, then a count.
fn shard_names(tensor: &cairn::format::manifest::TensorRecord) -> String {
    let mut names: Vec<&str> = tensor.pieces.iter().map(|p| p.file.rsplit('/').next().unwrap_or(&p.file)).collect();
    names.sort_unstable();
    names.dedup();
    match names.len() {
        0..=3 => names.join(","),
        n => format!("{},... ({n} files)", names[..2].join(",")),
    }
}

/// Bytes stored for a tensor's pieces.
fn stored_bytes(tensor: &cairn::format::manifest::TensorRecord) -> u64 {
    tensor.pieces.iter().map(|p| p.range[1] - p.range[0]).sum()
}

/// Tensors as a JSON object: key to dtype, shape, bytes and files.
fn tensors_json<'a>(
    tensors: impl Iterator<Item = (&'a String, &'a cairn::format::manifest::TensorRecord)>,
) -> serde_json::Map<String, serde_json::Value> {
    tensors
        .map(|(k, t)| {
            let files: Vec<&str> = t.pieces.iter().map(|p| p.file.as_str()).collect();
            let doc = serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "bytes": stored_bytes(t), "files": files});
            (k.clone(), doc)
        })
        .collect()
}

pub fn run(uri: &str, json: bool) -> CommandResult {
    let ckpt = cairn::open(uri)?;
    let manifest = ckpt.manifest();
    let info = ckpt.info();
    // Per top-level key: tensors (counted once) and bytes stored, each rank's own included.
    let mut totals: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for (key, t) in &manifest.tensors {
        let top = key.split('.').next().unwrap_or(key);
        let entry = totals.entry(top).or_default();
        entry.0 += 1;
        entry.1 += stored_bytes(t);
    }
    let own: Vec<(&String, &String, &cairn::format::manifest::TensorRecord)> =
        manifest.ranks.iter().flat_map(|(r, record)| record.tensors.iter().map(move |(k, t)| (r, k, t))).collect();
    // Each rank's own pieces, once each (ranks holding the same content share a piece).
    let mut counted = std::collections::BTreeSet::new();
    for (_, key, t) in &own {
        for p in t.pieces.iter().filter(|p| counted.insert((p.file.as_str(), p.range[0]))) {
            totals.entry(key.split('.').next().unwrap_or(key)).or_default().1 += p.range[1] - p.range[0];
        }
    }
    if json {
        let tensors = tensors_json(manifest.tensors.iter());
        // Each rank's own values and tensors (a multi-rank save's per-rank state).
        let ranks: serde_json::Map<String, serde_json::Value> = manifest
            .ranks
            .iter()
            .map(|(r, record)| {
                let doc = serde_json::json!({
                    "values": record.values.keys().collect::<Vec<_>>(),
                    "tensors": tensors_json(record.tensors.iter()),
                });
                (r.clone(), doc)
            })
            .collect();
        let totals: serde_json::Map<String, serde_json::Value> =
            totals.iter().map(|(k, (n, b))| (k.to_string(), serde_json::json!({"tensors": n, "bytes": b}))).collect();
        let doc = serde_json::json!({
            "uri": info.uri,
            "step": info.step,
            "created": output::time(info.created_unix_ms),
            "temporary": info.temporary,
            "metadata": info.metadata,
            "values": manifest.values.keys().collect::<Vec<_>>(),
            "written_bytes": info.written_bytes,
            "files": manifest.files.iter().map(|(f, r)| (f.clone(), r.size.into())).collect::<serde_json::Map<String, serde_json::Value>>(),
            "tensors": tensors,
            "ranks": ranks,
            "totals": totals,
        });
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| CliError::msg(e.to_string()))?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("checkpoint {}", output::clean(&info.uri));
    println!("step {}  created {}  temporary {}", info.step, output::time(info.created_unix_ms), info.temporary);
    println!(
        "{} tensors, {}, {} files, {} values",
        info.num_tensors,
        output::size(info.tensor_bytes),
        manifest.files.len(),
        manifest.values.len()
    );
    let referred = manifest
        .files
        .keys()
        .filter(|f| {
            matches!(cairn::format::layout::parse_data_file(f), Some(cairn::format::layout::DataFile::Sibling { .. }))
        })
        .count();
    println!(
        "stored: {} written by this save, {referred} files referred to in other checkpoints' folders",
        output::size(info.written_bytes)
    );
    if !info.metadata.is_null() {
        println!("metadata {}", output::clean(&info.metadata.to_string()));
    }
    if !info.metrics.is_empty() {
        println!("metrics {}", output::metrics(&info));
    }
    println!();
    let rows: Vec<Vec<String>> = manifest
        .tensors
        .iter()
        .map(|(k, t)| {
            vec![
                k.clone(),
                t.dtype.name().to_string(),
                format!("{:?}", t.shape),
                output::size(stored_bytes(t)),
                shard_names(t),
            ]
        })
        .collect();
    output::table(&["TENSOR", "DTYPE", "SHAPE", "SIZE", "SHARD"], &rows);
    println!();
    if !own.is_empty() {
        // Whole tensors some ranks held with contents of their own (an RNG state).
        let rows: Vec<Vec<String>> = own
            .iter()
            .map(|(r, k, t)| {
                let shape = format!("{:?}", t.shape);
                vec![
                    r.to_string(),
                    k.to_string(),
                    t.dtype.name().to_string(),
                    shape,
                    output::size(stored_bytes(t)),
                    shard_names(t),
                ]
            })
            .collect();
        output::table(&["RANK", "OWN TENSOR", "DTYPE", "SHAPE", "SIZE", "SHARD"], &rows);
        println!();
    }
    let rows: Vec<Vec<String>> =
        totals.iter().map(|(k, (n, b))| vec![k.to_string(), n.to_string(), output::size(*b)]).collect();
    output::table(&["KEY", "TENSORS", "SIZE"], &rows);
    Ok(ExitCode::SUCCESS)
}
