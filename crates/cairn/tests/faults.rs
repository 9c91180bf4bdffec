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
    /// A proxy with the default fault rates, or those `rates` set (`--p503`, `--preset`...).
    fn start(upstream: &str, seed: u64, rates: &[&str]) -> Proxy {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/support/fault_proxy.py");
        let mut child = Command::new("python3")
            .args([script, "--upstream", upstream, "--seed", &seed.to_string(), "--stall", "1.5"])
            .args(rates)
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
    let proxy = Proxy::start(&upstream, seed, &[]);
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

#[test]
fn managed_saves_through_a_faulty_network_never_report_a_committed_save_as_failed() {
    use cairn::manager::{CheckpointManager, ManagerOptions, SaveRequest};
    use cairn::policy::{Every, Retention, SavePolicy};
    const STEPS: u64 = 30;
    let seed = common::seed("managed_saves_through_a_faulty_network_never_report_a_committed_save_as_failed");
    let upstream = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL (run under scripts/with-seaweedfs.sh)");
    let base = std::env::var("CAIRN_TEST_S3_URI").unwrap();
    let uri = format!("{base}/managed-faults-{}", std::process::id());
    // Rates well above the other test's: faults must reach the cleanup after commits.
    let proxy =
        Proxy::start(&upstream, seed, &["--p503", "0.3", "--preset", "0.15", "--plost", "0.1", "--pstall", "0"]);
    let faulty = Location::with_options(&uri, true, &options(&format!("http://127.0.0.1:{}", proxy.port))).unwrap();
    let direct = Run::at(Location::with_options(&uri, false, &options(&upstream)).unwrap());
    // Retention deletes after nearly every save: cleanup faults happen constantly.
    let opts = ManagerOptions::default()
        .with_policy(SavePolicy::steps(vec![Every::new(1)]).unwrap())
        .with_retention(Retention { keep_last: Some(2), ..Default::default() })
        .with_async_save(false)
        .with_preemption_signal(None);
    // Opening lists the run: through the faulty network that may fail too.
    let manager = (0..20)
        .find_map(|_| CheckpointManager::with_run(Run::at(faulty.clone()), opts.clone()).ok())
        .expect("the manager opens within 20 tries");
    let (mut saved, mut failed, mut cleanup) = (Vec::new(), Vec::new(), 0);
    for step in 1..=STEPS {
        match manager.on_step(step, &common::model_state(step, 1, 4), SaveRequest::default()) {
            Ok(true) => saved.push(step),
            Ok(false) => panic!("step {step} was due"),
            Err(e) => {
                assert!(e.to_string().contains(&format!("step-{step:012}")), "unclear save failure: {e}");
                failed.push(step);
            }
        }
        cleanup += manager.take_cleanup_errors().len();
    }
    let _ = manager.wait();
    drop(manager);
    drop(proxy);
    eprintln!("{} saved, {} failed, {cleanup} cleanup problems reported apart", saved.len(), failed.len());
    let listed: Vec<u64> = direct.list().unwrap().iter().map(|c| c.step).collect();
    for step in &failed {
        assert!(!listed.contains(step), "step {step} was reported failed but is committed");
    }
    assert!(saved.iter().rev().take(1).all(|s| listed.contains(s)), "the newest save is not committed: {listed:?}");
    for step in &listed {
        let ckpt = direct.checkpoint(*step).unwrap();
        assert_eq!(ckpt.load(&LoadOptions::default()).unwrap(), common::model_state(*step, 1, 4), "step {step}");
    }
}
