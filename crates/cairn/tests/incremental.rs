//! Incremental saves: what is already stored is referred to, not written again; deletion,
//! prune, copy and bundles keep every committed checkpoint whole; hostile references are
//! refused; and a property test runs random saves, deletions, prunes and crashed saves
//! against a model of what must exist.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn::format::layout;
use cairn::transfer;
use cairn::{DType, ErrorKind, LoadOptions, Location, Run, SaveOptions, State, Tensor, Value};
use proptest::prelude::*;

const BASE: usize = 256 << 10;
const ADAPTER: usize = 4 << 10;

/// A fine-tuning state: a frozen base (from `base`) and a trained adapter (from `trained`).
fn state(base: u64, trained: u64) -> State {
    let mut s = State::new();
    let mut rng = common::Rng::new(base);
    s.insert_tensor("base.w", Tensor::new(DType::F32, vec![(BASE / 4) as u64], rng.bytes(BASE)).unwrap());
    let mut rng = common::Rng::new(trained ^ 0xA5A5);
    s.insert_tensor("adapter.w", Tensor::new(DType::F32, vec![(ADAPTER / 4) as u64], rng.bytes(ADAPTER)).unwrap());
    s.insert_value("step", Value::Int(trained as i64));
    s
}

fn opts(step: u64) -> SaveOptions {
    SaveOptions::default().with_step(step).with_incremental(true)
}

fn loaded(run: &Run, step: u64) -> State {
    run.checkpoint(step).unwrap().load(&LoadOptions::default()).unwrap()
}

/// Every data file under the run's step folders, relative to the run.
fn shard_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for step in std::fs::read_dir(dir).unwrap().flatten() {
        let shards = step.path().join("shards");
        if let Ok(files) = std::fs::read_dir(&shards) {
            for f in files.flatten() {
                found.push(format!(
                    "{}/shards/{}",
                    step.file_name().to_string_lossy(),
                    f.file_name().to_string_lossy()
                ));
            }
        }
    }
    found.sort();
    found
}

fn new_run() -> (tempfile::TempDir, PathBuf, Run) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run");
    let run = Run::create(path.to_str().unwrap()).unwrap();
    (dir, path, run)
}

#[test]
fn unchanged_tensors_are_referred_to_and_only_what_changed_is_written() {
    let (_dir, _path, run) = new_run();
    let first = run.save(&state(1, 1), &opts(1)).unwrap();
    assert!(first.written_bytes >= (BASE + ADAPTER) as u64);
    let second = run.save(&state(1, 2), &opts(2)).unwrap();
    assert_eq!(second.tensor_bytes, (BASE + ADAPTER) as u64);
    assert!(second.written_bytes < ADAPTER as u64 + 4096, "wrote {} bytes", second.written_bytes);
    let third = run.save(&state(1, 3), &opts(3)).unwrap();
    assert!(third.written_bytes < ADAPTER as u64 + 4096);

    let manifest = run.checkpoint(3).unwrap().manifest().clone();
    assert_eq!(manifest.format_version, 2);
    let base = &manifest.tensors["base.w"].pieces[0];
    assert!(base.file.starts_with("../step-000000000001/shards/"), "{}", base.file);
    assert!(base.xxh3.is_some());
    assert_eq!(run.checkpoint(1).unwrap().manifest().format_version, 1, "a save that refers to nothing stays v1");
    for (step, trained) in [(1, 1), (2, 2), (3, 3)] {
        assert!(loaded(&run, step) == state(1, trained), "step {step}");
        assert!(run.checkpoint(step).unwrap().verify().unwrap().is_empty());
    }
    // A plain save writes everything, and is read the same way.
    let full = run.save(&state(1, 4), &SaveOptions::default().with_step(4)).unwrap();
    assert!(full.written_bytes >= (BASE + ADAPTER) as u64);
    let survey = run.survey().unwrap();
    assert_eq!(survey.stored_bytes, [first, second, third, full].iter().map(|i| i.written_bytes).sum::<u64>());
}

#[test]
fn deleting_keeps_what_others_refer_to_and_the_last_deletion_frees_it() {
    let (_dir, path, run) = new_run();
    for step in 1..=3 {
        run.save(&state(1, step), &opts(step)).unwrap();
    }
    let first_files: Vec<String> =
        shard_files(&path).into_iter().filter(|f| f.starts_with("step-000000000001")).collect();
    run.delete(1).unwrap();
    assert!(run.checkpoint(1).is_err());
    assert_eq!(
        shard_files(&path).into_iter().filter(|f| f.starts_with("step-000000000001")).collect::<Vec<_>>(),
        first_files,
        "the base others refer to stays"
    );
    run.prune_orphans(Duration::ZERO).unwrap();
    run.delete(2).unwrap();
    assert!(loaded(&run, 3) == state(1, 3));
    run.prune(&cairn::policy::Retention::default(), Duration::ZERO, false).unwrap();
    assert!(loaded(&run, 3) == state(1, 3));
    // A new save still finds the base through step 3's reference, in step 1's folder.
    run.save(&state(1, 4), &opts(4)).unwrap();
    let base = run.checkpoint(4).unwrap().manifest().tensors["base.w"].pieces[0].file.clone();
    assert!(base.starts_with("../step-000000000001/"), "{base}");
    run.delete(3).unwrap();
    run.delete(4).unwrap();
    assert_eq!(shard_files(&path), Vec::<String>::new(), "the last deletion frees what was shared");
}

#[test]
fn a_pin_of_a_save_in_flight_keeps_what_it_names_until_it_expires() {
    let (_dir, path, run) = new_run();
    run.save(&state(1, 1), &opts(1)).unwrap();
    run.save(&state(1, 2), &opts(2)).unwrap();
    let base = run.checkpoint(2).unwrap().manifest().tensors["base.w"].pieces[0].file.clone();
    let in_run = base.trim_start_matches("../").to_string();
    let pin_dir = path.join("step-000000000009/.cairn-coord");
    std::fs::create_dir_all(&pin_dir).unwrap();
    std::fs::write(pin_dir.join("pin-0123abcd.json"), format!("{{\"files\":[\"{in_run}\"]}}")).unwrap();
    run.delete(1).unwrap();
    run.delete(2).unwrap();
    assert!(path.join(&in_run).is_file(), "a pinned file was deleted");
    // The prune's grace is the pins' lifetime: an old pin keeps nothing.
    run.prune_orphans(Duration::ZERO).unwrap();
    assert!(!path.join(&in_run).exists());
    assert!(!pin_dir.join("pin-0123abcd.json").exists());
    // A pin that cannot be read keeps every data file.
    run.save(&state(5, 5), &opts(5)).unwrap();
    std::fs::create_dir_all(&pin_dir).unwrap();
    std::fs::write(pin_dir.join("pin-ffff.json"), b"not json").unwrap();
    let before = shard_files(&path);
    run.delete(5).unwrap();
    assert_eq!(shard_files(&path), before);
}

#[test]
fn a_copy_a_bundle_and_a_cached_folder_stand_alone() {
    let (dir, _path, run) = new_run();
    run.save(&state(1, 1), &opts(1)).unwrap();
    run.save(&state(1, 2), &opts(2)).unwrap();
    let source = run.checkpoint(2).unwrap();
    let copy_dir = dir.path().join("copy");
    let copied =
        transfer::copy_checkpoint(&source, &Location::create(copy_dir.to_str().unwrap()).unwrap(), &|_, _| {}).unwrap();
    let copy = cairn::Checkpoint::open(copy_dir.to_str().unwrap()).unwrap();
    assert_eq!(copy.manifest().format_version, 1);
    assert!(!copy.manifest().has_references());
    assert_eq!(copied.written_bytes, copy.manifest().own_file_bytes());
    assert!(copy.load(&LoadOptions::default()).unwrap() == state(1, 2));

    let bundle = transfer::to_bytes(&source).unwrap();
    let unpacked = dir.path().join("unpacked");
    transfer::from_bytes(&bundle, &Location::create(unpacked.to_str().unwrap()).unwrap()).unwrap();
    assert!(cairn::load(unpacked.to_str().unwrap(), &LoadOptions::default()).unwrap().0 == state(1, 2));

    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let folder = transfer::as_directory(run.step_location(2), &cache).unwrap();
    assert!(folder.starts_with(&cache), "a folder that refers to others is not handed out as is");
    assert!(cairn::load(folder.to_str().unwrap(), &LoadOptions::default()).unwrap().0 == state(1, 2));
    // A checkpoint named directly by its folder finds the run around it.
    let direct = cairn::load(run.step_location(2).uri(), &LoadOptions::default()).unwrap().0;
    assert!(direct == state(1, 2));
}

#[test]
fn in_memory_and_object_store_runs_refer_the_same_way() {
    let run = Run::create("memory://incremental-mem/run").unwrap();
    run.save(&state(1, 1), &opts(1)).unwrap();
    let second = run.save(&state(1, 2), &opts(2)).unwrap();
    assert!(second.written_bytes < ADAPTER as u64 + 4096);
    run.delete(1).unwrap();
    assert!(loaded(&run, 2) == state(1, 2));
}

/// Writes `manifest` as the checkpoint of its step in the run at `path`.
fn plant(path: &Path, manifest: &cairn::format::manifest::Manifest) {
    let dir = path.join(layout::step_dir(manifest.step));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("manifest.json"), manifest.encode().unwrap()).unwrap();
}

#[test]
fn hostile_references_are_refused_naming_the_tensor_and_the_file_and_nothing_outside_is_touched() {
    let (dir, path, run) = new_run();
    run.save(&state(1, 1), &opts(1)).unwrap();
    run.save(&state(1, 2), &opts(2)).unwrap();
    let good = run.checkpoint(2).unwrap().manifest().clone();
    let base = good.tensors["base.w"].pieces[0].file.clone();

    // A reference to a file that is not there.
    let mut missing = good.clone();
    missing.step = 3;
    missing.save_id = "missing".into();
    let adapter = missing.tensors.remove("adapter.w").unwrap();
    missing.files.remove(&adapter.pieces[0].file);
    let gone = base.replace("shards/", "shards/x");
    let record = missing.files.remove(&base).unwrap();
    missing.files.insert(gone.clone(), record);
    missing.tensors.get_mut("base.w").unwrap().pieces[0].file = gone.clone();
    plant(&path, &missing);
    let err = run.checkpoint(3).unwrap().load(&LoadOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("tensor=`base.w`") && err.to_string().contains("shards/x"), "{err}");

    // References that leave the run, or point at their own folder, are refused on open.
    for (step, file) in [(4, "../../outside/shards/a"), (5, "../step-000000000005/shards/a"), (6, "../step-5/shards/a")]
    {
        let mut bad = good.clone();
        bad.step = step;
        let record = bad.files.remove(&base).unwrap();
        bad.files.insert(file.into(), record);
        bad.tensors.get_mut("base.w").unwrap().pieces[0].file = file.into();
        plant(&path, &bad);
        let err = run.checkpoint(step).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{file}: {err}");
        assert!(err.to_string().contains(file), "{err}");
    }

    // A referenced folder that is a symlink out of the run is never followed, read or
    // emptied.
    let outside = dir.path().join("outside");
    let canary_shards = outside.join("shards");
    std::fs::create_dir_all(&canary_shards).unwrap();
    let name = base.rsplit('/').next().unwrap();
    std::fs::copy(path.join(base.trim_start_matches("../")), canary_shards.join(name)).unwrap();
    std::os::unix::fs::symlink(&outside, path.join("step-000000000007")).unwrap();
    let mut linked = good.clone();
    linked.step = 8;
    linked.save_id = "linked".into();
    let via_link = base.replace("step-000000000001", "step-000000000007");
    let record = linked.files.remove(&base).unwrap();
    linked.files.insert(via_link.clone(), record);
    linked.tensors.get_mut("base.w").unwrap().pieces[0].file = via_link;
    plant(&path, &linked);
    let err = run.checkpoint(8).unwrap().load(&LoadOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    for step in [8, 3, 2, 1] {
        run.delete(step).unwrap();
    }
    run.prune_orphans(Duration::ZERO).unwrap();
    assert!(canary_shards.join(name).is_file(), "a file outside the run was deleted");
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Op {
    /// Save the next step; each tensor changes when its bit is set.
    Save(u8),
    /// Delete the committed checkpoint at this position (modulo their number).
    Delete(usize),
    /// Remove leftovers (no save is in flight).
    Prune,
    /// A save killed before its commit: its shards stay, no manifest.
    Crash(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Save),
        2 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Prune),
        1 => any::<u8>().prop_map(Op::Crash),
    ]
}

/// A state of three tensors whose contents are `versions`.
fn versioned(versions: [u64; 3]) -> State {
    let mut s = State::new();
    for (i, v) in versions.iter().enumerate() {
        let mut rng = common::Rng::new(v.wrapping_mul(31) + i as u64);
        s.insert_tensor(format!("t{i}"), Tensor::new(DType::U8, vec![2048], rng.bytes(2048)).unwrap());
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever the sequence, every checkpoint the model says is committed loads
    /// bit-exact, the deleted ones are gone, and once all are deleted and pruned no data
    /// file is left.
    #[test]
    fn random_saves_deletes_prunes_and_crashes_keep_every_committed_checkpoint(ops in prop::collection::vec(op(), 1..24)) {
        let (_dir, path, run) = new_run();
        let mut model: std::collections::BTreeMap<u64, [u64; 3]> = Default::default();
        let mut current = [0u64; 3];
        let mut version = 0u64;
        let mut step = 0u64;
        for op in ops {
            match op {
                Op::Save(mask) | Op::Crash(mask) => {
                    for (i, v) in current.iter_mut().enumerate() {
                        if mask & (1 << i) != 0 {
                            version += 1;
                            *v = version;
                        }
                    }
                    step += 1;
                    run.save(&versioned(current), &opts(step)).unwrap();
                    if matches!(op, Op::Crash(_)) {
                        std::fs::remove_file(path.join(layout::step_dir(step)).join("manifest.json")).unwrap();
                    } else {
                        model.insert(step, current);
                    }
                }
                Op::Delete(at) if !model.is_empty() => {
                    let doomed = *model.keys().nth(at % model.len()).unwrap();
                    run.delete(doomed).unwrap();
                    model.remove(&doomed);
                }
                Op::Delete(_) => {}
                Op::Prune => {
                    run.prune_orphans(Duration::ZERO).unwrap();
                }
            }
            let listed: Vec<u64> = run.list().unwrap().iter().map(|c| c.step).collect();
            prop_assert_eq!(&listed, &model.keys().copied().collect::<Vec<_>>());
            for (&s, &versions) in &model {
                prop_assert!(loaded(&run, s) == versioned(versions), "step {} differs", s);
            }
        }
        for s in model.keys() {
            run.delete(*s).unwrap();
        }
        run.prune_orphans(Duration::ZERO).unwrap();
        prop_assert_eq!(shard_files(&path), Vec::<String>::new());
    }
}

#[test]
fn a_damaged_manifest_keeps_what_it_still_names_and_frees_the_rest() {
    let (_dir, path, run) = new_run();
    run.save(&state(1, 1), &opts(1)).unwrap();
    run.save(&state(1, 2), &opts(2)).unwrap();
    let base = run.checkpoint(2).unwrap().manifest().tensors["base.w"].pieces[0].file.clone();
    // Step 2's manifest is damaged, but still names step 1's file.
    let manifest = path.join("step-000000000002/manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replacen("\"tensors\"", "\"tensorz\"", 1)).unwrap();
    assert_eq!(run.checkpoint(2).unwrap_err().kind(), ErrorKind::Corrupt);
    // A crashed save's leftovers are still pruned.
    run.save(&state(7, 3), &opts(3)).unwrap();
    std::fs::remove_file(path.join("step-000000000003/manifest.json")).unwrap();
    run.delete(1).unwrap();
    run.prune_orphans(Duration::ZERO).unwrap();
    assert!(path.join(base.trim_start_matches("../")).is_file(), "a file a damaged manifest names was deleted");
    assert!(shard_files(&path).iter().all(|f| !f.starts_with("step-000000000003")), "{:?}", shard_files(&path));
}

#[test]
fn a_bundle_that_refers_to_other_checkpoints_is_refused() {
    let (dir, _path, run) = new_run();
    run.save(&state(1, 1), &opts(1)).unwrap();
    run.save(&state(1, 2), &opts(2)).unwrap();
    let manifest = run.checkpoint(2).unwrap().manifest().encode().unwrap();
    let mut archive = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    archive.append_data(&mut header, "manifest.json", &manifest[..]).unwrap();
    let bundle = archive.into_inner().unwrap();
    let target = run.step_location(3);
    let err = transfer::from_bytes(&bundle, &target).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(run.checkpoint(3).is_err());
    // A checkpoint saved into a folder of its own (not a step folder of a run) refers to
    // nothing, whatever the options say.
    let alone = Location::create(dir.path().join("alone").to_str().unwrap()).unwrap();
    let info = cairn::runtime::block_on(cairn::save::save_checkpoint(&alone, &state(1, 1), 9, &opts(9))).unwrap();
    assert!(info.written_bytes >= (BASE + ADAPTER) as u64);
}

#[test]
fn saves_racing_deletions_never_commit_a_reference_to_deleted_data() {
    let (_dir, _path, run) = new_run();
    let saver = run.clone();
    let saves = std::thread::spawn(move || {
        // The base goes back and forth between two contents, so most saves refer to a
        // checkpoint the deleter is about to remove.
        for step in 1..=60u64 {
            let expected = state(step % 2, step);
            saver.save(&expected, &opts(step)).unwrap();
            match saver.checkpoint(step).and_then(|c| c.load(&LoadOptions::default())) {
                Ok(loaded) => assert!(loaded == expected, "step {step} differs"),
                Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound, "step {step}: {e}"),
            }
        }
    });
    let mut rounds = 0;
    while !saves.is_finished() {
        let listed = run.list().unwrap();
        for c in listed.iter().rev().skip(1) {
            run.delete(c.step).unwrap();
        }
        run.prune_orphans(Duration::from_secs(3600)).unwrap();
        rounds += 1;
    }
    saves.join().unwrap();
    assert!(rounds >= 2, "the deleter hardly ran: {rounds}");
    for c in run.list().unwrap() {
        assert!(c.open().unwrap().load(&LoadOptions::default()).unwrap() == state(c.step % 2, c.step));
    }
}

#[test]
fn changed_tensors_are_written_without_hashing_and_a_tensor_that_stops_changing_is_shared_again() {
    let (_dir, _path, run) = new_run();
    let piece = |step: u64, key: &str| run.checkpoint(step).unwrap().manifest().tensors[key].pieces[0].clone();
    // The first save of a run hashes everything.
    run.save(&state(1, 1), &opts(1)).unwrap();
    assert!(piece(1, "adapter.w").xxh3.is_some() && piece(1, "adapter.w").sample.is_some());
    // A tensor whose sample changed is written without hashing it whole.
    run.save(&state(1, 2), &opts(2)).unwrap();
    assert_eq!(piece(2, "adapter.w").xxh3, None);
    assert!(piece(2, "adapter.w").sample.is_some());
    assert!(piece(2, "base.w").file.starts_with("../"));
    // The adapter stops changing: its sample matches, it is hashed and written once with
    // its id, then shared.
    let third = run.save(&state(1, 2), &opts(3)).unwrap();
    assert!(piece(3, "adapter.w").xxh3.is_some() && !piece(3, "adapter.w").file.starts_with("../"));
    assert!(third.written_bytes >= ADAPTER as u64);
    let fourth = run.save(&state(1, 2), &opts(4)).unwrap();
    assert!(piece(4, "adapter.w").file.starts_with("../step-000000000003/"), "{}", piece(4, "adapter.w").file);
    assert!(fourth.written_bytes < 1024, "wrote {}", fourth.written_bytes);
    for step in 1..=4 {
        assert!(loaded(&run, step) == state(1, step.min(2)), "step {step}");
    }
}

#[test]
fn a_fault_at_any_io_of_an_incremental_save_leaves_every_committed_checkpoint_whole() {
    use cairn::fault::{Fault, FaultStore};
    use std::sync::Arc;
    let fresh = || {
        let inner: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let run = Run::at(Location::from_store(inner.clone(), "memory://matrix").child("run"));
        run.save(&state(1, 1), &opts(1)).unwrap();
        (inner, run)
    };
    let (inner, _) = fresh();
    let counting = Arc::new(FaultStore::counting(inner));
    Run::at(Location::from_store(counting.clone(), "memory://matrix").child("run"))
        .save(&state(1, 2), &opts(2))
        .unwrap();
    let ops = counting.ops();
    assert!(ops > 5, "{ops}");
    for fault in [Fault::Crash, Fault::Fail, Fault::LostAck, Fault::Tear] {
        for at in 0..ops {
            let (inner, run) = fresh();
            let faulty = Location::from_store(Arc::new(FaultStore::new(inner, at, fault)), "memory://matrix");
            let saved = Run::at(faulty.child("run")).save(&state(1, 2), &opts(2));
            let committed = match run.checkpoint(2) {
                Ok(ckpt) => {
                    assert!(ckpt.load(&LoadOptions::default()).unwrap() == state(1, 2), "{fault:?} at {at}");
                    true
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::NotFound, "{fault:?} at {at}: {e}");
                    false
                }
            };
            if saved.is_ok() {
                assert!(committed, "{fault:?} at {at}: reported committed, not visible");
            }
            // The source goes and leftovers are pruned: what committed still loads.
            run.delete(1).unwrap();
            run.prune_orphans(Duration::ZERO).unwrap();
            if committed {
                assert!(loaded(&run, 2) == state(1, 2), "{fault:?} at {at}");
            }
        }
    }
}
