//! `cairn verify`: read every byte, check every checksum; name each corrupt tensor and file.

use std::process::ExitCode;

use crate::output;
use crate::CommandResult;

pub fn run(uri: &str) -> CommandResult {
    let checkpoints = super::targets(uri)?.checkpoints;
    let bar = output::progress(checkpoints.len() as u64, "verifying");
    let mut bad = 0usize;
    for ckpt in checkpoints {
        let (label, problems) = match ckpt {
            Ok(ckpt) => {
                let info = ckpt.info();
                (
                    format!("{} ({} tensors, {})", info.uri, info.num_tensors, output::size(info.tensor_bytes)),
                    ckpt.verify()?,
                )
            }
            Err(e) if e.kind() == cairn::ErrorKind::Corrupt || e.kind() == cairn::ErrorKind::Incompatible => {
                ("manifest".to_string(), vec![e])
            }
            Err(e) => return Err(e.into()),
        };
        bar.inc(1);
        if problems.is_empty() {
            bar.suspend(|| println!("ok       {label}"));
        } else {
            bad += 1;
            bar.suspend(|| {
                println!("CORRUPT  {label}");
                for p in &problems {
                    println!("  {}", output::clean(p.message()));
                }
            });
        }
    }
    bar.finish_and_clear();
    Ok(if bad == 0 { ExitCode::SUCCESS } else { super::found_problems() })
}
