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
                    "tensors": i.num_tensors,
                    "temporary": i.temporary,
                    "metrics": metrics,
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
                if i.temporary { "yes" } else { "no" }.to_string(),
                output::metrics(i),
            ]
        })
        .collect();
    output::table(&["STEP", "CREATED", "SIZE", "TEMPORARY", "METRICS"], &rows);
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
