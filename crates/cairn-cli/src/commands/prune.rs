//! `cairn prune`: retention with the library's safety rules (never the latest, never a
//! damaged checkpoint), then the leftovers of unfinished saves (`Run::prune`).

use std::process::ExitCode;
use std::time::Duration;

use cairn::policy::Retention;

use crate::output::clean;
use crate::CommandResult;

pub fn run(uri: &str, retention: &Retention, grace: Duration, dry_run: bool) -> CommandResult {
    let report = cairn::Run::open(uri)?.prune(retention, grace, dry_run)?;
    for damaged in &report.damaged {
        eprintln!("warning: kept a damaged checkpoint: {}", clean(damaged.message()));
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    for step in &report.deleted {
        println!("{verb} step {step}");
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    for path in &report.removed {
        println!("{verb} unfinished {}", clean(path));
    }
    let total = report.kept + report.deleted.len();
    let dry = if dry_run { " (dry run: nothing removed)" } else { "" };
    println!("kept {} of {total} checkpoints{dry}", report.kept);
    Ok(ExitCode::SUCCESS)
}
