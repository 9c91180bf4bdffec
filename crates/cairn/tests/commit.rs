//! The commit protocol and discovery: the manifest is the commit, unfinished saves are
//! invisible, a committed step is never overwritten, listing is in step order.

mod common;

use cairn::{ErrorKind, LoadOptions, Run, SaveOptions};

fn run_in(dir: &tempfile::TempDir) -> (String, Run) {
    let uri = dir.path().join("run").to_str().unwrap().to_string();
    let run = Run::create(&uri).unwrap();
    (uri, run)
}

#[test]
fn list_is_in_step_order_and_latest_is_highest_step() {
    let dir = tempfile::tempdir().unwrap();
    let (_, run) = run_in(&dir);
    for step in [30, 5, 1000, 200] {
        run.save(&common::model_state(step, 1, 4), &SaveOptions::default().with_step(step)).unwrap();
    }
    let steps: Vec<u64> = run.list().unwrap().iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![5, 30, 200, 1000]);
    assert_eq!(run.latest().unwrap().unwrap().info().step, 1000);
}

#[test]
fn uncommitted_step_is_invisible() {
    let dir = tempfile::tempdir().unwrap();
    let (uri, run) = run_in(&dir);
    run.save(&common::model_state(1, 1, 4), &SaveOptions::default().with_step(1)).unwrap();
    run.save(&common::model_state(2, 1, 4), &SaveOptions::default().with_step(2)).unwrap();
    // Simulate a save killed before its commit: data present, manifest absent.
    std::fs::remove_file(dir.path().join("run/step-000000000002/manifest.json")).unwrap();
    std::fs::create_dir_all(dir.path().join("run/step-000000000009/shards")).unwrap();
    std::fs::write(dir.path().join("run/step-000000000009/shards/x.safetensors"), b"partial").unwrap();
    let steps: Vec<u64> = run.list().unwrap().iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![1]);
    let (state, info) = cairn::load(&uri, &LoadOptions::default()).unwrap();
    assert_eq!(info.step, 1);
    assert_eq!(state, common::model_state(1, 1, 4));
    assert_eq!(run.checkpoint(2).unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn second_save_of_a_committed_step_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, run) = run_in(&dir);
    let first = run.save(&common::model_state(4, 1, 4), &SaveOptions::default().with_step(4)).unwrap();
    let err = run.save(&common::model_state(99, 1, 4), &SaveOptions::default().with_step(4)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert!(err.to_string().contains("step=4"), "{err}");
    let ckpt = run.checkpoint(4).unwrap();
    assert_eq!(ckpt.info().save_id, first.save_id);
    assert_eq!(ckpt.load(&LoadOptions::default()).unwrap(), common::model_state(4, 1, 4));
    let shards = std::fs::read_dir(dir.path().join("run/step-000000000004/shards")).unwrap().count();
    assert_eq!(shards, ckpt.manifest().files.len(), "the refused save left files behind");
}

#[test]
fn racing_saves_of_one_step_commit_exactly_once() {
    let run = Run::create("memory://commit/race").unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let run = run.clone();
                s.spawn(move || run.save(&common::model_state(i, 1, 8), &SaveOptions::default().with_step(7)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.kind(), ErrorKind::AlreadyExists);
    }
    let loaded = run.checkpoint(7).unwrap();
    assert_eq!(loaded.info().save_id, winners[0].save_id);
    loaded.load(&LoadOptions::default()).unwrap();
}

#[test]
fn open_a_given_step_and_missing_run_is_not_found() {
    let run = Run::create("memory://commit/steps").unwrap();
    run.save(&common::model_state(10, 1, 4), &SaveOptions::default().with_step(10)).unwrap();
    run.save(&common::model_state(20, 1, 4), &SaveOptions::default().with_step(20)).unwrap();
    assert_eq!(run.checkpoint(10).unwrap().load(&LoadOptions::default()).unwrap(), common::model_state(10, 1, 4));
    let err = cairn::load("/nonexistent/cairn/run", &LoadOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("/nonexistent/cairn/run"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let err = cairn::load(empty.path().to_str().unwrap(), &LoadOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[test]
fn saving_into_a_run_without_a_step_is_invalid() {
    let run = Run::create("memory://commit/nostep").unwrap();
    let err = run.save(&common::model_state(1, 1, 4), &SaveOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
}

#[test]
fn saving_where_the_disk_refuses_fails_cleanly_and_keeps_earlier_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (uri, run) = run_in(&dir);
    run.save(&common::model_state(1, 1, 4), &SaveOptions::default().with_step(1)).unwrap();
    // A file where the next checkpoint's folder should go makes every write fail.
    std::fs::write(dir.path().join("run/step-000000000002"), b"in the way").unwrap();
    let err = run.save(&common::model_state(2, 1, 4), &SaveOptions::default().with_step(2)).unwrap_err();
    assert!(err.to_string().contains("step-000000000002"), "{err}");
    let (state, info) = cairn::load(&uri, &LoadOptions::default()).unwrap();
    assert_eq!((info.step, state), (1, common::model_state(1, 1, 4)));
}

#[test]
fn listing_while_retention_deletes_never_fails() {
    let run = Run::create("memory://commit/list-race").unwrap();
    for step in 1..=40 {
        run.save(&common::model_state(step, 1, 2), &SaveOptions::default().with_step(step)).unwrap();
    }
    std::thread::scope(|s| {
        let deleter = s.spawn(|| {
            for step in 1..40 {
                run.delete(step).unwrap();
            }
        });
        while !deleter.is_finished() {
            let infos = run.infos().unwrap();
            assert!(infos.windows(2).all(|w| w[0].step < w[1].step));
        }
    });
    assert_eq!(run.infos().unwrap().iter().map(|i| i.step).collect::<Vec<_>>(), vec![40]);
}

#[test]
fn a_commit_that_failed_without_landing_is_tried_again() {
    use cairn::fault::{Fault, FaultStore};
    let inner: std::sync::Arc<dyn object_store::ObjectStore> =
        std::sync::Arc::new(object_store::memory::InMemory::new());
    let mut state = cairn::State::new();
    state.insert_tensor("w", cairn::Tensor::new(cairn::DType::U8, vec![3], vec![1, 2, 3]).unwrap());
    let opts = cairn::SaveOptions::default().with_step(5);
    let counter = std::sync::Arc::new(FaultStore::counting(inner.clone()));
    cairn::Run::at(cairn::Location::from_store(counter.clone(), "count://run")).save(&state, &opts).unwrap();
    // The last operation of a save is the create-only PUT of its manifest: fail it once
    // (a connection reset) in a fresh store; the save reads back, finds nothing, retries.
    let fresh: std::sync::Arc<dyn object_store::ObjectStore> =
        std::sync::Arc::new(object_store::memory::InMemory::new());
    let faulty = std::sync::Arc::new(FaultStore::new(fresh.clone(), counter.ops() - 1, Fault::Fail));
    let info = cairn::Run::at(cairn::Location::from_store(faulty, "fault://run")).save(&state, &opts).unwrap();
    assert_eq!(info.step, 5);
    let run = cairn::Run::at(cairn::Location::from_store(fresh, "memory://run"));
    assert_eq!(run.checkpoint(5).unwrap().load(&cairn::LoadOptions::default()).unwrap(), state);
}

#[test]
fn saving_refuses_what_loading_would_refuse_and_commits_nothing() {
    let uri = "memory://commit/refuse-what-load-refuses";
    let mut state = cairn::State::new();
    state.insert_tensor("w", cairn::Tensor::new(cairn::DType::U8, vec![1], vec![1]).unwrap());
    let big_structure = format!("[{}0]", "0,".repeat(cairn::format::manifest::STRUCTURE_SLACK_BYTES));
    let mut outsized = state.clone();
    outsized.set_structure(Some(big_structure));
    let mut many_maps = state.clone();
    let maps = (0..=cairn::format::manifest::MAX_VALUE_MAPS).map(|_| cairn::Value::Map(Default::default())).collect();
    many_maps.insert_value("v", cairn::Value::List(maps));
    let big_metadata = serde_json::json!(vec!["x"; cairn::format::manifest::MAX_METADATA_BYTES]);
    let cases = [
        (outsized, cairn::SaveOptions::default(), "structure of"),
        (many_maps, cairn::SaveOptions::default(), "maps"),
        (state, cairn::SaveOptions::default().with_metadata(big_metadata), "metadata is"),
    ];
    for (state, opts, needle) in cases {
        let err = cairn::save(uri, &state, &opts.with_step(1)).unwrap_err();
        assert_eq!(err.kind(), cairn::ErrorKind::Invalid, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        assert!(cairn::Run::open(uri).unwrap().list().unwrap().is_empty());
    }
}

#[test]
fn removing_a_run_deletes_what_cairn_wrote_and_keeps_the_users_files() {
    let dir = tempfile::tempdir().unwrap();
    let (uri, run) = run_in(&dir);
    for step in [1, 2] {
        run.save(&common::model_state(step, 1, 4), &SaveOptions::default().with_step(step)).unwrap();
    }
    // A killed save's leftovers go too.
    std::fs::create_dir_all(dir.path().join("run/step-000000000009/shards")).unwrap();
    std::fs::write(dir.path().join("run/step-000000000009/shards/x.safetensors"), b"partial").unwrap();
    run.remove().unwrap();
    assert!(!dir.path().join("run").exists());

    // A user's own file stays, and its folder with it; nothing of Cairn's does.
    let run = Run::create(&uri).unwrap();
    run.save(&common::model_state(3, 1, 4), &SaveOptions::default().with_step(3)).unwrap();
    std::fs::write(dir.path().join("run/notes.txt"), b"mine").unwrap();
    run.remove().unwrap();
    assert!(run.list().unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(dir.path().join("run")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
}
