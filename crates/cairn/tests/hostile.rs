//! Hostile and messy run folders: symlinks at every level, special files, stray names.
//! Each case keeps a canary tree outside the run and checks afterwards that nothing in it
//! was read (access times), listed (folder access times), changed or deleted.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cairn::manager::{CheckpointManager, ManagerOptions, SaveRequest};
use cairn::policy::{Every, Retention, SavePolicy};
use cairn::{ErrorKind, LoadOptions, Run, SaveOptions};

/// A tree outside the run whose every file and folder is remembered: content, times.
struct Canary {
    root: PathBuf,
    seen: BTreeMap<PathBuf, (Vec<u8>, i64, i64)>,
    /// Whether this filesystem moves access times on reads (not on `noatime` mounts):
    /// without it, reads outside the run cannot be seen, only changes.
    atime_tracked: bool,
}

/// Whether reading an aged file moves its access time here.
fn atime_tracked(dir: &Path) -> bool {
    let probe = dir.join(".atime-probe");
    std::fs::write(&probe, b"x").unwrap();
    let old = SystemTime::now() - Duration::from_secs(2 * 86_400);
    std::fs::File::open(&probe).unwrap().set_times(std::fs::FileTimes::new().set_accessed(old)).unwrap();
    let before = std::fs::metadata(&probe).unwrap().atime();
    std::fs::read(&probe).unwrap();
    let moved = std::fs::metadata(&probe).unwrap().atime() != before;
    std::fs::remove_file(&probe).unwrap();
    moved
}

impl Canary {
    /// Fills `root` with user files (and whatever `extra` adds), then ages every access
    /// time by two days so that any read or listing (relatime) moves it.
    fn new(root: PathBuf, extra: impl FnOnce(&Path)) -> Canary {
        std::fs::create_dir_all(root.join("nested")).unwrap();
        std::fs::write(root.join("notes.txt"), b"user data, not Cairn's").unwrap();
        std::fs::write(root.join("passwd"), vec![b'x'; 1221]).unwrap();
        std::fs::write(root.join("nested/keep.bin"), [7u8; 64]).unwrap();
        extra(&root);
        let old = SystemTime::now() - Duration::from_secs(2 * 86_400);
        let mut seen = BTreeMap::new();
        for path in walk(&root) {
            let times = std::fs::FileTimes::new().set_accessed(old);
            std::fs::File::open(&path).unwrap().set_times(times).unwrap();
            seen.insert(path, (Vec::new(), 0, 0));
        }
        for (path, entry) in seen.iter_mut() {
            let meta = std::fs::symlink_metadata(path).unwrap();
            let content = if meta.is_file() { std::fs::read(path).unwrap() } else { Vec::new() };
            // Reading the content moved the access time: set it back, then record it.
            std::fs::File::open(path).unwrap().set_times(std::fs::FileTimes::new().set_accessed(old)).unwrap();
            let meta = std::fs::symlink_metadata(path).unwrap();
            *entry = (content, meta.atime(), meta.mtime());
        }
        let atime_tracked = atime_tracked(root.parent().unwrap());
        if !atime_tracked {
            eprintln!("access times are not tracked here: reads outside the run go unseen, changes do not");
        }
        Canary { root, seen, atime_tracked }
    }

    /// Panics if anything in the tree was read, listed, changed, added or deleted.
    fn assert_untouched(&self) {
        let now: Vec<PathBuf> = walk(&self.root);
        let before: Vec<PathBuf> = self.seen.keys().cloned().collect();
        assert_eq!(now, before, "files outside the run were added or deleted");
        for (path, (content, atime, mtime)) in &self.seen {
            let meta = std::fs::symlink_metadata(path).unwrap();
            if self.atime_tracked {
                assert_eq!(meta.atime(), *atime, "read or listed outside the run: {}", path.display());
            }
            assert_eq!(meta.mtime(), *mtime, "changed outside the run: {}", path.display());
            if meta.is_file() {
                assert_eq!(&std::fs::read(path).unwrap(), content, "changed outside the run: {}", path.display());
            }
        }
    }
}

/// Every file and folder under `root` (itself included), sorted, with the access times
/// of the folders put back after listing them.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut before = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        before.insert(p.clone(), meta.atime());
        if meta.is_dir() {
            let old = SystemTime::UNIX_EPOCH + Duration::from_secs(meta.atime() as u64);
            let children: Vec<PathBuf> = std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()).collect();
            std::fs::File::open(&p).unwrap().set_times(std::fs::FileTimes::new().set_accessed(old)).unwrap();
            stack.extend(children);
        }
    }
    before.into_keys().collect()
}

fn state(step: u64) -> cairn::State {
    common::model_state(step, 1, 4)
}

fn save(run: &Path, step: u64) {
    cairn::save(run.to_str().unwrap(), &state(step), &SaveOptions::default().with_step(step)).unwrap();
}

fn step_dir(step: u64) -> String {
    cairn::format::layout::step_dir(step)
}

fn steps(run: &Run) -> Vec<u64> {
    run.list().unwrap().iter().map(|c| c.step).collect()
}

fn manager(run: &Path, keep_last: usize) -> CheckpointManager {
    let opts = ManagerOptions::default()
        .with_policy(SavePolicy::steps(vec![Every::new(1)]).unwrap())
        .with_retention(Retention { keep_last: Some(keep_last), ..Default::default() })
        .with_async_save(false)
        .with_preemption_signal(None);
    CheckpointManager::open(run.to_str().unwrap(), opts).unwrap()
}

struct Case {
    _dir: tempfile::TempDir,
    run: PathBuf,
    canary: Canary,
}

/// A run with steps 1 and 2, and a canary tree beside it that `outside` may extend.
fn case(outside: impl FnOnce(&Path)) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    save(&run, 1);
    save(&run, 2);
    let canary = Canary::new(dir.path().join("outside"), outside);
    Case { _dir: dir, run, canary }
}

#[test]
fn a_symlinked_step_folder_is_not_part_of_the_run() {
    let c = case(|out| save(out, 3));
    symlink(c.canary.root.join(step_dir(3)), c.run.join(step_dir(3))).unwrap();
    let run = Run::open(c.run.to_str().unwrap()).unwrap();
    assert_eq!(steps(&run), [1, 2]);
    let (_, info) = cairn::load(c.run.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(info.step, 2);
    assert!(run.prune_orphans(Duration::ZERO).unwrap().is_empty());
    let err = run.checkpoint(3).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("symlink"), "{err}");
    assert_eq!(run.delete(3).unwrap_err().kind(), ErrorKind::Corrupt);
    let manager = manager(&c.run, 1);
    manager.on_step(4, &state(4), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    assert_eq!(steps(&run), [4]);
    manager.reset().unwrap();
    assert!(steps(&run).is_empty());
    assert!(std::fs::symlink_metadata(c.run.join(step_dir(3))).unwrap().is_symlink());
    c.canary.assert_untouched();
}

#[test]
fn a_symlinked_shards_folder_is_refused_and_never_emptied() {
    let c = case(|out| std::fs::create_dir_all(out.join("shards")).unwrap());
    let shards = c.run.join(step_dir(2)).join("shards");
    for entry in std::fs::read_dir(&shards).unwrap() {
        let path = entry.unwrap().path();
        std::fs::rename(&path, c.canary.root.join("shards").join(path.file_name().unwrap())).unwrap();
    }
    std::fs::remove_dir(&shards).unwrap();
    symlink(c.canary.root.join("shards"), &shards).unwrap();
    let canary = Canary::new(c.canary.root.clone(), |_| {});

    let err = cairn::load(c.run.to_str().unwrap(), &LoadOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("symlink inside the run is not followed"), "{err}");
    let run = Run::open(c.run.to_str().unwrap()).unwrap();
    let problems = run.checkpoint(2).unwrap().verify().unwrap();
    assert!(!problems.is_empty() && problems.iter().all(|p| p.to_string().contains("symlink")), "{problems:?}");
    assert!(run.prune_orphans(Duration::ZERO).unwrap().is_empty());
    let manager = manager(&c.run, 1);
    manager.on_step(3, &state(3), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    assert_eq!(steps(&run), [3]);
    assert!(std::fs::symlink_metadata(&shards).unwrap().is_symlink());
    canary.assert_untouched();
}

#[test]
fn an_error_never_tells_the_size_of_a_file_outside_the_run() {
    let c = case(|_| {});
    let ckpt = c.run.join(step_dir(2));
    std::fs::remove_dir_all(ckpt.join("shards")).unwrap();
    symlink(&c.canary.root, ckpt.join("shards")).unwrap();
    let manifest_path = ckpt.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let (name, record) = {
        let files = manifest["files"].as_object().unwrap();
        let (name, record) = files.iter().next().unwrap();
        (name.clone(), record.clone())
    };
    manifest["files"] = serde_json::json!({ "shards/passwd": record });
    for tensor in manifest["tensors"].as_object_mut().unwrap().values_mut() {
        for piece in tensor["pieces"].as_array_mut().unwrap() {
            assert_eq!(piece["file"], serde_json::json!(name));
            piece["file"] = serde_json::json!("shards/passwd");
        }
    }
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let err = cairn::load(ckpt.to_str().unwrap(), &LoadOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(!err.full_message().contains("1221"), "{}", err.full_message());
    let problems = cairn::open(ckpt.to_str().unwrap()).unwrap().verify().unwrap();
    assert!(problems.iter().all(|p| !p.full_message().contains("1221")), "{problems:?}");
    c.canary.assert_untouched();
}

#[test]
fn a_symlinked_file_inside_a_checkpoint_is_never_deleted_through() {
    let c = case(|_| {});
    let ckpt = c.run.join(step_dir(1));
    symlink(c.canary.root.join("notes.txt"), ckpt.join("shards").join("stray.safetensors")).unwrap();
    symlink(c.canary.root.join("nested"), ckpt.join("nested")).unwrap();
    let run = Run::open(c.run.to_str().unwrap()).unwrap();
    assert!(run.prune_orphans(Duration::ZERO).unwrap().is_empty());
    run.delete(1).unwrap();
    assert_eq!(steps(&run), [2]);
    c.canary.assert_untouched();
}

#[test]
fn saving_into_a_symlinked_step_folder_writes_nothing_outside() {
    let c = case(|out| std::fs::create_dir_all(out.join("empty")).unwrap());
    symlink(c.canary.root.join("empty"), c.run.join(step_dir(5))).unwrap();
    let err = cairn::save(c.run.to_str().unwrap(), &state(5), &SaveOptions::default().with_step(5)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("symlink"), "{err}");
    c.canary.assert_untouched();
}

/// Runs `f` on a thread and fails the test if it has not returned within 20 s.
fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(20)).expect("hung on a special file")
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_fifo_named_manifest_never_hangs_a_reader() {
    let c = case(|_| {});
    let ckpt = c.run.join(step_dir(7));
    std::fs::create_dir_all(&ckpt).unwrap();
    mkfifo(&ckpt.join("manifest.json"));
    let uri = ckpt.to_str().unwrap().to_string();
    let err = within_seconds(move || cairn::open(&uri).map(|_| ())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let run_uri = c.run.to_str().unwrap().to_string();
    let (_, info) = within_seconds(move || cairn::load(&run_uri, &LoadOptions::default())).unwrap();
    assert_eq!(info.step, 2);
    c.canary.assert_untouched();
}

#[test]
fn a_fifo_in_place_of_a_shard_is_corrupt_not_a_hang() {
    let c = case(|_| {});
    let shards = c.run.join(step_dir(2)).join("shards");
    let shard = std::fs::read_dir(&shards).unwrap().next().unwrap().unwrap().path();
    std::fs::remove_file(&shard).unwrap();
    mkfifo(&shard);
    let uri = c.run.to_str().unwrap().to_string();
    let err = within_seconds(move || cairn::load(&uri, &LoadOptions::default()).map(|_| ())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn stray_names_and_symlink_loops_do_not_break_the_run() {
    let c = case(|_| {});
    let bad_name = OsStr::from_bytes(b"stray-\xff\xfe.bin");
    std::fs::write(c.run.join(bad_name), b"x").unwrap();
    std::fs::write(c.run.join(step_dir(1)).join(bad_name), b"x").unwrap();
    symlink("loop", c.run.join("loop")).unwrap();
    symlink(".", c.run.join(step_dir(1)).join("self")).unwrap();
    symlink("..", c.run.join(step_dir(2)).join("shards").join("up")).unwrap();
    std::fs::create_dir_all(c.run.join("not-a-step/deeper")).unwrap();
    let run = Run::open(c.run.to_str().unwrap()).unwrap();
    assert_eq!(steps(&run), [1, 2]);
    let (loaded, info) = run.load_latest(&LoadOptions::default()).unwrap();
    assert_eq!((info.step, loaded), (2, state(2)));
    assert!(run.checkpoint(2).unwrap().verify().unwrap().is_empty());
    let manager = manager(&c.run, 2);
    assert_eq!(manager.latest_step().unwrap(), Some(2));
    run.prune_orphans(Duration::ZERO).unwrap();
    assert_eq!(steps(&run), [1, 2]);
    c.canary.assert_untouched();
}

fn edit_manifest(ckpt: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = ckpt.join("manifest.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
}

#[test]
fn a_damaged_old_manifest_is_reported_and_never_blocks_the_run() {
    let c = case(|_| {});
    save(&c.run, 3);
    std::fs::write(c.run.join(step_dir(1)).join("manifest.json"), b"{ not json").unwrap();
    let run = Run::open(c.run.to_str().unwrap()).unwrap();
    let survey = run.survey().unwrap();
    assert_eq!(survey.checkpoints.iter().map(|i| i.step).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(survey.damaged.len(), 1);
    assert!(survey.damaged[0].to_string().contains(&step_dir(1)), "{}", survey.damaged[0]);
    let manager = manager(&c.run, 1);
    assert_eq!(manager.latest_step().unwrap(), Some(3));
    manager.on_step(4, &state(4), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    assert_eq!(steps(&run), [1, 4], "retention deletes what it can read and keeps the damaged one");
    run.prune_orphans(Duration::ZERO).unwrap();
    assert!(c.run.join(step_dir(1)).join("manifest.json").exists());
}

#[test]
fn a_damaged_newest_manifest_resumes_from_the_newest_healthy_checkpoint() {
    let c = case(|_| {});
    edit_manifest(&c.run.join(step_dir(2)), |m| m["tensors"] = serde_json::json!(7));
    let (_, info) = cairn::load(c.run.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(info.step, 1);
    let manager = manager(&c.run, 3);
    let (_, info) = manager.restore(None, &LoadOptions::default()).unwrap();
    assert_eq!(info.step, 1);
}

#[test]
fn a_checkpoint_whose_manifest_names_another_step_is_refused_and_never_misleads_retention() {
    let c = case(|_| {});
    // A pretrain checkpoint copied into the run by hand as step 3: its manifest says 999.
    let pretrain = c._dir.path().join("pretrain");
    save(&pretrain, 999);
    std::fs::rename(pretrain.join(step_dir(999)), c.run.join(step_dir(3))).unwrap();
    let run = Run::open(c.run.to_str().unwrap()).unwrap();
    let err = run.checkpoint(3).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("manifest says step 999 but its folder is step 3"), "{err}");
    let manager = manager(&c.run, 2);
    assert_eq!(manager.latest_step().unwrap(), Some(2));
    assert!(manager.on_step(4, &state(4), SaveRequest::default()).unwrap(), "step 4 must be saved");
    manager.wait().unwrap();
    assert!(manager.on_step(5, &state(5), SaveRequest::default()).unwrap());
    manager.wait().unwrap();
    assert_eq!(steps(&run), [3, 4, 5]);
    assert_eq!(run.survey().unwrap().damaged.len(), 1);
}

#[test]
fn a_tensor_of_a_hundred_thousand_pieces_opens_in_bounded_time() {
    // One tensor of 100,000 one-row pieces over one file: validation is a sweep, not a
    // comparison of every pair (that took 27 s for 40,000 pieces).
    let dir = tempfile::tempdir().unwrap();
    let mut state = cairn::State::new();
    let rows = 100_000u64;
    state
        .insert_tensor("w", cairn::Tensor::new(cairn::DType::U8, vec![rows, 2], vec![1u8; 2 * rows as usize]).unwrap());
    let ckpt = dir.path().join("ckpt");
    cairn::save(ckpt.to_str().unwrap(), &state, &SaveOptions::default()).unwrap();
    edit_manifest(&ckpt, |m| {
        let piece = m["tensors"]["w"]["pieces"][0].clone();
        let start = piece["range"][0].as_u64().unwrap();
        let pieces: Vec<serde_json::Value> = (0..rows)
            .map(|r| {
                let mut p = piece.clone();
                p["range"] = serde_json::json!([start + 2 * r, start + 2 * r + 2]);
                p["offsets"] = serde_json::json!([r, 0]);
                p["shape"] = serde_json::json!([1, 2]);
                p["crc32c"] = serde_json::json!(cairn::format::checksum::crc32c(&[1, 1]));
                p
            })
            .collect();
        m["tensors"]["w"]["pieces"] = serde_json::json!(pieces);
    });
    let uri = ckpt.to_str().unwrap().to_string();
    let (loaded, _) = within_seconds(move || cairn::load(&uri, &LoadOptions::default()).unwrap());
    assert_eq!(loaded, state);
    let uri = ckpt.to_str().unwrap().to_string();
    let problems = within_seconds(move || cairn::open(&uri).unwrap().verify().unwrap());
    assert!(problems.is_empty(), "{problems:?}");
    // The same pieces all at row 0: overlapping, found without comparing every pair.
    edit_manifest(&ckpt, |m| {
        for p in m["tensors"]["w"]["pieces"].as_array_mut().unwrap() {
            p["offsets"] = serde_json::json!([0, 0]);
        }
    });
    let uri = ckpt.to_str().unwrap().to_string();
    let err = within_seconds(move || cairn::open(&uri).map(|_| ()).unwrap_err());
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

/// Sets the modification time of `path` (file or folder) `age` in the past.
fn age(path: &Path, age: Duration) {
    let then = SystemTime::now() - age;
    let times = std::fs::FileTimes::new().set_modified(then).set_accessed(then);
    std::fs::File::open(path).unwrap().set_times(times).unwrap();
}

/// Leftovers of killed saves and prunes of every kind, all two hours old.
fn leave_leftovers(run: &Path) -> Vec<PathBuf> {
    let two_hours = Duration::from_secs(7200);
    let leftovers = vec![
        run.join(step_dir(5)),
        run.join(step_dir(6)).join("shards"),
        run.join("LATEST#3"),
        run.join(step_dir(2)).join("manifest.json#7"),
        run.join(step_dir(9)).join("shards").join("r00000-00000-of-00001-dead.safetensors"),
    ];
    std::fs::create_dir_all(&leftovers[0]).unwrap();
    std::fs::create_dir_all(&leftovers[1]).unwrap();
    for file in &leftovers[2..] {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, b"x").unwrap();
        age(file, two_hours);
    }
    for dir in [&leftovers[1], &run.join(step_dir(6)), &leftovers[0], &run.join(step_dir(9)).join("shards")] {
        age(dir, two_hours);
    }
    age(&run.join(step_dir(9)), two_hours);
    leftovers
}

#[test]
fn prune_removes_empty_step_folders_and_staged_files_once_old_enough() {
    let c = case(|_| {});
    let leftovers = leave_leftovers(&c.run);
    let run = Run::open(c.run.to_str().unwrap()).unwrap();
    assert!(run.prune_orphans(Duration::from_secs(3 * 3600)).unwrap().is_empty(), "younger than the grace");
    let removed = run.prune_orphans(Duration::from_secs(3600)).unwrap();
    assert!(!removed.is_empty());
    for path in &leftovers {
        assert!(!path.exists(), "left behind: {}", path.display());
    }
    for step in [5, 6, 9] {
        assert!(!c.run.join(step_dir(step)).exists(), "step folder {step} left behind");
    }
    assert_eq!(steps(&run), [1, 2]);
    assert_eq!(run.load_latest(&LoadOptions::default()).unwrap().1.step, 2);
    c.canary.assert_untouched();
}

#[test]
fn a_manager_clears_old_leftovers_when_it_opens() {
    let c = case(|_| {});
    let leftovers = leave_leftovers(&c.run);
    let manager = manager(&c.run, 5);
    manager.wait().unwrap();
    assert!(manager.take_cleanup_errors().is_empty());
    for path in &leftovers {
        assert!(!path.exists(), "left behind: {}", path.display());
    }
    assert_eq!(manager.latest_step().unwrap(), Some(2));
}

#[test]
fn prune_never_removes_a_users_own_files_from_step_folders() {
    let c = case(|_| {});
    let mine = [c.run.join(step_dir(1)).join("eval.json"), c.run.join(step_dir(8)).join("notes.txt")];
    for file in &mine {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, b"mine").unwrap();
        age(file, Duration::from_secs(7200));
    }
    let run = Run::open(c.run.to_str().unwrap()).unwrap();
    run.prune_orphans(Duration::ZERO).unwrap();
    let manager = manager(&c.run, 1);
    manager.on_step(3, &state(3), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    assert_eq!(steps(&run), [3]);
    for file in &mine {
        assert_eq!(std::fs::read(file).unwrap(), b"mine", "{}", file.display());
    }
}

#[test]
fn a_file_where_a_folder_belongs_and_a_folder_where_the_manifest_belongs_are_corrupt() {
    let c = case(|_| {});
    std::fs::write(c.run.join(step_dir(4)), b"not a folder").unwrap();
    let err = cairn::load(c.run.join(step_dir(4)).join("x").to_str().unwrap(), &LoadOptions::default()).unwrap_err();
    assert_ne!(err.kind(), ErrorKind::Unavailable, "{err}");
    let run = Run::open(c.run.to_str().unwrap()).unwrap();
    let err = run.checkpoint(4).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    std::fs::create_dir_all(c.run.join(step_dir(5)).join("manifest.json").join("x")).unwrap();
    let err = cairn::save(c.run.to_str().unwrap(), &state(5), &SaveOptions::default().with_step(5)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("not a manifest"), "{err}");
    assert_eq!(steps(&run), [1, 2]);
}

#[test]
fn a_run_folder_that_is_itself_a_symlink_works_as_documented() {
    // Putting a run on a bigger disk: the run's own path may be a symlink.
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("bigger-disk").join("job");
    std::fs::create_dir_all(&disk).unwrap();
    let run_path = dir.path().join("run");
    symlink(&disk, &run_path).unwrap();
    save(&run_path, 1);
    let manager = manager(&run_path, 1);
    manager.on_step(2, &state(2), SaveRequest::default()).unwrap();
    manager.wait().unwrap();
    let run = Run::open(run_path.to_str().unwrap()).unwrap();
    assert_eq!(steps(&run), [2]);
    assert_eq!(run.load_latest(&LoadOptions::default()).unwrap().0, state(2));
    assert!(disk.join(step_dir(2)).join("manifest.json").is_file(), "written on the disk the link points to");
    assert!(!disk.join(step_dir(1)).exists(), "retention deleted there too");
}
