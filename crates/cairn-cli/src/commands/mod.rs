//! One module per group of subcommands.

pub mod convert;
pub mod copy;
pub mod diff;
pub mod inspect;
pub mod list;
pub mod prune;
pub mod report;
pub mod verify;

/// Exit status 1: the command worked and found a problem (or nothing).
pub fn found_problems() -> std::process::ExitCode {
    std::process::ExitCode::from(1)
}

/// The checkpoints a command argument names: the checkpoint itself when it is a folder with
/// a manifest (`single`), else every committed checkpoint of the run. Each is opened, or
/// the error that opening it gave (a damaged manifest is a finding, not a crash).
pub struct Targets {
    pub single: bool,
    pub checkpoints: Vec<cairn::Result<cairn::Checkpoint>>,
}

/// Resolves `uri` into [`Targets`]; a run without committed checkpoints is an error.
pub fn targets(uri: &str) -> Result<Targets, crate::output::CliError> {
    match cairn::resolve_at(cairn::Location::open(uri)?)? {
        cairn::Target::Checkpoint(location) => {
            Ok(Targets { single: true, checkpoints: vec![cairn::Checkpoint::open_at(location)] })
        }
        cairn::Target::Run(run) => {
            let list = run.list()?;
            if list.is_empty() {
                let msg = format!("no committed checkpoint uri=`{uri}`");
                return Err(cairn::Error::new(cairn::ErrorKind::NotFound, msg).into());
            }
            Ok(Targets { single: false, checkpoints: list.iter().map(|c| c.open()).collect() })
        }
    }
}
