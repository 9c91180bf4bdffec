//! Many writers: N ranks (threads here; processes in the Python tests) save one
//! checkpoint through the store alone or through collectives; M ranks load it back.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use cairn::dist::{save_distributed, CallbackExchange, Exchange, StoreExchange};
use cairn::format::layout;
use cairn::{DType, ErrorKind, LoadOptions, Location, Piece, Run, SaveOptions, State, Tensor, Value};
use proptest::prelude::*;

/// A global u16 tensor whose element i is i (mod 65536).
fn global(shape: &[u64]) -> Tensor {
    let n: u64 = shape.iter().product();
    Tensor::new(DType::U16, shape.to_vec(), (0..n).flat_map(|i| (i as u16).to_le_bytes()).collect::<Vec<u8>>()).unwrap()
}

/// The box (offsets, shape) of a global tensor from `global`.
fn cut(tensor: &Tensor, offsets: &[u64], shape: &[u64]) -> Tensor {
    let mut out = vec![0u8; shape.iter().product::<u64>() as usize * 2];
    cairn::geometry::copy_intersection(
        &mut out,
        offsets,
        shape,
        tensor.data(),
        &vec![0; shape.len()],
        tensor.shape(),
        2,
    );
    Tensor::new(DType::U16, shape.to_vec(), out).unwrap()
}

/// Splits `len` into `parts` contiguous ranges (some may be empty).
fn split(len: u64, parts: u64, i: u64) -> (u64, u64) {
    let lo = len * i / parts;
    let hi = len * (i + 1) / parts;
    (lo, hi - lo)
}

/// What rank `r` of `n` holds: rows of "rows" [8, 6], columns of "cols" [4, 8], and the
/// replicated "rep" [5] and "rep2" [3, 3].
fn rank_state(r: u64, n: u64) -> State {
    let mut state = State::new();
    state.insert_tensor("rep", global(&[5]));
    state.insert_tensor("rep2", global(&[3, 3]));
    if r == 0 {
        state.insert_value("step", Value::Int(42));
    }
    let (lo, len) = split(8, n, r);
    state.insert_piece(
        "rows",
        Piece { tensor: cut(&global(&[8, 6]), &[lo, 0], &[len, 6]), offsets: vec![lo, 0], global_shape: vec![8, 6] },
    );
    let (lo, len) = split(8, n, r);
    state.insert_piece(
        "cols",
        Piece { tensor: cut(&global(&[4, 8]), &[0, lo], &[4, len]), offsets: vec![0, lo], global_shape: vec![4, 8] },
    );
    state
}

fn save_with_store_exchange(run_uri: &str, n: u64, step: u64) -> Vec<cairn::Result<cairn::CheckpointInfo>> {
    let run = Run::create(run_uri).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let dir = run.location().child(&layout::step_dir(step));
                s.spawn(move || {
                    let state = rank_state(r, n);
                    let mut ex = StoreExchange::new(&dir, r as u32, n as u32, Duration::from_secs(30));
                    save_distributed(&dir, &state, step, &SaveOptions::default(), &mut ex)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check_loads_on(run_uri: &str, m: u64) {
    for r in 0..m {
        let (lo, len) = split(8, m, r);
        let (clo, clen) = split(8, m, r);
        let opts = LoadOptions::default().with_box("rows", vec![lo, 0], vec![len, 6]).with_box(
            "cols",
            vec![0, clo],
            vec![4, clen],
        );
        let (state, info) = cairn::load(run_uri, &opts).unwrap();
        assert_eq!(state.tensor("rows").unwrap(), &cut(&global(&[8, 6]), &[lo, 0], &[len, 6]), "rank {r} of {m}");
        assert_eq!(state.tensor("cols").unwrap(), &cut(&global(&[4, 8]), &[0, clo], &[4, clen]), "rank {r} of {m}");
        assert_eq!(state.tensor("rep").unwrap(), &global(&[5]));
        assert_eq!(state.value("step"), Some(&Value::Int(42)));
        assert_eq!(info.step, 7);
    }
}

#[test]
fn four_ranks_save_through_the_store_and_one_two_three_ranks_load() {
    let uri = "memory://dist/four";
    let results = save_with_store_exchange(uri, 4, 7);
    let ids: Vec<String> = results.into_iter().map(|r| r.unwrap().save_id).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "ranks disagree on the outcome");
    let (full, _) = cairn::load(uri, &LoadOptions::default()).unwrap();
    assert_eq!(full.tensor("rows").unwrap(), &global(&[8, 6]));
    assert_eq!(full.tensor("cols").unwrap(), &global(&[4, 8]));
    for m in 1..=3 {
        check_loads_on(uri, m);
    }
}

/// Every file and folder under `dir` (folders end with `/`).
fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let inner = walkdir(&path);
            if inner.is_empty() {
                out.push(path.join(""));
            }
            out.extend(inner);
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn four_ranks_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    let uri = dir.path().join("run");
    let results = save_with_store_exchange(uri.to_str().unwrap(), 4, 7);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    check_loads_on(uri.to_str().unwrap(), 3);
    let ckpt = cairn::open(uri.to_str().unwrap()).unwrap();
    assert_eq!(ckpt.manifest().writer.world_size, 4);
    assert!(ckpt.verify().unwrap().is_empty());

    // The committed folder holds the manifest and the shards it names, nothing else: no
    // coordination files (not even an empty folder for them).
    let folder = uri.join("step-000000000007");
    let mut on_disk: Vec<String> =
        walkdir(&folder).into_iter().map(|p| p.strip_prefix(&folder).unwrap().to_string_lossy().into_owned()).collect();
    on_disk.sort();
    let mut named: Vec<String> = ckpt.manifest().files.keys().cloned().chain(["manifest.json".to_string()]).collect();
    named.sort();
    assert_eq!(on_disk, named);

    // Inside the shard files, as docs/format.md says: a whole tensor is named by its key,
    // a piece of a sharded tensor `key@o0,o1`.
    let mut names = Vec::new();
    for file in ckpt.manifest().files.keys() {
        let bytes = std::fs::read(uri.join("step-000000000007").join(file)).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        names.extend(tensors.names().into_iter().map(str::to_string));
    }
    names.sort();
    let expected = ["cols@0,0", "cols@0,2", "cols@0,4", "cols@0,6", "rep", "rep2", "rows@0,0", "rows@2,0", "rows@4,0"];
    assert_eq!(names, [&expected[..], &["rows@6,0"]].concat());
}

#[test]
fn a_key_that_looks_like_a_piece_name_is_kept_apart_from_that_piece() {
    let uri = "memory://dist/names";
    let run = Run::create(uri).unwrap();
    let dir = run.step_location(1);
    let n = 2u64;
    std::thread::scope(|s| {
        for r in 0..n {
            let dir = dir.clone();
            s.spawn(move || {
                let mut state = rank_state(r, n);
                state.insert_tensor("rows@4,0", global(&[2]));
                let mut ex = StoreExchange::new(&dir, r as u32, n as u32, Duration::from_secs(30));
                save_distributed(&dir, &state, 1, &SaveOptions::default(), &mut ex).unwrap();
            });
        }
    });
    let (state, _) = cairn::load(uri, &LoadOptions::default()).unwrap();
    assert_eq!(state.tensor("rows").unwrap(), &global(&[8, 6]));
    assert_eq!(state.tensor("rows@4,0").unwrap(), &global(&[2]));
}

#[test]
fn one_process_holding_several_pieces_of_a_tensor_saves_them_as_a_job_of_one() {
    let uri = "memory://dist/alone";
    let mut state = State::new();
    for lo in [4, 0] {
        let piece =
            Piece { tensor: cut(&global(&[8, 6]), &[lo, 0], &[4, 6]), offsets: vec![lo, 0], global_shape: vec![8, 6] };
        state.insert_piece("rows", piece);
    }
    state.insert_tensor("rep", global(&[5]));
    let location = Location::open(uri).unwrap();
    let opts = SaveOptions::default().with_step(1);
    cairn::dist::save_as_rank(&location, &state, &opts, cairn::dist::Ranks::single(), None).unwrap();
    let (loaded, info) = cairn::load(uri, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.tensor("rows").unwrap(), &global(&[8, 6]));
    assert_eq!(loaded.tensor("rep").unwrap(), &global(&[5]));
    assert_eq!(info.step, 1);
    // Pieces that do not tile their tensor are refused, naming it, and nothing is committed.
    let mut holey = State::new();
    holey.insert_piece("t", Piece { tensor: global(&[2]), offsets: vec![0], global_shape: vec![4] });
    let err =
        cairn::dist::save_as_rank(&location, &holey, &opts.clone().with_step(2), cairn::dist::Ranks::single(), None)
            .unwrap_err();
    assert!(err.to_string().contains("`t`"), "{err}");
    assert_eq!(Run::open(uri).unwrap().list().unwrap().len(), 1);
}

#[test]
fn replicated_tensors_are_written_once_and_balanced() {
    let n = 4u32;
    let run = Run::create("memory://dist/balance").unwrap();
    let dir = run.location().child(&layout::step_dir(1));
    std::thread::scope(|s| {
        for r in 0..n {
            let dir = dir.clone();
            s.spawn(move || {
                let mut state = State::new();
                for i in 0..8 {
                    state.insert_tensor(format!("rep.{i}"), global(&[64]));
                }
                let mut ex = StoreExchange::new(&dir, r, n, Duration::from_secs(30));
                save_distributed(&dir, &state, 1, &SaveOptions::default(), &mut ex).unwrap();
            });
        }
    });
    let manifest = run.checkpoint(1).unwrap().manifest().clone();
    let mut per_rank = BTreeMap::new();
    for t in manifest.tensors.values() {
        assert_eq!(t.pieces.len(), 1, "a replicated tensor written more than once");
        *per_rank.entry(t.pieces[0].file[7..13].to_string()).or_insert(0) += 1;
    }
    assert_eq!(per_rank.values().copied().collect::<Vec<_>>(), vec![2, 2, 2, 2], "{per_rank:?}");
}

#[test]
fn a_missing_rank_commits_nothing_and_the_next_save_succeeds() {
    let uri = "memory://dist/missing";
    let run = Run::create(uri).unwrap();
    let dir = run.location().child(&layout::step_dir(3));
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3u64) // rank 3 of 4 never shows up (it died)
            .map(|r| {
                let dir = dir.clone();
                s.spawn(move || {
                    let state = rank_state(r, 4);
                    let mut ex = StoreExchange::new(&dir, r as u32, 4, Duration::from_millis(600));
                    save_distributed(&dir, &state, 3, &SaveOptions::default(), &mut ex)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        let err = r.as_ref().unwrap_err();
        assert!(err.to_string().contains("timed out waiting for ranks [3]"), "{err}");
    }
    assert!(run.list().unwrap().is_empty(), "a partial checkpoint was committed");
    let again = save_with_store_exchange(uri, 4, 3);
    assert!(again.iter().all(|r| r.is_ok()), "{again:?}");
    // The dead attempt wrote no shard (it failed in the first round); its coordination
    // files were cleared by the retry, whose own were cleared by its commit.
    let left = run.orphans(Duration::ZERO).unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert!(run.checkpoint(3).unwrap().verify().unwrap().is_empty());
}

#[test]
fn a_committed_save_leaves_no_coordination_files_and_a_late_rank_learns_the_outcome() {
    use object_store::ObjectStoreExt;
    let uri = "memory://dist/cleared";
    let results = save_with_store_exchange(uri, 4, 7);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let run = Run::open(uri).unwrap();
    let dir = run.step_location(7);
    let listed: Vec<String> = cairn::runtime::block_on(async {
        let metas: Vec<_> = futures::TryStreamExt::try_collect(dir.store().list(Some(dir.prefix()))).await.unwrap();
        Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
    })
    .unwrap();
    assert!(listed.iter().all(|p| !p.contains(layout::COORD_DIR)), "{listed:?}");

    // A rank that reads its round only after rank 0 committed and cleared the folder: it
    // finds the attempt pointer gone and the manifest carrying its attempt, so it succeeds.
    let dir = run.step_location(8);
    let coord = dir.child(layout::COORD_DIR);
    let attempt = "00112233445566778899aabbccddeeff";
    cairn::runtime::block_on(async {
        coord
            .store()
            .put(&coord.path("attempt"), object_store::PutPayload::from_static(attempt.as_bytes()))
            .await
            .unwrap();
        Ok(())
    })
    .unwrap();
    let mut late = StoreExchange::new(&dir, 1, 2, Duration::from_secs(5));
    assert_eq!(late.begin().unwrap(), attempt);
    let mut state = State::new();
    state.insert_tensor("w", global(&[3]));
    cairn::save_at(&dir, &state, &SaveOptions::default()).unwrap();
    cairn::runtime::block_on(async {
        let manifest = dir.path("manifest.json");
        let bytes = dir.store().get(&manifest).await.unwrap().bytes().await.unwrap();
        let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        json["save_id"] = attempt.into();
        dir.store().put(&manifest, serde_json::to_vec(&json).unwrap().into()).await.unwrap();
        coord.store().delete(&coord.path("attempt")).await.unwrap();
        // Rank 0 gave up on some other rank in the last round, after its commit.
        let abort = coord.path(&format!("{attempt}/abort"));
        coord.store().put(&abort, object_store::PutPayload::from_static(b"timed out")).await.unwrap();
        Ok(())
    })
    .unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(late.all_gather("outcome", b"{}".to_vec()).unwrap(), cairn::dist::Gathered::Committed));
    assert!(started.elapsed() < Duration::from_secs(5), "waited out the timeout");
}

#[test]
fn a_rank_without_a_state_fails_the_save_on_every_rank_at_once_and_a_retry_works() {
    use cairn::dist::{refuse_as_rank, save_as_rank, Ranks};
    let uri = "memory://dist/refused";
    let run = Run::create(uri).unwrap();
    let opts = SaveOptions::default().with_step(7);
    let started = std::time::Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3u64)
            .map(|r| {
                let (run, opts) = (&run, &opts);
                s.spawn(move || {
                    let ranks = Ranks { rank: r as u32, world_size: 3, timeout: Duration::from_secs(60) };
                    if r == 2 {
                        let reason = cairn::Error::new(ErrorKind::Invalid, "cannot read tensor key=`opt.m`");
                        return Err(refuse_as_rank(run.location(), opts, ranks, None, &reason).to_string());
                    }
                    save_as_rank(run.location(), &rank_state(r, 3), opts, ranks, None)
                        .map(drop)
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Every rank fails in the first round (not after the 60 s timeout), naming rank 2.
    assert!(started.elapsed() < Duration::from_secs(30), "waited out the timeout");
    for result in &results {
        let err = result.as_ref().unwrap_err();
        assert!(err.contains("rank 2 could not take part") && err.contains("key=`opt.m`"), "{err}");
    }
    assert!(run.list().unwrap().is_empty());
    let again = save_with_store_exchange(uri, 3, 7);
    assert!(again.iter().all(|r| r.is_ok()), "{again:?}");
    check_loads_on(uri, 2);
}

#[test]
fn a_rank_whose_pieces_are_invalid_fails_the_save_on_every_rank_at_once() {
    let uri = "memory://dist/bad-piece";
    let run = Run::create(uri).unwrap();
    let started = std::time::Instant::now();
    let results: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3u64)
            .map(|r| {
                let dir = run.location().child(&layout::step_dir(4));
                s.spawn(move || {
                    let mut state = rank_state(r, 3);
                    if r == 1 {
                        let outside = Piece { tensor: global(&[2]), offsets: vec![9], global_shape: vec![10] };
                        state.insert_piece("bad", outside);
                    }
                    let mut ex = StoreExchange::new(&dir, r as u32, 3, Duration::from_secs(60));
                    save_distributed(&dir, &state, 4, &SaveOptions::default(), &mut ex).unwrap_err().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(started.elapsed() < Duration::from_secs(30), "waited out the timeout");
    for err in &results {
        assert!(err.contains("rank 1 could not take part") && err.contains("key=`bad`"), "{err}");
    }
    assert!(run.list().unwrap().is_empty());
}

#[test]
fn a_stale_attempt_from_a_crashed_save_is_superseded() {
    let uri = "memory://dist/stale";
    let run = Run::create(uri).unwrap();
    let coord = run.location().child("step-000000000007/.cairn-coord");
    cairn::runtime::block_on(async move {
        use object_store::ObjectStoreExt;
        coord
            .store()
            .put(&coord.path("attempt"), object_store::PutPayload::from_static(b"0123456789abcdef"))
            .await
            .unwrap();
        Ok(())
    })
    .unwrap();
    let results = save_with_store_exchange(uri, 3, 7);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    check_loads_on(uri, 2);
}

#[test]
fn ranks_that_disagree_all_get_the_same_clear_error() {
    let run = Run::create("memory://dist/disagree").unwrap();
    let dir = run.location().child(&layout::step_dir(1));
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u32)
            .map(|r| {
                let dir = dir.clone();
                s.spawn(move || {
                    // Pieces of one sharded tensor whose global shapes differ (whole
                    // tensors that differ are each rank's own, see below).
                    let mut state = State::new();
                    let piece =
                        Piece { tensor: global(&[2]), offsets: vec![2 * r as u64], global_shape: vec![4 + r as u64] };
                    state.insert_piece("w", piece);
                    let mut ex = StoreExchange::new(&dir, r, 2, Duration::from_secs(30));
                    save_distributed(&dir, &state, 1, &SaveOptions::default(), &mut ex)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        let err = r.as_ref().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(err.to_string().contains("ranks disagree on tensor key=`w`"), "{err}");
    }
}

#[test]
fn holes_in_the_saved_coverage_are_refused_on_every_rank() {
    let run = Run::create("memory://dist/holes").unwrap();
    let dir = run.location().child(&layout::step_dir(1));
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u32)
            .map(|r| {
                let dir = dir.clone();
                s.spawn(move || {
                    // Each rank holds 2 rows of an 8-row tensor: rows 4..8 are missing.
                    let lo = 2 * r as u64;
                    let slice = Piece {
                        tensor: cut(&global(&[8, 2]), &[lo, 0], &[2, 2]),
                        offsets: vec![lo, 0],
                        global_shape: vec![8, 2],
                    };
                    let mut state = State::new();
                    state.insert_piece("w", slice);
                    let mut ex = StoreExchange::new(&dir, r, 2, Duration::from_secs(30));
                    save_distributed(&dir, &state, 1, &SaveOptions::default(), &mut ex)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        let err = r.as_ref().unwrap_err();
        assert!(err.to_string().contains("cover 8 of 16 elements tensor=`w`"), "{err}");
    }
    assert!(run.list().unwrap().is_empty());

    // Retrying the step just works: no rank replays the failed attempt, none waits it out.
    let started = std::time::Instant::now();
    let retried: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u32)
            .map(|r| {
                let dir = dir.clone();
                s.spawn(move || {
                    let lo = 4 * r as u64;
                    let piece = Piece {
                        tensor: cut(&global(&[8, 2]), &[lo, 0], &[4, 2]),
                        offsets: vec![lo, 0],
                        global_shape: vec![8, 2],
                    };
                    let mut state = State::new();
                    state.insert_piece("w", piece);
                    let mut ex = StoreExchange::new(&dir, r, 2, Duration::from_secs(20));
                    save_distributed(&dir, &state, 1, &SaveOptions::default(), &mut ex)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(retried.iter().all(|r| r.is_ok()), "{retried:?}");
    assert!(started.elapsed() < Duration::from_secs(15), "the retry waited out a timeout");
    assert_eq!(
        cairn::load("memory://dist/holes", &LoadOptions::default()).unwrap().0.tensor("w").unwrap(),
        &global(&[8, 2])
    );
}

/// Runs `n` ranks over a shared collective; rank r saves `step_of(r)` into `dir_of(r)` as
/// rank r of `world_of(r)`.
fn save_over_collective(
    n: usize,
    world_of: impl Fn(usize) -> u32 + Sync,
    dir_of: impl Fn(usize) -> Location + Sync,
    step_of: impl Fn(usize) -> u64 + Sync,
) -> Vec<cairn::Result<cairn::CheckpointInfo>> {
    let (barrier, slots) = collective(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let (barrier, slots) = (barrier.clone(), slots.clone());
                let (world, dir, step) = (world_of(r), dir_of(r), step_of(r));
                s.spawn(move || {
                    let mut ex = CallbackExchange::new(r as u32, world, |payload: Vec<u8>| {
                        slots.lock().unwrap()[r] = payload;
                        barrier.wait();
                        let all = slots.lock().unwrap().clone();
                        barrier.wait();
                        Ok(all)
                    });
                    save_distributed(&dir, &rank_state(r as u64, n as u64), step, &SaveOptions::default(), &mut ex)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn ranks_that_disagree_on_world_size_step_or_destination_commit_nothing_on_every_rank() {
    let run = Run::create("memory://dist/terms").unwrap();
    let cases: [(&str, usize); 3] = [("world_size 4", 2), ("step 8", 1), ("destination", 1)];
    for (what, odd) in cases {
        let results = save_over_collective(
            3,
            |r| if what.starts_with("world") && r == odd { 4 } else { 3 },
            |r| if what == "destination" && r == odd { run.step_location(70) } else { run.step_location(7) },
            |r| if what == "step 8" && r == odd { 8 } else { 7 },
        );
        for (r, result) in results.iter().enumerate() {
            let err = result.as_ref().expect_err(what);
            assert_eq!(err.kind(), ErrorKind::Invalid, "rank {r}: {err}");
            assert!(err.to_string().contains(&format!("rank {odd} saves with")), "rank {r}: {err}");
            assert!(err.to_string().contains(what), "rank {r}: {err}");
        }
        assert!(run.list().unwrap().is_empty(), "{what}");
    }
}

#[test]
fn a_rank_whose_files_rank_0_cannot_see_commits_nothing() {
    // Rank 1 writes into another store under the same URI: its files are not where the
    // manifest would say.
    let shared: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let elsewhere: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let at =
        |store: &Arc<dyn object_store::ObjectStore>| Location::from_store(store.clone(), "memory://dist/unseen/step-7");
    let results = save_over_collective(2, |_| 2, |r| if r == 1 { at(&elsewhere) } else { at(&shared) }, |_| 7);
    for result in &results {
        let err = result.as_ref().unwrap_err();
        assert!(err.to_string().contains("not in the checkpoint folder"), "{err}");
    }
    let run = Run::at(Location::from_store(shared, "memory://dist/unseen"));
    assert!(run.list().unwrap().is_empty());
}

#[test]
fn a_request_outside_the_global_shape_is_refused() {
    let uri = "memory://dist/outside";
    save_with_store_exchange(uri, 2, 7).into_iter().for_each(|r| {
        r.unwrap();
    });
    let err = cairn::load(uri, &LoadOptions::default().with_box("rows", vec![6, 0], vec![4, 6])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.to_string().contains("key=`rows`"), "{err}");
}

/// Every rank's slot of an in-process all-gather.
type Slots = Arc<Mutex<Vec<Vec<u8>>>>;

/// An in-process all-gather, standing in for the caller's collectives.
fn collective(n: usize) -> (Arc<Barrier>, Slots) {
    (Arc::new(Barrier::new(n)), Arc::new(Mutex::new(vec![Vec::new(); n])))
}

#[test]
fn collectives_coordinate_instead_of_the_store() {
    let n = 3usize;
    let (barrier, slots) = collective(n);
    let run = Run::create("memory://dist/collective").unwrap();
    let dir = run.location().child(&layout::step_dir(7));
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let (barrier, slots, dir) = (barrier.clone(), slots.clone(), dir.clone());
                s.spawn(move || {
                    let mut ex = CallbackExchange::new(r as u32, n as u32, |payload: Vec<u8>| {
                        slots.lock().unwrap()[r] = payload;
                        barrier.wait();
                        let all = slots.lock().unwrap().clone();
                        barrier.wait();
                        Ok(all)
                    });
                    assert_eq!(ex.world_size(), 3);
                    let state = rank_state(r as u64, n as u64);
                    save_distributed(&dir, &state, 7, &SaveOptions::default(), &mut ex).unwrap().save_id
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
    check_loads_on("memory://dist/collective", 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_save_sharding_loads_bit_exact_on_any_load_sharding(
        shape in prop::collection::vec(1u64..7, 1..4),
        save_ranks in 1u64..5,
        load_ranks in 1u64..5,
        save_dim in 0usize..3,
        load_dim in 0usize..3,
    ) {
        static CASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let uri = format!("memory://dist-prop/{}", CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let (save_dim, load_dim) = (save_dim % shape.len(), load_dim % shape.len());
        let full = global(&shape);
        let run = Run::create(&uri).unwrap();
        let dir = run.location().child(&layout::step_dir(1));
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..save_ranks).map(|r| {
                let (dir, shape, full) = (dir.clone(), shape.clone(), full.clone());
                s.spawn(move || {
                    let (lo, len) = split(shape[save_dim], save_ranks, r);
                    let mut state = State::new();
                    if len > 0 {
                        let mut off = vec![0; shape.len()];
                        let mut sub = shape.clone();
                        off[save_dim] = lo;
                        sub[save_dim] = len;
                        state.insert_piece("t", Piece { tensor: cut(&full, &off, &sub), offsets: off, global_shape: shape.clone() });
                    }
                    let mut ex = StoreExchange::new(&dir, r as u32, save_ranks as u32, Duration::from_secs(30));
                    save_distributed(&dir, &state, 1, &SaveOptions::default(), &mut ex)
                })
            }).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        prop_assert!(results.iter().all(|r| r.is_ok()), "{:?}", results);
        for r in 0..load_ranks {
            let (lo, len) = split(shape[load_dim], load_ranks, r);
            if len == 0 { continue; }
            let mut off = vec![0; shape.len()];
            let mut sub = shape.clone();
            off[load_dim] = lo;
            sub[load_dim] = len;
            let (state, _) = cairn::load(&uri, &LoadOptions::default().with_box("t", off.clone(), sub.clone())).unwrap();
            prop_assert_eq!(state.tensor("t").unwrap(), &cut(&full, &off, &sub));
        }
        let _ = Location::open(&uri);
    }
}

#[test]
fn save_as_rank_routes_one_rank_to_a_plain_save_and_refuses_a_rank_out_of_range() {
    use cairn::dist::{save_as_rank, Ranks};
    let location = cairn::Location::create("memory://dist/route").unwrap();
    let state = common::model_state(3, 1, 2);
    let opts = cairn::SaveOptions::default().with_step(3);
    let info = save_as_rank(&location, &state, &opts, Ranks::single(), None).unwrap();
    assert_eq!(info.step, 3);
    assert!(info.uri.ends_with("step-000000000003"), "{}", info.uri);
    let out_of_range = Ranks { rank: 2, world_size: 2, ..Ranks::single() };
    let err = save_as_rank(&location, &state, &opts.with_step(4), out_of_range, None).unwrap_err();
    assert_eq!(err.kind(), cairn::ErrorKind::Invalid);
    assert!(err.to_string().contains("rank 2 is not below world_size 2"), "{err}");
}

#[test]
fn store_coordination_costs_requests_linear_in_the_ranks() {
    use cairn::fault::FaultStore;
    let mut measured = Vec::new();
    for n in [8u64, 16, 48] {
        let counter = Arc::new(FaultStore::counting(Arc::new(object_store::memory::InMemory::new())));
        let run = Run::at(Location::from_store(counter.clone(), format!("count://dist/linear-{n}")));
        let dir = run.step_location(1);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|r| {
                    let dir = dir.clone();
                    s.spawn(move || {
                        let mut state = State::new();
                        state
                            .insert_piece("t", Piece { tensor: global(&[1]), offsets: vec![r], global_shape: vec![n] });
                        let mut ex = StoreExchange::new(&dir, r as u32, n as u32, Duration::from_secs(60));
                        save_distributed(&dir, &state, 1, &SaveOptions::default(), &mut ex)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        measured.push((n, counter.ops()));
    }
    eprintln!("store requests of one save by N ranks (N, requests): {measured:?}");
    // Every rank reading every other rank's message would take at least 3 N^2 requests
    // (6,912 at N = 48); the store exchange takes a few dozen per rank.
    let (n, ops) = measured[2];
    assert!(ops < 100 * n, "{ops} requests for {n} ranks");
}

#[test]
fn each_rank_gets_back_its_own_plain_values_and_any_rank_on_request() {
    let uri = "memory://dist/per-rank";
    let run = Run::create(uri).unwrap();
    let dir = run.step_location(2);
    std::thread::scope(|s| {
        for r in 0..3u64 {
            let dir = dir.clone();
            s.spawn(move || {
                let mut state = rank_state(r, 3);
                state.insert_value("loader.pos", Value::Int(10 * r as i64));
                if r == 2 {
                    state.insert_value("only.two", Value::Str("mine".into()));
                }
                if r == 1 {
                    state.insert_value("step", Value::Int(42)); // the same as rank 0's
                }
                let mut ex = StoreExchange::new(&dir, r as u32, 3, Duration::from_secs(30));
                save_distributed(&dir, &state, 2, &SaveOptions::default(), &mut ex).unwrap();
            });
        }
    });
    let ckpt = cairn::open(uri).unwrap();
    assert_eq!(ckpt.manifest().ranks.keys().collect::<Vec<_>>(), ["1", "2"], "only ranks that differ from rank 0");
    for r in 0..3u32 {
        let (state, _) = cairn::load(uri, &LoadOptions::default().with_rank(r)).unwrap();
        assert_eq!(state.value("loader.pos"), Some(&Value::Int(10 * r as i64)), "rank {r}");
        assert_eq!(state.value("only.two").is_some(), r == 2, "rank {r}");
        assert_eq!(state.tensor("rows").unwrap(), &global(&[8, 6]), "tensors are shared");
    }
    let (default, _) = cairn::load(uri, &LoadOptions::default()).unwrap();
    assert_eq!(default.value("loader.pos"), Some(&Value::Int(0)), "rank 0's by default");
    // A rank that did not save (or saved what rank 0 did) reads rank 0's.
    let (other, _) = cairn::load(uri, &LoadOptions::default().with_rank(7)).unwrap();
    assert_eq!(other.value("loader.pos"), Some(&Value::Int(0)));
}

#[test]
fn a_simulated_10000_rank_fsdp_manifest_is_within_every_limit() {
    // Two layers of the 7B-class layout, with Adam, saved by 10,000 FSDP ranks (the bench
    // `scale` times the whole model): the writer's encoding and the reader's validation
    // accept it, and every piece is where Shard(0) puts it.
    let manifest = common::simulated_fsdp_manifest(10_000, 2, true);
    let bytes = manifest.encode().unwrap();
    let read = cairn::format::manifest::Manifest::decode(&bytes, "simulated").unwrap();
    assert_eq!(read.writer.world_size, 10_000);
    let embed = &read.tensors["model.embed_tokens.weight"];
    assert_eq!(embed.pieces.len(), 8000, "32000 rows in chunks of 4");
    assert_eq!((embed.pieces[7999].offsets[0], embed.pieces[7999].shape[0]), (31_996, 4));
    let gate = &read.tensors["optim.state.model.layers.1.mlp.gate_proj.weight.exp_avg_sq"];
    assert_eq!(gate.pieces.len(), 5504, "11008 rows in chunks of 2");
    let pieces: usize = read.tensors.values().map(|t| t.pieces.len()).sum();
    assert_eq!(pieces, 3 * (8000 * 2 + 2 * (7 * 4096 + 2 * 5504) + 4096));
    assert_eq!(read.files.len(), 8000);
}

#[test]
fn each_rank_gets_back_its_own_tensors_and_replicated_ones_are_written_once() {
    let uri = "memory://dist/per-rank-tensors";
    let run = Run::create(uri).unwrap();
    let dir = run.step_location(3);
    let rng = |r: u64| Tensor::new(DType::U8, vec![4], vec![r as u8 * 10; 4]).unwrap();
    std::thread::scope(|s| {
        for r in 0..4u64 {
            let dir = dir.clone();
            s.spawn(move || {
                let mut state = rank_state(r, 4);
                // Ranks 0 and 3 happen to hold the same RNG state; 1 and 2 their own.
                state.insert_tensor("rng", rng(if r == 3 { 0 } else { r }));
                if r > 0 {
                    // A buffer only ranks 1..3 hold, of another length on each.
                    state.insert_tensor("buf", Tensor::new(DType::U8, vec![r], vec![r as u8; r as usize]).unwrap());
                }
                let mut ex = StoreExchange::new(&dir, r as u32, 4, Duration::from_secs(30));
                save_distributed(&dir, &state, 3, &SaveOptions::default(), &mut ex).unwrap();
            });
        }
    });
    let ckpt = cairn::open(uri).unwrap();
    let manifest = ckpt.manifest();
    // Shared: rank 0's rng, and the lowest holder's buf (rank 1's).
    assert_eq!(manifest.tensors["rng"].pieces.len(), 1);
    assert_eq!(manifest.tensors["buf"].shape, vec![1]);
    let own = |r: &str| manifest.ranks.get(r).map(|rec| rec.tensors.keys().cloned().collect::<Vec<_>>());
    assert_eq!(own("1"), Some(vec!["rng".to_string()]));
    assert_eq!(own("2"), Some(vec!["buf".to_string(), "rng".to_string()]));
    assert_eq!(own("3"), Some(vec!["buf".to_string()]), "rank 3's rng is rank 0's: not kept twice");
    // The replicated tensors (held by all four) are still written once.
    assert_eq!(manifest.tensors["rep"].pieces.len(), 1);
    for r in 0..4u64 {
        let (state, _) = cairn::load(uri, &LoadOptions::default().with_rank(r as u32)).unwrap();
        assert_eq!(state.tensor("rng").unwrap(), &rng(if r == 3 { 0 } else { r }), "rank {r}");
        let buf = state.tensor("buf").unwrap();
        assert_eq!(buf.shape(), [r.max(1)], "rank {r} (rank 0, which held none, reads rank 1's)");
        assert_eq!(state.tensor("rep").unwrap(), &global(&[5]));
    }
    // A box of a rank's own tensor, and a required shape, are that rank's.
    let opts = LoadOptions::default().with_rank(2).with_box("buf", vec![1], vec![1]).with_shape("buf", vec![2]);
    assert_eq!(cairn::load(uri, &opts).unwrap().0.tensor("buf").unwrap().data().as_ref(), &[2]);
    assert!(ckpt.verify().unwrap().is_empty());
}

#[test]
fn a_tensor_whole_on_one_rank_and_in_pieces_on_another_is_refused_on_every_rank() {
    let dir = Run::create("memory://dist/whole-and-pieces").unwrap().step_location(1);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u64)
            .map(|r| {
                let dir = dir.clone();
                s.spawn(move || {
                    let mut state = State::new();
                    if r == 0 {
                        state.insert_tensor("w", global(&[4]));
                    } else {
                        state
                            .insert_piece("w", Piece { tensor: global(&[2]), offsets: vec![2], global_shape: vec![4] });
                    }
                    let mut ex = StoreExchange::new(&dir, r as u32, 2, Duration::from_secs(30));
                    save_distributed(&dir, &state, 1, &SaveOptions::default(), &mut ex)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        let err = r.as_ref().unwrap_err();
        assert!(err.to_string().contains("rank 0 holds tensor key=`w` whole, rank 1 holds pieces of it"), "{err}");
    }
}
