//! One module per group of subcommands.

pub mod convert;
pub mod copy;
pub mod diff;
pub mod inspect;
pub mod list;
pub mod prune;
pub mod verify;

/// Exit status 1: the command worked and found a problem (or nothing).
pub fn found_problems() -> std::process::ExitCode {
    std::process::ExitCode::from(1)
}
