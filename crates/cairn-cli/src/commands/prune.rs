//! `cairn prune`: apply retention with the library's safety rules (never the latest), then
//! remove the leftovers of unfinished saves.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use cairn::policy::{self, Candidate, Retention};

use crate::CommandResult;

pub fn run(uri: &str, retention: &Retention, grace: Duration, dry_run: bool) -> CommandResult {
    let run = cairn::Run::open(uri)?;
    let metric = retention.keep_best.as_ref().map(|b| b.metric.as_str());
    let mut candidates = Vec::new();
    let survey = run.survey()?;
    for damaged in &survey.damaged {
        eprintln!("warning: kept a damaged checkpoint: {}", crate::output::clean(damaged.message()));
    }
    for info in survey.checkpoints {
        candidates.push(Candidate {
            step: info.step,
            temporary: info.temporary,
            metric: metric.and_then(|m| info.metric(m)),
        });
    }
    let doomed = policy::to_delete(retention, &candidates, &BTreeSet::new());
    for step in &doomed {
        if dry_run {
            println!("would delete step {step}");
        } else {
            run.delete(*step)?;
            println!("deleted step {step}");
        }
    }
    if dry_run {
        println!(
            "kept {} of {} checkpoints (dry run: nothing removed)",
            candidates.len() - doomed.len(),
            candidates.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for path in run.prune_orphans(grace)? {
        println!("removed unfinished {path}");
    }
    println!("kept {} of {} checkpoints", candidates.len() - doomed.len(), candidates.len());
    Ok(ExitCode::SUCCESS)
}
