//! The corruption matrix: damage each region of a shard and of the manifest, truncate and
//! delete each file, and expect the precise error — never a panic, never wrong data.

mod common;

use std::path::{Path, PathBuf};

use cairn::{DType, ErrorKind, LoadOptions, SaveOptions, State, Tensor};

struct Fixture {
    _dir: tempfile::TempDir,
    ckpt: PathBuf,
    shard: PathBuf,
    header_len: u64,
    /// Byte ranges of tensors `a` and `b` in the shard.
    a: [u64; 2],
    b: [u64; 2],
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let mut state = State::new();
    state.insert_tensor("a", Tensor::new(DType::F32, vec![4], vec![1u8; 16]).unwrap());
    state.insert_tensor("b", Tensor::new(DType::U8, vec![3], vec![2u8; 3]).unwrap());
    cairn::save(ckpt.to_str().unwrap(), &state, &SaveOptions::default()).unwrap();
    let manifest = cairn::open(ckpt.to_str().unwrap()).unwrap().manifest().clone();
    let (file, record) = manifest.files.iter().next().unwrap();
    let range = |k: &str| manifest.tensors[k].pieces[0].range;
    Fixture { shard: ckpt.join(file), header_len: record.header_len, a: range("a"), b: range("b"), ckpt, _dir: dir }
}

fn flip(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

fn edit_manifest(f: &Fixture, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = f.ckpt.join("manifest.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
}

fn load_err(f: &Fixture) -> cairn::Error {
    cairn::load(f.ckpt.to_str().unwrap(), &LoadOptions::default()).expect_err("damaged checkpoint loaded")
}

fn assert_err(err: cairn::Error, kind: ErrorKind, needles: &[&str]) {
    assert_eq!(err.kind(), kind, "{err}");
    for needle in needles {
        assert!(err.to_string().contains(needle), "`{needle}` not in: {err}");
    }
}

#[test]
fn flipped_byte_in_header_length_is_detected() {
    let f = fixture();
    flip(&f.shard, 0);
    assert_err(load_err(&f), ErrorKind::Corrupt, &["checksum mismatch in shard header", "shards/"]);
}

#[test]
fn flipped_byte_in_header_json_is_detected() {
    let f = fixture();
    flip(&f.shard, 12);
    assert_err(load_err(&f), ErrorKind::Corrupt, &["checksum mismatch in shard header"]);
}

#[test]
fn flipped_byte_in_header_padding_is_detected() {
    let f = fixture();
    flip(&f.shard, f.header_len - 1);
    assert_err(load_err(&f), ErrorKind::Corrupt, &["checksum mismatch in shard header"]);
}

#[test]
fn verify_detects_flipped_byte_in_first_tensor() {
    let f = fixture();
    flip(&f.shard, f.a[0]);
    assert_err(load_err(&f), ErrorKind::Corrupt, &["checksum mismatch tensor=`a`", "file=`"]);
}

#[test]
fn verify_detects_flipped_byte_in_last_tensor() {
    let f = fixture();
    flip(&f.shard, f.b[1] - 1);
    assert_err(load_err(&f), ErrorKind::Corrupt, &["checksum mismatch tensor=`b`"]);
}

#[test]
fn loading_only_an_intact_tensor_succeeds_despite_damage_elsewhere() {
    let f = fixture();
    flip(&f.shard, f.b[0]);
    let (state, _) = cairn::load(f.ckpt.to_str().unwrap(), &LoadOptions::default().with_keys(["a"])).unwrap();
    assert_eq!(state.tensor("a").unwrap().data().as_ref(), &[1u8; 16]);
}

#[test]
fn truncated_shard_is_detected() {
    for len in [0, 7, 8] {
        let f = fixture();
        let full = std::fs::metadata(&f.shard).unwrap().len();
        truncate(&f.shard, len.min(full - 1));
        assert_err(load_err(&f), ErrorKind::Corrupt, &["truncated data file", "safetensors"]);
    }
    let f = fixture();
    truncate(&f.shard, f.b[1] - 1);
    assert_err(load_err(&f), ErrorKind::Corrupt, &["truncated data file"]);
}

#[test]
fn shard_with_extra_bytes_is_detected() {
    let f = fixture();
    let mut bytes = std::fs::read(&f.shard).unwrap();
    bytes.push(0);
    std::fs::write(&f.shard, bytes).unwrap();
    assert_err(load_err(&f), ErrorKind::Corrupt, &["extra bytes"]);
}

#[test]
fn deleted_shard_is_detected() {
    let f = fixture();
    std::fs::remove_file(&f.shard).unwrap();
    assert_err(load_err(&f), ErrorKind::Corrupt, &["data file missing"]);
}

#[test]
fn shard_replaced_by_a_symlink_is_refused() {
    let f = fixture();
    let copy = f.ckpt.join("elsewhere");
    std::fs::rename(&f.shard, &copy).unwrap();
    std::os::unix::fs::symlink(&copy, &f.shard).unwrap();
    assert_err(load_err(&f), ErrorKind::Corrupt, &["symlink inside the run is not followed", "shards/"]);
}

#[test]
fn deleted_manifest_means_no_checkpoint() {
    let f = fixture();
    std::fs::remove_file(f.ckpt.join("manifest.json")).unwrap();
    assert_err(load_err(&f), ErrorKind::NotFound, &[]);
}

#[test]
fn flipped_structural_byte_in_manifest_is_detected() {
    let f = fixture();
    flip(&f.ckpt.join("manifest.json"), 0);
    assert_err(load_err(&f), ErrorKind::Corrupt, &["not valid json", "manifest.json"]);
}

#[test]
fn truncated_manifest_is_detected() {
    let f = fixture();
    let path = f.ckpt.join("manifest.json");
    truncate(&path, std::fs::metadata(&path).unwrap().len() / 2);
    assert_err(load_err(&f), ErrorKind::Corrupt, &["manifest.json"]);
}

#[test]
fn unknown_format_version_is_incompatible() {
    let f = fixture();
    edit_manifest(&f, |m| m["format_version"] = 3.into());
    assert_err(load_err(&f), ErrorKind::Incompatible, &["format version 3", "manifest.json"]);
}

#[test]
fn manifest_pointing_outside_the_checkpoint_is_refused() {
    let f = fixture();
    edit_manifest(&f, |m| {
        let files = m["files"].as_object_mut().unwrap();
        let (_, rec) = files.iter().next().map(|(k, v)| (k.clone(), v.clone())).unwrap();
        files.clear();
        files.insert("../../../etc/passwd".into(), rec);
        for t in m["tensors"].as_object_mut().unwrap().values_mut() {
            t["pieces"][0]["file"] = "../../../etc/passwd".into();
        }
    });
    assert_err(load_err(&f), ErrorKind::Corrupt, &["outside the run", "../../../etc/passwd"]);
}

#[test]
fn manifest_that_references_a_missing_file_is_refused() {
    let f = fixture();
    edit_manifest(&f, |m| m["tensors"]["a"]["pieces"][0]["file"] = "shards/ghost.safetensors".into());
    assert_err(load_err(&f), ErrorKind::Corrupt, &["unknown data file", "tensor=`a`"]);
}

#[test]
fn manifest_with_a_wrong_checksum_is_detected() {
    let f = fixture();
    edit_manifest(&f, |m| m["tensors"]["b"]["pieces"][0]["crc32c"] = 12345.into());
    assert_err(load_err(&f), ErrorKind::Corrupt, &["checksum mismatch tensor=`b`"]);
}

#[test]
fn header_claiming_terabytes_is_refused_before_allocation() {
    let f = fixture();
    edit_manifest(&f, |m| {
        m["tensors"]["a"]["shape"] = serde_json::json!([1u64 << 40]);
        m["tensors"]["a"]["pieces"][0]["shape"] = serde_json::json!([1u64 << 40]);
        m["tensors"]["a"]["pieces"][0]["range"] = serde_json::json!([f.a[0], f.a[0] + (4u64 << 40)]);
    });
    assert_err(load_err(&f), ErrorKind::Corrupt, &["tensor=`a`", "outside the data"]);
}

#[test]
fn byte_range_that_lies_about_size_is_refused() {
    let f = fixture();
    edit_manifest(&f, |m| m["tensors"]["a"]["pieces"][0]["range"] = serde_json::json!([f.a[0], f.a[1] + 1]));
    assert_err(load_err(&f), ErrorKind::Corrupt, &["does not hold 16 bytes", "tensor=`a`"]);
}

#[test]
fn overlapping_pieces_are_refused() {
    let f = fixture();
    edit_manifest(&f, |m| {
        let piece = m["tensors"]["a"]["pieces"][0].clone();
        let mut half = piece.clone();
        half["shape"] = serde_json::json!([2]);
        half["range"] = serde_json::json!([f.a[0], f.a[0] + 8]);
        let mut other = half.clone();
        other["offsets"] = serde_json::json!([1]);
        let mut third = half.clone();
        third["offsets"] = serde_json::json!([2]);
        m["tensors"]["a"]["pieces"] = serde_json::json!([half, other, third]);
    });
    assert_err(load_err(&f), ErrorKind::Corrupt, &["overlapping pieces", "tensor=`a`"]);
}

#[test]
fn corrupt_shard_in_an_object_store_is_detected() {
    use object_store::ObjectStoreExt;
    let uri = "memory://corruption/remote";
    let mut state = State::new();
    state.insert_tensor("w", Tensor::new(DType::U8, vec![4], vec![9u8; 4]).unwrap());
    cairn::save(uri, &state, &SaveOptions::default()).unwrap();
    let ckpt = cairn::open(uri).unwrap();
    let file = ckpt.manifest().files.keys().next().unwrap().clone();
    let range = ckpt.manifest().tensors["w"].pieces[0].range;
    let store = ckpt.location().store().clone();
    let path = ckpt.location().path(&file);
    cairn::runtime::block_on(async {
        let mut bytes = store.get(&path).await.unwrap().bytes().await.unwrap().to_vec();
        bytes[range[0] as usize] ^= 1;
        store.put(&path, bytes.into()).await.unwrap();
        Ok(())
    })
    .unwrap();
    let err = cairn::load(uri, &LoadOptions::default()).unwrap_err();
    assert_err(err, ErrorKind::Corrupt, &["checksum mismatch tensor=`w`", "memory://corruption/remote"]);
}

mod mutations {
    //! Structure-blind mutations of a valid checkpoint (the fuzz targets do the same,
    //! coverage-guided, under `cargo fuzz`): every load is a clean error or the original
    //! data, never a panic.
    use super::*;
    use proptest::prelude::*;

    fn pristine() -> (Vec<u8>, Vec<u8>, State) {
        let mut state = State::new();
        state.insert_tensor("a", Tensor::new(DType::F32, vec![2, 2], vec![3u8; 16]).unwrap());
        state.insert_tensor("b", Tensor::new(DType::I64, vec![1], vec![4u8; 8]).unwrap());
        let uri = format!("memory://mutations/{}", std::process::id());
        cairn::save(&uri, &state, &SaveOptions::default()).unwrap_or_else(|_| cairn::open(&uri).unwrap().info());
        let ckpt = cairn::open(&uri).unwrap();
        let shard = ckpt.manifest().files.keys().next().unwrap().clone();
        let store = ckpt.location().store().clone();
        let (m, s) = (ckpt.location().path("manifest.json"), ckpt.location().path(&shard));
        cairn::runtime::block_on(async move {
            use object_store::ObjectStoreExt;
            let m = store.get(&m).await.unwrap().bytes().await.unwrap().to_vec();
            let s = store.get(&s).await.unwrap().bytes().await.unwrap().to_vec();
            Ok((m, s, state))
        })
        .unwrap()
    }

    fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
        for &(pos, kind, value) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = pos % bytes.len();
            match kind % 4 {
                0 => bytes[i] ^= value.max(1),
                1 => bytes.truncate(i),
                2 => bytes.insert(i, value),
                _ => {
                    bytes.remove(i);
                }
            }
        }
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn mutated_checkpoints_load_cleanly_or_not_at_all(
            edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
            target_manifest in any::<bool>(),
        ) {
            let (manifest, shard, state) = pristine();
            let (manifest, shard) = if target_manifest { (mutate(manifest, &edits), shard) } else { (manifest, mutate(shard, &edits)) };
            let store = std::sync::Arc::new(object_store::memory::InMemory::new());
            let loc = cairn::Location::from_store(store, "memory://mutated");
            let name = cairn::format::manifest::Manifest::decode(&pristine().0, "m").unwrap().files.keys().next().unwrap().clone();
            let put = loc.clone();
            cairn::runtime::block_on(async move {
                use object_store::ObjectStoreExt;
                put.store().put(&put.path("manifest.json"), manifest.into()).await.unwrap();
                put.store().put(&put.path(&name), shard.into()).await.unwrap();
                Ok(())
            }).unwrap();
            if let Ok(ckpt) = cairn::open_at(loc) {
                if let Ok(loaded) = ckpt.load(&LoadOptions::default()) {
                    // A mutation that still loads must not have changed any tensor byte (the
                    // manifest's own fields are validated, not checksummed: see RELIABILITY.md).
                    for (key, tensor) in state.tensors() {
                        if let Some(got) = loaded.tensor(key) {
                            prop_assert_eq!(got.data(), tensor.data());
                        }
                    }
                }
            }
        }
    }
}
