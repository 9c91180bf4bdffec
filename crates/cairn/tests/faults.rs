//! Fault tests against S3 (SeaweedFS) through a loopback fault-injecting proxy: 10% 503s,
//! 5% lost acknowledgements (the write lands, the reply is an error), 1% connection
//! resets, 1% stalls. Every save commits or fails with a clear error; no spurious
//! conflict, no half checkpoint, no orphan after prune. Needs `--features s3-tests`.
#![cfg(feature = "s3-tests")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn::{ErrorKind, LoadOptions, Location, Run, SaveOptions, StoreOptions};
use futures::TryStreamExt;

const SAVES: u64 = 200;

struct Proxy {
    child: Child,
    port: u16,
}

impl Proxy {
    fn start(upstream: &str, seed: u64) -> Proxy {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/support/fault_proxy.py");
        let mut child = Command::new("python3")
            .args([script, "--upstream", upstream, "--seed", &seed.to_string(), "--stall", "1.5"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fault proxy");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("listening ").and_then(|p| p.parse().ok()).expect("proxy port");
        Proxy { child, port }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        unsafe_sigterm(self.child.id());
        let _ = self.child.wait();
    }
}

fn unsafe_sigterm(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

fn options(endpoint: &str) -> StoreOptions {
    [("aws_endpoint", endpoint), ("aws_allow_http", "true"), ("aws_region", "us-east-1")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn saves_through_a_faulty_network_commit_or_fail_cleanly() {
    let seed = common::seed("saves_through_a_faulty_network_commit_or_fail_cleanly");
    let upstream = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL (run under scripts/with-seaweedfs.sh)");
    let base = std::env::var("CAIRN_TEST_S3_URI").unwrap();
    let uri = format!("{base}/faults-{}", std::process::id());
    let proxy = Proxy::start(&upstream, seed);
    let faulty =
        Run::at(Location::with_options(&uri, true, &options(&format!("http://127.0.0.1:{}", proxy.port))).unwrap());
    let direct = Run::at(Location::with_options(&uri, false, &options(&upstream)).unwrap());

    let mut committed = Vec::new();
    let mut failed = Vec::new();
    for step in 1..=SAVES {
        let opts = SaveOptions::default().with_step(step).with_shard_bytes(512);
        match faulty.save(&common::model_state(step, 2, 8), &opts) {
            Ok(info) => committed.push(info.step),
            Err(e) => {
                assert_ne!(e.kind(), ErrorKind::AlreadyExists, "spurious conflict at step {step}: {e}");
                assert!(e.to_string().contains(&format!("step-{step:012}")), "error does not name the checkpoint: {e}");
                eprintln!("step {step} failed cleanly: {}", e.full_message());
                failed.push(step);
            }
        }
    }
    drop(proxy);
    eprintln!("{} committed, {} failed with a clear error", committed.len(), failed.len());

    // Every save that reported success is committed and intact; nothing visible is half.
    let listed: Vec<u64> = direct.list().unwrap().iter().map(|c| c.step).collect();
    for step in &committed {
        assert!(listed.contains(step), "step {step} reported committed but is not listed");
    }
    for step in &listed {
        let ckpt = direct.checkpoint(*step).unwrap();
        assert!(ckpt.verify().unwrap().is_empty(), "half checkpoint at step {step}");
        assert_eq!(ckpt.load(&LoadOptions::default()).unwrap(), common::model_state(*step, 2, 8));
    }

    // After prune, every object belongs to a committed checkpoint.
    direct.prune_orphans(Duration::ZERO).unwrap();
    let loc = direct.location().clone();
    let objects: Vec<object_store::ObjectMeta> =
        cairn::runtime::block_on(async move { Ok(loc.store().list(Some(loc.prefix())).try_collect().await.unwrap()) })
            .unwrap();
    for meta in objects {
        let path = meta.location.to_string();
        let step = listed.iter().find(|s| path.contains(&format!("step-{s:012}/")));
        let Some(step) = step else { panic!("orphan after prune: {path}") };
        let ckpt = direct.checkpoint(*step).unwrap();
        let referenced =
            path.ends_with("/manifest.json") || ckpt.manifest().files.keys().any(|f| path.ends_with(f.as_str()));
        assert!(referenced, "orphan after prune: {path}");
    }
}
