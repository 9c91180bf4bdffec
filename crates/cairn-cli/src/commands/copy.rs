//! `cairn cp`: copy a checkpoint or a whole run between any two stores, verified at the
//! destination; running it again after an interruption resumes.

use std::process::ExitCode;

use cairn::transfer;

use crate::output;
use crate::CommandResult;

pub fn run(src: &str, dst: &str) -> CommandResult {
    let dst_loc = cairn::Location::create(dst)?;
    let dst_run = cairn::Run::at(dst_loc.clone());
    let targets = super::targets(src)?;
    for ckpt in targets.checkpoints {
        let ckpt = ckpt?;
        let to = if targets.single { dst_loc.clone() } else { dst_run.step_location(ckpt.info().step) };
        let bar = output::progress(ckpt.manifest().files.values().map(|f| f.size).sum(), "copying");
        let label = format!("step {}", ckpt.info().step);
        let info = transfer::copy_checkpoint(&ckpt, &to, &output::follow(&bar, &label))?;
        bar.finish_and_clear();
        println!("copied step {} -> {} ({}, verified)", info.step, info.uri, output::size(info.tensor_bytes));
    }
    Ok(ExitCode::SUCCESS)
}
