//! Round-trips: every dtype and shape (0-d, empty, large), plain values of every kind,
//! selection, renaming, on the memory store and on local disk.

mod common;

use std::collections::BTreeMap;

use cairn::{DType, ErrorKind, LoadOptions, RenameRule, SaveOptions, State, Tensor, Value};
use proptest::prelude::*;

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn tensor_strategy() -> impl Strategy<Value = Tensor> {
    (dtype_strategy(), prop::collection::vec(0u64..5, 0..4)).prop_flat_map(|(dtype, shape)| {
        let n = shape.iter().product::<u64>() as usize * dtype.size();
        prop::collection::vec(any::<u8>(), n).prop_map(move |bytes| Tensor::new(dtype, shape.clone(), bytes).unwrap())
    })
}

fn value_strategy() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<u64>().prop_map(|bits| Value::Float(f64::from_bits(bits))),
        ".{0,8}".prop_map(Value::Str),
        prop::collection::vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::List),
            prop::collection::btree_map(".{0,6}", inner, 0..4).prop_map(Value::Map),
        ]
    })
}

fn state_strategy() -> impl Strategy<Value = State> {
    (
        prop::collection::btree_map("[a-z]{1,3}(\\.[a-z0-9/]{1,3}){0,2}", tensor_strategy(), 0..12),
        prop::collection::btree_map("v\\.[a-z]{1,4}", value_strategy(), 0..4),
    )
        .prop_map(|(tensors, values)| {
            let mut state = State::new();
            for (k, t) in tensors {
                state.insert_tensor(k, t);
            }
            for (k, v) in values {
                state.insert_value(k, v);
            }
            state
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_states_round_trip_bit_exact_in_memory(state in state_strategy(), shard_bytes in 1u64..4096) {
        let uri = format!("memory://roundtrip/{}", uuid_like());
        cairn::save(&uri, &state, &SaveOptions::default().with_step(3).with_shard_bytes(shard_bytes)).unwrap();
        let (loaded, info) = cairn::load(&uri, &LoadOptions::default()).unwrap();
        prop_assert_eq!(info.step, 3);
        prop_assert_eq!(loaded, state);
    }

    #[test]
    fn random_states_round_trip_bit_exact_on_disk(state in state_strategy()) {
        let dir = tempfile::tempdir().unwrap();
        let uri = dir.path().join("ckpt");
        let uri = uri.to_str().unwrap();
        cairn::save(uri, &state, &SaveOptions::default().with_shard_bytes(64)).unwrap();
        let (loaded, _) = cairn::load(uri, &LoadOptions::default()).unwrap();
        prop_assert_eq!(loaded, state);
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

#[test]
fn large_state_is_split_into_parallel_shards_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let state = common::model_state(7, 8, 512); // ~8 MiB in 25 tensors
    let uri = dir.path().to_str().unwrap();
    cairn::save(uri, &state, &SaveOptions::default().with_step(7).with_shard_bytes(2 << 20)).unwrap();
    let ckpt = cairn::open(uri).unwrap();
    assert!(ckpt.manifest().files.len() >= 4, "{} files", ckpt.manifest().files.len());
    assert_eq!(ckpt.load(&LoadOptions::default()).unwrap(), state);
}

#[test]
fn every_kind_of_plain_value_round_trips() {
    let mut state = State::new();
    let mut map = BTreeMap::new();
    map.insert("lr".to_string(), Value::Float(3e-4));
    map.insert("name".to_string(), Value::Str("résumé ✓".into()));
    state.insert_value("config", Value::Map(map));
    state.insert_value("nan", Value::Float(f64::from_bits(0x7ff8_dead_beef_0001)));
    state.insert_value("inf", Value::Float(f64::NEG_INFINITY));
    state.insert_value("negzero", Value::Float(-0.0));
    state.insert_value("none", Value::Null);
    state.insert_value("big", Value::Int(i64::MIN));
    state.insert_value("list", Value::List(vec![Value::Bool(true), Value::Bytes(vec![0, 255])]));
    state.set_structure(Some(r#"{"kind":"dict"}"#.to_string()));
    cairn::save("memory://values/run", &state, &SaveOptions::default().with_step(1)).unwrap();
    let (loaded, _) = cairn::load("memory://values/run", &LoadOptions::default()).unwrap();
    assert_eq!(loaded, state);
}

fn two_part_state() -> State {
    let mut state = State::new();
    for key in ["module.model.a", "module.model.b", "optim.m"] {
        state.insert_tensor(key, Tensor::new(DType::U8, vec![1], vec![key.len() as u8]).unwrap());
    }
    state.insert_value("module.model.cfg", Value::Int(1));
    state
}

#[test]
fn load_by_prefix_returns_only_matching_keys() {
    cairn::save("memory://select/prefix", &two_part_state(), &SaveOptions::default().with_step(1)).unwrap();
    let (loaded, _) =
        cairn::load("memory://select/prefix", &LoadOptions::default().with_prefix("module.model.")).unwrap();
    let keys: Vec<&String> = loaded.iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec!["module.model.a", "module.model.b", "module.model.cfg"]);
}

#[test]
fn load_by_key_list_and_missing_key_is_not_found() {
    cairn::save("memory://select/keys", &two_part_state(), &SaveOptions::default().with_step(1)).unwrap();
    let (loaded, _) = cairn::load("memory://select/keys", &LoadOptions::default().with_keys(["optim.m"])).unwrap();
    assert_eq!(loaded.len(), 1);
    let err = cairn::load("memory://select/keys", &LoadOptions::default().with_keys(["nope"])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("key=`nope`"), "{err}");
}

#[test]
fn rename_rules_strip_prefixes_and_refuse_collisions() {
    cairn::save("memory://select/rename", &two_part_state(), &SaveOptions::default().with_step(1)).unwrap();
    let opts = LoadOptions::default().with_rename(RenameRule::new(r"^module\.", "").unwrap());
    let (loaded, _) = cairn::load("memory://select/rename", &opts).unwrap();
    assert!(loaded.tensor("model.a").is_some());
    let clash = LoadOptions::default().with_rename(RenameRule::new(r"^.*$", "same").unwrap());
    let err = cairn::load("memory://select/rename", &clash).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.to_string().contains("renamed=`same`"), "{err}");
}

#[test]
fn tensor_names_shaped_like_paths_are_stored_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut state = State::new();
    state.insert_tensor("../../escape", Tensor::new(DType::U8, vec![2], vec![1, 2]).unwrap());
    state.insert_tensor("/etc/passwd", Tensor::new(DType::U8, vec![1], vec![3]).unwrap());
    state.insert_tensor("__metadata__", Tensor::new(DType::U8, vec![1], vec![4]).unwrap());
    cairn::save(run.to_str().unwrap(), &state, &SaveOptions::default().with_step(1)).unwrap();
    let (loaded, _) = cairn::load(run.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(loaded, state);
    let outside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(outside, vec![std::ffi::OsString::from("run")]);
}

#[test]
fn metrics_and_metadata_are_recorded() {
    let opts = SaveOptions::default()
        .with_step(5)
        .with_metric("loss", 0.25)
        .with_temporary(true)
        .with_metadata(serde_json::json!({"lr": 0.1}));
    let info = cairn::save("memory://info/run", &two_part_state(), &opts).unwrap();
    assert_eq!(info.metric("loss"), Some(0.25));
    let reopened = cairn::open("memory://info/run").unwrap().info();
    assert!(reopened.temporary);
    assert_eq!(reopened.metadata["lr"], 0.1);
    assert_eq!(reopened.save_id, info.save_id);
}
