//! How far a long operation got: the bytes it has done, stage by stage, reported to a
//! callback the caller gives (the CLI draws bars from it, Python passes it on).

/// A stage of a long operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Data files copied to the destination.
    Copying,
    /// Data files read back and checked against their checksums.
    Verifying,
    /// Tensors read by a load (and checked against their checksums).
    Reading,
}

impl Stage {
    /// The stage's name, as the faces show it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Copying => "copying",
            Stage::Verifying => "verifying",
            Stage::Reading => "reading",
        }
    }
}

/// Told `(stage, bytes)` each time `bytes` more of the data files are done in `stage`.
pub type Progress<'a> = &'a (dyn Fn(Stage, u64) + Sync);

/// A [`Progress`] that ignores what it is told.
pub fn quiet(_: Stage, _: u64) {}
