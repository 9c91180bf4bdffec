//! The real `cairn` binary on real checkpoints (corrupt ones included), output snapshotted.

use std::path::Path;
use std::process::Command;

use cairn::{DType, SaveOptions, State, Tensor, Value};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cairn(dir: &Path, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn")).current_dir(dir).args(args).output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn state(scale: f32) -> State {
    let mut s = State::new();
    s.insert_tensor("model.w", Tensor::new(DType::F32, vec![2, 2], f32s(&[1.0 * scale, 2.0, 3.0, 4.0])).unwrap());
    s.insert_tensor("model.b", Tensor::new(DType::F32, vec![2], f32s(&[0.5, -0.5])).unwrap());
    s.insert_tensor("optim.m", Tensor::new(DType::I64, vec![3], vec![0u8; 24]).unwrap());
    s.insert_value("step", Value::Int(1));
    s
}

/// A run with steps 10, 20, 30 (30 temporary) in `dir/run`.
fn make_run(dir: &Path) {
    let uri = dir.join("run");
    for (step, temporary) in [(10, false), (20, false), (30, true)] {
        let opts =
            SaveOptions::default().with_step(step).with_temporary(temporary).with_metric("loss", step as f64 / 100.0);
        cairn::save(uri.to_str().unwrap(), &state(1.0), &opts).unwrap();
    }
}

macro_rules! snapshot {
    ($name:expr, $value:expr) => {
        insta::with_settings!({filters => vec![
            (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "[TIME]"),
            (r"r\d{5}-\d{5}-of-\d{5}-[0-9a-f]{12}", "[SHARD]"),
            (r"\b\d\.\d\ds\b", "[SECS]"),
        ]}, {
            insta::assert_snapshot!($name, $value);
        });
    };
}

#[test]
fn ls_prints_a_table_in_step_order() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    let out = cairn(dir.path(), &["ls", "run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    snapshot!("ls", out.stdout);
}

#[test]
fn ls_json_is_machine_readable() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    let out = cairn(dir.path(), &["ls", "run", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 3);
    assert_eq!(rows[2]["temporary"], true);
    assert_eq!(rows[0]["metrics"]["loss"], 0.1);
}

#[test]
fn latest_prints_the_uri_or_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    let out = cairn(dir.path(), &["latest", "run"]);
    assert_eq!((out.code, out.stdout.trim()), (0, "run/step-000000000030"));
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    assert_eq!(cairn(dir.path(), &["latest", "empty"]).code, 1);
}

#[test]
fn inspect_shows_tensors_shards_and_totals() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    let out = cairn(dir.path(), &["inspect", "run/step-000000000010"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    snapshot!("inspect", out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&cairn(dir.path(), &["inspect", "run", "--json"]).stdout).unwrap();
    assert_eq!(json["step"], 30);
    assert_eq!(json["tensors"]["model.w"]["shape"], serde_json::json!([2, 2]));
    assert_eq!(json["totals"]["model"]["tensors"], 2);
}

#[test]
fn inspect_shows_each_ranks_own_tensors() {
    use cairn::dist::{save_as_rank, Ranks};
    let dir = tempfile::tempdir().unwrap();
    let run = cairn::Run::create(dir.path().join("run").to_str().unwrap()).unwrap();
    // Two ranks, each with an RNG state of its own under one key.
    std::thread::scope(|s| {
        for rank in 0..2u32 {
            let run = &run;
            s.spawn(move || {
                let mut state = State::new();
                state.insert_tensor("rng", Tensor::new(DType::U8, vec![4], vec![rank as u8; 4]).unwrap());
                let ranks = Ranks { rank, world_size: 2, timeout: std::time::Duration::from_secs(30) };
                save_as_rank(run.location(), &state, &SaveOptions::default().with_step(1), ranks, None).unwrap();
            });
        }
    });
    let out = cairn(dir.path(), &["inspect", "run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("1 tensors, 8 B") && out.stdout.contains("OWN TENSOR"), "{}", out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&cairn(dir.path(), &["inspect", "run", "--json"]).stdout).unwrap();
    assert_eq!(json["ranks"]["1"]["tensors"]["rng"]["bytes"], 4);
    assert_eq!(json["totals"]["rng"], serde_json::json!({"tensors": 1, "bytes": 8}));
}

#[test]
fn verify_passes_on_an_intact_run() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    let out = cairn(dir.path(), &["verify", "run"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    snapshot!("verify_ok", out.stdout);
}

#[test]
fn verify_names_each_corrupt_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    let ckpt = cairn::Checkpoint::open(dir.path().join("run/step-000000000020").to_str().unwrap()).unwrap();
    for key in ["model.w", "optim.m"] {
        let piece = &ckpt.manifest().tensors[key].pieces[0];
        let path = dir.path().join("run/step-000000000020").join(&piece.file);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[piece.range[0] as usize] ^= 1;
        std::fs::write(&path, bytes).unwrap();
    }
    let out = cairn(dir.path(), &["verify", "run"]);
    assert_eq!(out.code, 1);
    snapshot!("verify_corrupt", out.stdout);
}

#[test]
fn verify_of_a_missing_run_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = cairn(dir.path(), &["verify", "nowhere"]);
    assert_eq!(out.code, 2);
    snapshot!("verify_missing", out.stderr);
}

#[test]
fn diff_reports_changes_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let mut other = state(1.5);
    other.remove("optim.m");
    other.insert_tensor("extra", Tensor::new(DType::U8, vec![1], vec![1]).unwrap());
    cairn::save(dir.path().join("a").to_str().unwrap(), &state(1.0), &SaveOptions::default()).unwrap();
    cairn::save(dir.path().join("b").to_str().unwrap(), &other, &SaveOptions::default()).unwrap();
    let out = cairn(dir.path(), &["diff", "a", "b"]);
    assert_eq!(out.code, 1);
    snapshot!("diff", out.stdout);
    assert_eq!(cairn(dir.path(), &["diff", "a", "a"]).code, 0);
}

#[test]
fn cp_copies_a_run_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    let out = cairn(dir.path(), &["cp", "run", "copy"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 3);
    // Interrupted copy: a checkpoint without its manifest is completed by running cp again.
    std::fs::remove_file(dir.path().join("copy/step-000000000020/manifest.json")).unwrap();
    assert_eq!(cairn(dir.path(), &["cp", "run", "copy"]).code, 0);
    assert_eq!(cairn(dir.path(), &["verify", "copy"]).code, 0);
    assert_eq!(cairn(dir.path(), &["diff", "run/step-000000000020", "copy/step-000000000020"]).code, 0);
}

#[test]
fn prune_applies_retention_and_removes_unfinished_saves() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    std::fs::create_dir_all(dir.path().join("run/step-000000000040/shards")).unwrap();
    std::fs::write(dir.path().join("run/step-000000000040/shards/x.safetensors"), b"partial").unwrap();
    let dry = cairn(dir.path(), &["prune", "run", "--keep-last", "1", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    snapshot!("prune_dry_run", dry.stdout);
    assert_eq!(cairn(dir.path(), &["ls", "run"]).stdout.lines().count(), 5);
    let out = cairn(dir.path(), &["prune", "run", "--keep-last", "1", "--grace", "0s"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    snapshot!("prune", out.stdout);
    assert!(!dir.path().join("run/step-000000000040").exists());
}

#[test]
fn export_writes_one_safetensors_file_with_cast_and_prefix() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    let out = cairn(dir.path(), &["export", "run", "model.safetensors", "--prefix", "model.", "--dtype", "bf16"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = file.names();
    names.sort();
    assert_eq!(names, vec!["model.b", "model.w"]);
    assert_eq!(file.tensor("model.w").unwrap().dtype(), safetensors::Dtype::BF16);
}

#[test]
fn import_reads_a_hugging_face_sharded_folder() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    assert_eq!(cairn(dir.path(), &["export", "run", "hf/part-1.safetensors", "--prefix", "model."]).code, 0);
    assert_eq!(cairn(dir.path(), &["export", "run", "hf/part-2.safetensors", "--prefix", "optim."]).code, 0);
    let index = serde_json::json!({"metadata": {}, "weight_map": {
        "model.w": "part-1.safetensors", "model.b": "part-1.safetensors", "optim.m": "part-2.safetensors"}});
    std::fs::write(hf.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let out = cairn(dir.path(), &["import", "hf", "imported", "--step", "5"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let (loaded, info) = cairn::load(dir.path().join("imported").to_str().unwrap(), &Default::default()).unwrap();
    assert_eq!(info.step, 5);
    assert_eq!(loaded.tensor("model.w"), state(1.0).tensor("model.w"));
    assert_eq!(loaded.tensor("optim.m"), state(1.0).tensor("optim.m"));
}

#[test]
fn import_refuses_an_index_pointing_outside_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("model.safetensors.index.json"), r#"{"weight_map": {"w": "../../etc/passwd"}}"#).unwrap();
    let out = cairn(dir.path(), &["import", "hf", "imported", "--step", "1"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("error: index names a file outside its folder"), "{}", out.stderr);
}

#[test]
fn inspect_prints_a_70000_character_key_and_a_tensor_of_2000_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let long_key = "k".repeat(70_000);
    let mut s = State::new();
    s.insert_tensor(long_key.as_str(), Tensor::new(DType::U8, vec![2], vec![1, 2]).unwrap());
    s.insert_tensor("w", Tensor::new(DType::U8, vec![2000], vec![3u8; 2000]).unwrap());
    let ckpt = dir.path().join("ckpt");
    cairn::save(ckpt.to_str().unwrap(), &s, &SaveOptions::default()).unwrap();
    // Split `w` into 2,000 one-element pieces, each in a file of its own name.
    let path = ckpt.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let piece = m["tensors"]["w"]["pieces"][0].clone();
    let file = piece["file"].as_str().unwrap().to_string();
    let record = m["files"][&file].clone();
    let start = piece["range"][0].as_u64().unwrap();
    let mut pieces = Vec::new();
    for i in 0..2000u64 {
        let name = format!("shards/copy-{i:05}.safetensors");
        std::fs::copy(ckpt.join(&file), ckpt.join(&name)).unwrap();
        m["files"][&name] = record.clone();
        let mut p = piece.clone();
        p["file"] = name.into();
        p["range"] = serde_json::json!([start + i, start + i + 1]);
        p["offsets"] = serde_json::json!([i]);
        p["shape"] = serde_json::json!([1]);
        p["crc32c"] = cairn::format::checksum::crc32c(&[3]).into();
        pieces.push(p);
    }
    m["tensors"]["w"]["pieces"] = pieces.into();
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let out = cairn(dir.path(), &["inspect", "ckpt"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains(&long_key));
    assert!(out.stdout.contains("(2000 files)"), "{}", out.stdout);
    assert_eq!(cairn(dir.path(), &["verify", "ckpt"]).code, 0);
}

#[test]
fn names_from_a_checkpoint_cannot_send_escape_sequences_to_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = State::new();
    s.insert_tensor("evil\x1b]0;owned\x07\x1b[2J", Tensor::new(DType::U8, vec![1], vec![1]).unwrap());
    let opts = SaveOptions::default().with_step(1).with_metric("loss\x1b[31m", 0.5);
    cairn::save(dir.path().join("run").to_str().unwrap(), &s, &opts).unwrap();
    for args in [&["ls", "run"][..], &["inspect", "run"], &["verify", "run"]] {
        let out = cairn(dir.path(), args);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        assert!(!out.stdout.contains('\x1b') && !out.stderr.contains('\x1b'), "{args:?}: {:?}", out.stdout);
    }
    assert!(cairn(dir.path(), &["inspect", "run"]).stdout.contains("evil\\u{1b}]0;owned"));
}

#[test]
fn ls_and_prune_skip_a_damaged_manifest_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    std::fs::write(dir.path().join("run/step-000000000010/manifest.json"), b"{").unwrap();
    let out = cairn(dir.path(), &["ls", "run"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.contains("20") && out.stdout.contains("30"), "{}", out.stdout);
    assert!(out.stderr.contains("step-000000000010"), "{}", out.stderr);
    let out = cairn(dir.path(), &["prune", "run", "--keep-last", "1"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("kept a damaged checkpoint"), "{}", out.stderr);
    assert!(dir.path().join("run/step-000000000010/manifest.json").exists());
}

#[test]
fn export_writes_a_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    assert_eq!(cairn(dir.path(), &["export", "run", "model.safetensors"]).code, 0);
    let mode = std::fs::metadata(dir.path().join("model.safetensors")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644);
}

#[test]
fn report_writes_one_page_with_every_checkpoint_and_retention_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path());
    // A metric name from a hostile manifest cannot open an element on the page.
    let opts = SaveOptions::default().with_step(40).with_metric("<script>alert(1)</script>", 0.5);
    cairn::save(dir.path().join("run").to_str().unwrap(), &state(1.0), &opts).unwrap();
    let out = cairn(dir.path(), &["report", "run", "-o", "page.html", "--keep-last", "2"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let page = std::fs::read_to_string(dir.path().join("page.html")).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
    for step in [10, 20, 30, 40] {
        assert!(page.contains(&format!("data-step=\"{step}\"")));
    }
    assert_eq!(page.matches("<circle class=\"ckpt").count(), 4);
    assert_eq!(page.matches("<tr class=\"row\"").count(), 4);
    // Keep the last 2 permanent: 10 goes; the temporary 30 goes (a newer one committed).
    assert_eq!(page.matches("deleted next").count(), 2);
    assert!(!page.contains("<script") && page.contains("&lt;script&gt;"));
    assert!(!page.contains("http://") && !page.contains("https://"), "the page fetches nothing");
    // Nothing was deleted by showing the verdict.
    let listed = cairn(dir.path(), &["ls", "run"]);
    assert!(listed.stdout.contains("4 checkpoints:"), "{}", listed.stdout);
}
