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

pub fn run(uri: &str, json: bool) -> CommandResult {
    let ckpt = cairn::open(uri)?;
    let manifest = ckpt.manifest();
    let info = ckpt.info();
    let mut totals: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for (key, t) in &manifest.tensors {
        let bytes: u64 = t.pieces.iter().map(|p| p.range[1] - p.range[0]).sum();
        let top = key.split('.').next().unwrap_or(key);
        let entry = totals.entry(top).or_default();
        entry.0 += 1;
        entry.1 += bytes;
    }
    if json {
        let tensors: serde_json::Map<String, serde_json::Value> = manifest
            .tensors
            .iter()
            .map(|(k, t)| {
                let files: Vec<&str> = t.pieces.iter().map(|p| p.file.as_str()).collect();
                let bytes: u64 = t.pieces.iter().map(|p| p.range[1] - p.range[0]).sum();
                (
                    k.clone(),
                    serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "bytes": bytes, "files": files}),
                )
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
            "files": manifest.files.iter().map(|(f, r)| (f.clone(), r.size.into())).collect::<serde_json::Map<String, serde_json::Value>>(),
            "tensors": tensors,
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
            let bytes: u64 = t.pieces.iter().map(|p| p.range[1] - p.range[0]).sum();
            vec![k.clone(), t.dtype.name().to_string(), format!("{:?}", t.shape), output::size(bytes), shard_names(t)]
        })
        .collect();
    output::table(&["TENSOR", "DTYPE", "SHAPE", "SIZE", "SHARD"], &rows);
    println!();
    let rows: Vec<Vec<String>> =
        totals.iter().map(|(k, (n, b))| vec![k.to_string(), n.to_string(), output::size(*b)]).collect();
    output::table(&["KEY", "TENSORS", "SIZE"], &rows);
    Ok(ExitCode::SUCCESS)
}
