//! Names inside a run: checkpoint folders (`step-000000001000`), the manifest, shard
//! files. Names are data, never paths: only names that match these exact shapes are ever
//! turned into store paths, so a hostile manifest cannot point outside its checkpoint.

/// The commit record of a checkpoint; its presence is the commit.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Optional hint naming the latest checkpoint of a run; never trusted without a manifest.
pub const LATEST_FILE: &str = "LATEST";
/// Folder of a checkpoint that holds its shard files.
pub const SHARDS_DIR: &str = "shards";

const STEP_PREFIX: &str = "step-";
const STEP_DIGITS: usize = 12;
const MAX_SHARD_NAME: usize = 200;

/// The folder name of the checkpoint of `step`; zero-padded so lexical order is step order.
///
/// ```
/// assert_eq!(cairn::format::layout::step_dir(1000), "step-000000001000");
/// ```
pub fn step_dir(step: u64) -> String {
    format!("{STEP_PREFIX}{step:0width$}", width = STEP_DIGITS)
}

/// The step of a checkpoint folder name, if `name` is one (`step-` then at least 12 digits).
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.len() < STEP_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step: u64 = digits.parse().ok()?;
    (step_dir(step) == name).then_some(step)
}

/// The relative path of shard `index` of `count` written by save attempt `attempt`.
/// The attempt id keeps a zombie writer of a failed attempt from ever overwriting the
/// shards of another attempt.
pub fn shard_file(rank: u32, index: usize, count: usize, attempt: &str) -> String {
    format!("{SHARDS_DIR}/r{rank:05}-{index:05}-of-{count:05}-{attempt}.safetensors")
}

/// Folder of a checkpoint where ranks of a multi-rank save exchange their messages.
pub const COORD_DIR: &str = ".cairn-coord";

/// Whether `file` (relative to a checkpoint folder) is something Cairn writes there: a
/// file in `shards/` or in the ranks' coordination folder, or a manifest being written
/// (`manifest.json#<digits>`). Pruning removes nothing else.
pub fn is_written_by_cairn(file: &str) -> bool {
    let staged_manifest = file
        .strip_prefix(MANIFEST_FILE)
        .and_then(|rest| rest.strip_prefix('#'))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()));
    staged_manifest
        || [SHARDS_DIR, COORD_DIR].iter().any(|dir| file.strip_prefix(dir).is_some_and(|r| r.starts_with('/')))
}

/// Whether `name` is a `LATEST` hint being written (`LATEST#<digits>`, the local
/// store's staging name) that a killed writer may have left.
pub fn is_staged_hint(name: &str) -> bool {
    name.strip_prefix(LATEST_FILE)
        .and_then(|rest| rest.strip_prefix('#'))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Where a data file named in a manifest lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFile<'a> {
    /// In the checkpoint's own folder: `shards/<name>`.
    Own(&'a str),
    /// In the folder of the checkpoint of `step` of the same run (an incremental save's
    /// reference to data already stored): `../step-<step>/shards/<name>`; `shard` is the
    /// path inside that folder.
    Sibling {
        /// The step whose folder holds the file.
        step: u64,
        /// `shards/<name>`.
        shard: &'a str,
    },
}

impl DataFile<'_> {
    /// The file's path relative to the run (`step-<step>/shards/<name>`), given the
    /// step of the checkpoint that names it.
    pub fn in_run(&self, own_step: u64) -> String {
        match *self {
            DataFile::Own(shard) => format!("{}/{shard}", step_dir(own_step)),
            DataFile::Sibling { step, shard } => format!("{}/{shard}", step_dir(step)),
        }
    }
}

/// What the data file `file` of a manifest names, if it has an acceptable shape:
/// `shards/<name>` (see [`is_valid_shard_file`]) or `../step-<12+ digits>/shards/<name>`.
/// Nothing else is ever turned into a path.
pub fn parse_data_file(file: &str) -> Option<DataFile<'_>> {
    if is_valid_shard_file(file) {
        return Some(DataFile::Own(file));
    }
    let (dir, shard) = file.strip_prefix("../")?.split_once('/')?;
    let step = parse_step_dir(dir)?;
    is_valid_shard_file(shard).then_some(DataFile::Sibling { step, shard })
}

/// The name a manifest of the same run gives the data file `shard` (`shards/<name>`) of
/// the checkpoint of `step`.
pub fn sibling_file(step: u64, shard: &str) -> String {
    format!("../{}/{shard}", step_dir(step))
}

/// Whether `file` is an acceptable shard reference in a manifest: `shards/<name>` where
/// `<name>` is 1..=200 characters of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn is_valid_shard_file(file: &str) -> bool {
    let Some(name) = file.strip_prefix(SHARDS_DIR).and_then(|r| r.strip_prefix('/')) else {
        return false;
    };
    !name.is_empty()
        && name.len() <= MAX_SHARD_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_dirs_round_trip_and_sort_by_step() {
        for step in [0, 1, 999, 1000, 123_456_789_012, u64::MAX] {
            assert_eq!(parse_step_dir(&step_dir(step)), Some(step));
        }
        assert!(step_dir(999) < step_dir(1000));
    }

    #[test]
    fn lookalike_step_dirs_are_rejected() {
        for name in ["step-1", "step-00000000001x", "step--00000000001", "xstep-000000000001", "step-0000000000001"] {
            assert_eq!(parse_step_dir(name), None, "{name}");
        }
    }

    #[test]
    fn shard_references_cannot_escape() {
        assert!(is_valid_shard_file(&shard_file(0, 1, 4, "abcd1234")));
        for bad in [
            "../x.safetensors",
            "shards/../../etc/passwd",
            "/etc/passwd",
            "shards/",
            "shards/a/b",
            "shards/.hidden",
            "x/shards/a",
            "shards\\a",
        ] {
            assert!(!is_valid_shard_file(bad), "{bad}");
        }
    }

    #[test]
    fn sibling_references_name_a_step_folder_of_the_run_and_nothing_else() {
        let own = shard_file(0, 0, 1, "abcd");
        assert_eq!(parse_data_file(&own), Some(DataFile::Own(&own)));
        let sibling = sibling_file(7, &own);
        assert_eq!(parse_data_file(&sibling), Some(DataFile::Sibling { step: 7, shard: &own }));
        assert_eq!(parse_data_file(&sibling).unwrap().in_run(9), format!("step-000000000007/{own}"));
        assert_eq!(DataFile::Own(&own).in_run(9), format!("step-000000000009/{own}"));
        for bad in [
            "../step-7/shards/a",
            "../../step-000000000007/shards/a",
            "../step-000000000007/../shards/a",
            "../step-000000000007/shards/../x",
            "../step-000000000007/manifest.json",
            "..//step-000000000007/shards/a",
            "./shards/a",
            "../x/shards/a",
            "../step-000000000007/shards/a/b",
        ] {
            assert_eq!(parse_data_file(bad), None, "{bad}");
        }
    }
}
