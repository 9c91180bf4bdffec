//! `cairn verify`: read every byte, check every checksum; name each corrupt tensor and file.

use std::process::ExitCode;

use crate::output;
use crate::CommandResult;

pub fn run(uri: &str) -> CommandResult {
    let checkpoints = super::targets(uri)?.checkpoints;
    let mut bad = 0usize;
    for ckpt in checkpoints {
        let (label, problems) = match ckpt {
            Ok(ckpt) => {
                let info = ckpt.info();
                let bar = output::progress(ckpt.manifest().files.values().map(|f| f.size).sum(), "verifying");
                let step = format!("step {}", info.step);
                let problems = ckpt.verify_with(&output::follow(&bar, &step))?;
                bar.finish_and_clear();
                (format!("{} ({} tensors, {})", info.uri, info.num_tensors, output::size(info.tensor_bytes)), problems)
            }
            Err(e) if e.kind() == cairn::ErrorKind::Corrupt || e.kind() == cairn::ErrorKind::Incompatible => {
                ("manifest".to_string(), vec![e])
            }
            Err(e) => return Err(e.into()),
        };
        if problems.is_empty() {
            println!("ok       {label}");
        } else {
            bad += 1;
            println!("CORRUPT  {label}");
            for p in &problems {
                println!("  {}", output::clean(p.message()));
            }
        }
    }
    Ok(if bad == 0 { ExitCode::SUCCESS } else { super::found_problems() })
}
