//! `cairn ls` and `cairn latest`.

use std::process::ExitCode;

use crate::output::{self, CliError};
use crate::CommandResult;

pub fn ls(uri: &str, json: bool) -> CommandResult {
    let run = cairn::Run::open(uri)?;
    let survey = run.survey()?;
    for damaged in &survey.damaged {
        eprintln!("warning: skipped a damaged checkpoint: {}", output::clean(damaged.message()));
    }
    let infos = survey.checkpoints;
    if json {
        let rows: Vec<serde_json::Value> = infos
            .iter()
            .map(|i| {
                let metrics: serde_json::Map<String, serde_json::Value> =
                    i.metrics.keys().filter_map(|k| i.metric(k).map(|v| (k.clone(), v.into()))).collect();
                serde_json::json!({
                    "step": i.step,
                    "uri": i.uri,
                    "created": output::time(i.created_unix_ms),
                    "bytes": i.tensor_bytes,
                    "written_bytes": i.written_bytes,
                    "tensors": i.num_tensors,
                    "temporary": i.temporary,
                    "metrics": metrics,
                    "timings": i.timings.map(|t| serde_json::json!({
                        "snapshot_s": t.snapshot_ms.map(|ms| ms as f64 / 1000.0),
                        "write_s": t.write_ms as f64 / 1000.0,
                    })),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows).map_err(|e| CliError::msg(e.to_string()))?);
        return Ok(if survey.damaged.is_empty() { ExitCode::SUCCESS } else { super::found_problems() });
    }
    let rows: Vec<Vec<String>> = infos
        .iter()
        .map(|i| {
            vec![
                i.step.to_string(),
                output::time(i.created_unix_ms),
                output::size(i.tensor_bytes),
                output::size(i.written_bytes),
                output::seconds(i.timings.and_then(|t| t.snapshot_ms)),
                output::seconds(i.timings.map(|t| t.write_ms)),
                if i.temporary { "yes" } else { "no" }.to_string(),
                output::metrics(i),
            ]
        })
        .collect();
    output::table(&["STEP", "CREATED", "SIZE", "WRITTEN", "STALL", "WRITE", "TEMPORARY", "METRICS"], &rows);
    if !infos.is_empty() {
        let logical = infos.iter().fold(0u64, |total, i| total.saturating_add(i.tensor_bytes));
        let saved = (100.0 * (1.0 - survey.stored_bytes as f64 / logical.max(1) as f64)).max(0.0);
        println!(
            "{} checkpoints: {} of tensors, {} stored ({saved:.0}% saved by incremental saves)",
            infos.len(),
            output::size(logical),
            output::size(survey.stored_bytes),
        );
    }
    Ok(if survey.damaged.is_empty() { ExitCode::SUCCESS } else { super::found_problems() })
}

pub fn latest(uri: &str) -> CommandResult {
    match cairn::Run::open(uri)?.latest()? {
        Some(c) => {
            println!("{}", c.location().uri());
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("no committed checkpoint in {uri}");
            Ok(super::found_problems())
        }
    }
}
