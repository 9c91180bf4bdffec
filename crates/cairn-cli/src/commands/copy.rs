//! `cairn cp`: copy a checkpoint or a whole run between any two stores, verified at the
//! destination; running it again after an interruption resumes.

use std::process::ExitCode;

use cairn::format::layout;
use cairn::transfer;

use crate::output;
use crate::CommandResult;

pub fn run(src: &str, dst: &str) -> CommandResult {
    let dst_loc = cairn::Location::create(dst)?;
    match cairn::Checkpoint::open(src) {
        Ok(ckpt) => {
            let info = transfer::copy_checkpoint(&ckpt, &dst_loc)?;
            println!("copied step {} -> {} ({}, verified)", info.step, info.uri, output::size(info.tensor_bytes));
        }
        Err(e) if e.kind() == cairn::ErrorKind::NotFound => {
            let run = cairn::Run::open(src)?;
            let list = run.list()?;
            if list.is_empty() {
                return Err(cairn::Error::new(
                    cairn::ErrorKind::NotFound,
                    format!("no committed checkpoint uri=`{src}`"),
                )
                .into());
            }
            let bar = output::progress(list.len() as u64, "copying");
            for c in list {
                let info = transfer::copy_checkpoint(&c.open()?, &dst_loc.child(&layout::step_dir(c.step)))?;
                bar.inc(1);
                bar.suspend(|| {
                    println!(
                        "copied step {} -> {} ({}, verified)",
                        info.step,
                        info.uri,
                        output::size(info.tensor_bytes)
                    )
                });
            }
            bar.finish_and_clear();
        }
        Err(e) => return Err(e.into()),
    }
    Ok(ExitCode::SUCCESS)
}
