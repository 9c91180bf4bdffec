//! One storage conformance suite, one test per behaviour, run against every store:
//! memory, local disk, and S3 (a real SeaweedFS server; `--features s3-tests`).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn::manager::{CheckpointManager, ManagerOptions, SaveRequest};
use cairn::policy::{Every, Retention, SavePolicy};
use cairn::{transfer, ErrorKind, LoadOptions, Location, Run, SaveOptions};
use object_store::{ObjectStoreExt, PutPayload};

fn unique(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn local_uri(name: &str) -> String {
    std::env::temp_dir().join("cairn-conformance").join(unique(name)).to_str().unwrap().to_string()
}

fn opts(step: u64) -> SaveOptions {
    SaveOptions::default().with_step(step)
}

fn put_raw(run: &Run, path: &str, data: &'static [u8]) {
    let loc = run.location().clone();
    cairn::runtime::block_on(async move {
        loc.store().put(&loc.path(path), PutPayload::from_static(data)).await.unwrap();
        Ok(())
    })
    .unwrap();
}

macro_rules! conformance {
    ($store:ident, $uri:expr) => {
        mod $store {
            use super::*;

            fn run(name: &str) -> (String, Run) {
                let uri: String = $uri(name);
                let run = Run::create(&uri).unwrap();
                (uri, run)
            }

            #[test]
            fn save_then_load_is_bit_exact() {
                let (uri, run) = run("roundtrip");
                let state = common::model_state(3, 3, 32);
                run.save(&state, &opts(3).with_shard_bytes(8 << 10)).unwrap();
                let (loaded, info) = cairn::load(&uri, &LoadOptions::default()).unwrap();
                assert_eq!((info.step, loaded), (3, state));
            }

            #[test]
            fn list_is_in_step_order() {
                let (_, run) = run("list");
                for step in [20, 3, 100] {
                    run.save(&common::model_state(step, 1, 4), &opts(step)).unwrap();
                }
                let steps: Vec<u64> = run.list().unwrap().iter().map(|c| c.step).collect();
                assert_eq!(steps, vec![3, 20, 100]);
            }

            #[test]
            fn latest_is_the_highest_committed_step() {
                let (_, run) = run("latest");
                assert!(run.latest().unwrap().is_none());
                run.save(&common::model_state(9, 1, 4), &opts(9)).unwrap();
                run.save(&common::model_state(4, 1, 4), &opts(4)).unwrap();
                assert_eq!(run.latest().unwrap().unwrap().info().step, 9);
            }

            #[test]
            fn uncommitted_step_is_invisible() {
                let (uri, run) = run("uncommitted");
                run.save(&common::model_state(1, 1, 4), &opts(1)).unwrap();
                put_raw(&run, "step-000000000002/shards/r00000-00000-of-00001-x.safetensors", b"partial");
                assert_eq!(run.list().unwrap().len(), 1);
                assert_eq!(cairn::load(&uri, &LoadOptions::default()).unwrap().1.step, 1);
                assert_eq!(run.checkpoint(2).unwrap_err().kind(), ErrorKind::NotFound);
            }

            #[test]
            fn committed_step_is_never_overwritten() {
                let (_, run) = run("no-overwrite");
                let first = run.save(&common::model_state(5, 1, 4), &opts(5)).unwrap();
                let err = run.save(&common::model_state(6, 1, 4), &opts(5)).unwrap_err();
                assert_eq!(err.kind(), ErrorKind::AlreadyExists);
                assert_eq!(run.checkpoint(5).unwrap().info().save_id, first.save_id);
            }

            #[test]
            fn racing_commits_have_exactly_one_winner() {
                let (_, run) = run("race");
                let results: Vec<_> = std::thread::scope(|s| {
                    let handles: Vec<_> = (0..3)
                        .map(|i| {
                            let run = run.clone();
                            s.spawn(move || run.save(&common::model_state(i, 1, 16), &opts(8)))
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
                assert_eq!(winners.len(), 1, "{results:?}");
                let ckpt = run.checkpoint(8).unwrap();
                assert_eq!(ckpt.info().save_id, winners[0].save_id);
                assert!(ckpt.verify().unwrap().is_empty());
            }

            #[test]
            fn delete_removes_the_commit_and_the_data() {
                let (_, run) = run("delete");
                run.save(&common::model_state(1, 1, 4), &opts(1)).unwrap();
                run.save(&common::model_state(2, 1, 4), &opts(2)).unwrap();
                run.delete(1).unwrap();
                assert_eq!(run.list().unwrap().iter().map(|c| c.step).collect::<Vec<_>>(), vec![2]);
                assert!(run.prune_orphans(Duration::ZERO).unwrap().is_empty(), "data left after delete");
            }

            #[test]
            fn prune_removes_unfinished_saves_only() {
                let (_, run) = run("prune");
                run.save(&common::model_state(1, 1, 4), &opts(1)).unwrap();
                put_raw(&run, "step-000000000002/shards/r00000-00000-of-00001-dead.safetensors", b"x");
                put_raw(&run, "step-000000000001/shards/r00000-00000-of-00001-zombie.safetensors", b"x");
                assert!(run.prune_orphans(Duration::from_secs(3600)).unwrap().is_empty(), "pruned a fresh save");
                let removed = run.prune_orphans(Duration::ZERO).unwrap();
                assert_eq!(removed.len(), 2, "{removed:?}");
                assert!(run.checkpoint(1).unwrap().verify().unwrap().is_empty());
            }

            #[test]
            fn retention_keeps_the_last_n() {
                let (uri, _) = run("retention");
                let opts = ManagerOptions::default()
                    .with_policy(SavePolicy::steps(vec![Every::new(1)]).unwrap())
                    .with_retention(Retention { keep_last: Some(2), ..Default::default() })
                    .with_preemption_signal(None);
                let manager = CheckpointManager::open(&uri, opts).unwrap();
                for step in 1..=5 {
                    manager.on_step(step, &common::model_state(step, 1, 4), SaveRequest::default()).unwrap();
                }
                manager.wait().unwrap();
                assert_eq!(manager.list().unwrap().iter().map(|i| i.step).collect::<Vec<_>>(), vec![4, 5]);
            }

            #[test]
            fn selective_load_reads_only_requested_keys() {
                let (uri, run) = run("select");
                run.save(&common::model_state(1, 2, 8), &opts(1)).unwrap();
                let (state, _) = cairn::load(&uri, &LoadOptions::default().with_prefix("model.layers.1.")).unwrap();
                assert_eq!(state.len(), 2);
            }

            #[test]
            fn large_shards_go_up_in_parts() {
                let (uri, run) = run("multipart");
                let state = common::model_state(2, 4, 512); // ~6 MiB in one shard
                let save = opts(2).with_shard_bytes(64 << 20).with_multipart(1 << 20, 5 << 20);
                run.save(&state, &save).unwrap();
                assert_eq!(cairn::load(&uri, &LoadOptions::default()).unwrap().0, state);
            }

            #[test]
            fn flipped_byte_is_detected() {
                let (uri, run) = run("corrupt");
                run.save(&common::model_state(1, 1, 8), &opts(1)).unwrap();
                let ckpt = run.checkpoint(1).unwrap();
                let (file, piece) = {
                    let t = &ckpt.manifest().tensors["model.layers.0.weight"];
                    (t.pieces[0].file.clone(), t.pieces[0].range)
                };
                let loc = ckpt.location().clone();
                cairn::runtime::block_on(async move {
                    let path = loc.path(&file);
                    let mut bytes = loc.store().get(&path).await.unwrap().bytes().await.unwrap().to_vec();
                    bytes[piece[0] as usize] ^= 0x40;
                    loc.store().put(&path, bytes.into()).await.unwrap();
                    Ok(())
                })
                .unwrap();
                let err = cairn::load(&uri, &LoadOptions::default()).unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Corrupt);
                assert!(err.to_string().contains("tensor=`model.layers.0.weight`"), "{err}");
                assert_eq!(ckpt.verify().unwrap().len(), 1);
            }

            #[test]
            fn copy_to_another_store_is_verified_and_resumable() {
                let (_, run) = run("copy-src");
                run.save(&common::model_state(4, 2, 16), &opts(4)).unwrap();
                let dst = Run::create(&local_uri("copy-dst")).unwrap();
                let copied = transfer::copy_run(&run, &dst, &cairn::progress::quiet).unwrap();
                assert_eq!(copied.len(), 1);
                assert_eq!(
                    transfer::copy_run(&run, &dst, &cairn::progress::quiet).unwrap().len(),
                    1,
                    "re-running a copy is a no-op"
                );
                let back = Run::create(&$uri("copy-back")).unwrap();
                // Progress: every byte of the data files copied, then verified there.
                let told = std::sync::Mutex::new(Vec::new());
                let tell = |stage, bytes| told.lock().unwrap().push((stage, bytes));
                transfer::copy_run(&dst, &back, &tell).unwrap();
                let state = back.checkpoint(4).unwrap().load(&LoadOptions::default()).unwrap();
                assert_eq!(state, common::model_state(4, 2, 16));
                let data: u64 = back.checkpoint(4).unwrap().manifest().files.values().map(|f| f.size).sum();
                let told = told.into_inner().unwrap();
                for stage in [cairn::progress::Stage::Copying, cairn::progress::Stage::Verifying] {
                    let sum: u64 = told.iter().filter(|(s, _)| *s == stage).map(|(_, b)| b).sum();
                    assert_eq!(sum, data, "{stage:?}");
                }
                let first_verify = told.iter().position(|(s, _)| *s == cairn::progress::Stage::Verifying).unwrap();
                assert!(told[first_verify..].iter().all(|(s, _)| *s == cairn::progress::Stage::Verifying));
            }

            #[test]
            fn bundle_round_trips_through_bytes() {
                let (_, run) = run("bundle");
                run.save(&common::model_state(6, 1, 8), &opts(6)).unwrap();
                let bytes = transfer::to_bytes(&run.checkpoint(6).unwrap()).unwrap();
                let (_, other) = super::$store::run("bundle-dst");
                let dst = other.location().child("restored");
                transfer::from_bytes(&bytes, &dst).unwrap();
                let loaded = cairn::Checkpoint::open(dst.uri()).unwrap().load(&LoadOptions::default()).unwrap();
                assert_eq!(loaded, common::model_state(6, 1, 8));
            }
        }
    };
}

conformance!(memory, |name: &str| format!("memory://conformance/{}", unique(name)));
conformance!(local, |name: &str| local_uri(name));
#[cfg(feature = "s3-tests")]
conformance!(s3, |name: &str| {
    let base = std::env::var("CAIRN_TEST_S3_URI").expect("CAIRN_TEST_S3_URI (run under scripts/with-seaweedfs.sh)");
    format!("{base}/{}", unique(name))
});

#[test]
fn as_directory_gives_a_cached_local_copy_of_a_remote_checkpoint() {
    let uri = format!("memory://conformance/{}", unique("as-dir"));
    cairn::save(&uri, &common::model_state(1, 1, 4), &opts(1)).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| transfer::as_directory(Location::open(&uri).unwrap(), cache.path()).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(dirs.windows(2).all(|w| w[0] == w[1]));
    let loaded = cairn::load(dirs[0].to_str().unwrap(), &LoadOptions::default()).unwrap().0;
    assert_eq!(loaded, common::model_state(1, 1, 4));
    let leftovers = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(leftovers, 1, "partial downloads left in the cache");
}

#[test]
fn tensors_read_from_an_object_store_each_own_their_bytes() {
    // A frontend can then hand each one out writable without a copy, and each is freed on
    // its own rather than keeping a whole shard's buffer alive.
    let uri = format!("memory://conformance/{}", unique("owned"));
    let state = common::model_state(1, 3, 64);
    cairn::save(&uri, &state, &SaveOptions::default()).unwrap();
    let (loaded, _) = cairn::load(&uri, &LoadOptions::default()).unwrap();
    assert_eq!(loaded, state);
    for (key, entry) in loaded.into_entries() {
        if let cairn::Entry::Tensor(tensor) = entry {
            assert!(tensor.into_parts().2.is_unique(), "tensor `{key}` shares its buffer");
        }
    }
}

#[test]
fn tensors_sharing_bytes_in_a_hand_made_manifest_load_from_an_object_store() {
    // No Cairn writer points two tensors at the same bytes, but the format allows it.
    let uri = format!("memory://conformance/{}", unique("shared-bytes"));
    let mut state = cairn::State::new();
    state.insert_tensor("a", cairn::Tensor::new(cairn::DType::F32, vec![4], vec![1u8; 16]).unwrap());
    state.insert_tensor("b", cairn::Tensor::new(cairn::DType::F32, vec![4], vec![2u8; 16]).unwrap());
    cairn::save(&uri, &state, &SaveOptions::default()).unwrap();
    let location = cairn::open(&uri).unwrap().location().clone();
    cairn::runtime::block_on(async move {
        let path = location.path("manifest.json");
        let bytes = location.store().get(&path).await.unwrap().bytes().await.unwrap();
        let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        json["tensors"]["b"]["pieces"] = json["tensors"]["a"]["pieces"].clone();
        location.store().put(&path, serde_json::to_vec(&json).unwrap().into()).await.unwrap();
        Ok(())
    })
    .unwrap();
    let (loaded, _) = cairn::load(&uri, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.tensor("a").unwrap().data().as_ref(), &[1u8; 16]);
    assert_eq!(loaded.tensor("b").unwrap().data().as_ref(), &[1u8; 16]);
}

#[test]
fn hostile_bundle_entries_are_refused() {
    let mut archive = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_old();
    let name = b"shards/../../escape";
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_size(1);
    header.set_cksum();
    archive.append(&header, &b"x"[..]).unwrap();
    let bytes = archive.into_inner().unwrap();
    let dst = cairn::Location::create(&format!("memory://conformance/{}", unique("hostile"))).unwrap();
    let err = transfer::from_bytes(&bytes, &dst).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("entry=`shards/../../escape`"), "{err}");
}

#[test]
fn random_bytes_as_a_bundle_give_a_printable_error() {
    let mut rng = common::Rng::new(common::seed("random_bytes_as_a_bundle_give_a_printable_error"));
    for _ in 0..200 {
        let mut bytes = rng.bytes(2048);
        // Half of the cases look like a tar header with a checksum field of binary.
        if rng.below(2) == 0 {
            bytes[257..263].copy_from_slice(b"ustar\0");
        }
        let dst = cairn::Location::create(&format!("memory://conformance/{}", unique("random-bundle"))).unwrap();
        let err = transfer::from_bytes(&bytes, &dst).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        let message = err.full_message();
        assert!(!message.chars().any(char::is_control), "binary echoed: {message:?}");
        assert!(message.chars().count() < 600, "{message:?}");
    }
}
