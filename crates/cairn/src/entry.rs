//! The one-call entry points re-exported at the crate root: save a state, open or load a
//! checkpoint or a run's latest one, by URI or resolved location, and tell a checkpoint
//! folder from a run.

use crate::{
    commit, runtime, Checkpoint, CheckpointInfo, Error, LoadOptions, Location, Result, Run, SaveOptions, State,
};

/// Saves `state` to `uri` and commits it. With `opts.step` set, `uri` is a run and the
/// checkpoint goes to `<uri>/step-<step>`; without, `uri` is the checkpoint folder.
/// Returns once the checkpoint is committed (and durable, on local disk).
pub fn save(uri: &str, state: &State, opts: &SaveOptions) -> Result<CheckpointInfo> {
    save_at(&Location::create(uri)?, state, opts)
}

/// [`save`] to an already resolved location (e.g. one opened with store options).
pub fn save_at(location: &Location, state: &State, opts: &SaveOptions) -> Result<CheckpointInfo> {
    match opts.step {
        Some(_) => Run::at(location.clone()).save(state, opts),
        None => runtime::block_on(crate::save::save_checkpoint(location, state, 0, opts)),
    }
}

/// What a location names: a checkpoint folder (it holds a manifest) or a run.
#[derive(Debug)]
pub enum Target {
    /// A committed checkpoint's folder (not opened yet: its manifest may be damaged).
    Checkpoint(Location),
    /// A run: a folder of `step-N` checkpoints (possibly none).
    Run(Run),
}

/// Whether `location` is a checkpoint folder or a run: the one place where an argument
/// that may be either is told apart (loads, `copy`, the CLI's `verify` and `cp`).
pub fn resolve_at(location: Location) -> Result<Target> {
    if runtime::block_on(commit::is_committed(&location))? {
        return Ok(Target::Checkpoint(location));
    }
    Ok(Target::Run(Run::at(location)))
}

/// Opens `uri` as a checkpoint folder if it holds a manifest, else as a run whose latest
/// committed checkpoint is opened.
pub fn open(uri: &str) -> Result<Checkpoint> {
    open_at(Location::open(uri)?)
}

/// [`open`] at an already resolved location.
pub fn open_at(location: Location) -> Result<Checkpoint> {
    match resolve_at(location)? {
        Target::Checkpoint(location) => Checkpoint::open_at(location),
        Target::Run(run) => run
            .latest()?
            .ok_or_else(|| Error::not_found(format!("no committed checkpoint uri=`{}`", run.location().uri()))),
    }
}

/// Loads `uri` (a checkpoint folder, or a run's latest checkpoint) with `opts`.
pub fn load(uri: &str, opts: &LoadOptions) -> Result<(State, CheckpointInfo)> {
    let checkpoint = open(uri)?;
    Ok((checkpoint.load(opts)?, checkpoint.info()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, ErrorKind, Tensor};

    #[test]
    fn resolve_tells_a_checkpoint_folder_from_a_run() {
        let run = Run::create("memory://entry-resolve/run").unwrap();
        assert!(matches!(resolve_at(run.location().clone()).unwrap(), Target::Run(_)), "an empty run");
        assert_eq!(open_at(run.location().clone()).unwrap_err().kind(), ErrorKind::NotFound);
        let mut state = State::new();
        state.insert_tensor("w", Tensor::new(DType::U8, vec![1], vec![1]).unwrap());
        run.save(&state, &SaveOptions::default().with_step(3)).unwrap();
        assert!(matches!(resolve_at(run.location().clone()).unwrap(), Target::Run(_)));
        match resolve_at(run.step_location(3)).unwrap() {
            Target::Checkpoint(location) => assert_eq!(location.uri(), run.step_location(3).uri()),
            other => panic!("a checkpoint folder resolved as {other:?}"),
        }
        assert_eq!(open_at(run.location().clone()).unwrap().manifest().step, 3);
        assert_eq!(open_at(run.step_location(3)).unwrap().manifest().step, 3);
    }
}
