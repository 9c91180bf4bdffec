//! Crash consistency at every I/O boundary: a save, a retention pass with prune, and a
//! copy are each run once per operation with a crash, a torn write, a failure or a lost
//! acknowledgement injected there (the fault-injecting store). After each: every visible checkpoint loads
//! bit-exact, earlier ones are intact, nothing unfinished is visible, and the next
//! operation succeeds.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cairn::fault::{Fault, FaultStore};
use cairn::{transfer, ErrorKind, LoadOptions, Location, Run, SaveOptions};
use object_store::memory::InMemory;
use object_store::ObjectStore;

const FAULTS: [Fault; 4] = [Fault::Crash, Fault::Tear, Fault::Fail, Fault::LostAck];

fn opts(step: u64) -> SaveOptions {
    SaveOptions::default().with_step(step).with_shard_bytes(4 << 10)
}

fn state(step: u64) -> cairn::State {
    common::model_state(step, 3, 24) // several tensors, several shards
}

/// A fresh in-memory run holding committed checkpoints `steps`.
fn base(steps: &[u64]) -> Arc<InMemory> {
    let inner = Arc::new(InMemory::new());
    let run = Run::at(Location::from_store(inner.clone(), "memory://base"));
    for &s in steps {
        run.save(&state(s), &opts(s)).unwrap();
    }
    inner
}

fn faulty(inner: &Arc<InMemory>, at: u64, fault: Fault) -> Run {
    let store: Arc<dyn ObjectStore> = Arc::new(FaultStore::new(inner.clone(), at, fault));
    Run::at(Location::from_store(store, "fault://run"))
}

fn direct(inner: &Arc<InMemory>) -> Run {
    Run::at(Location::from_store(inner.clone(), "memory://run"))
}

fn count_ops(inner: &Arc<InMemory>, work: impl FnOnce(&Run)) -> u64 {
    let counter = Arc::new(FaultStore::counting(inner.clone()));
    let store: Arc<dyn ObjectStore> = counter.clone();
    work(&Run::at(Location::from_store(store, "count://run")));
    counter.ops()
}

/// Every visible checkpoint loads bit-exact; returns the visible steps.
fn check_visible(run: &Run) -> Vec<u64> {
    let steps: Vec<u64> = run.list().unwrap().iter().map(|c| c.step).collect();
    for &s in &steps {
        let ckpt = run.checkpoint(s).unwrap();
        assert!(ckpt.verify().unwrap().is_empty(), "visible checkpoint {s} is damaged");
        assert_eq!(ckpt.load(&LoadOptions::default()).unwrap(), state(s), "checkpoint {s} is not bit-exact");
    }
    steps
}

#[test]
fn a_crash_at_every_io_boundary_of_a_save_loses_nothing() {
    let ops = count_ops(&base(&[1, 2]), |run| {
        run.save(&state(3), &opts(3)).unwrap();
    });
    assert!(ops >= 5, "a save should take several operations, saw {ops}");
    let mut cases = 0;
    for at in 0..ops {
        for fault in FAULTS {
            let inner = base(&[1, 2]);
            let result = faulty(&inner, at, fault).save(&state(3), &opts(3));
            let run = direct(&inner);
            let visible = check_visible(&run);
            assert!(visible.starts_with(&[1, 2]), "earlier checkpoints lost at op {at} ({fault:?}): {visible:?}");
            if let Err(e) = &result {
                assert!(e.to_string().contains("step-000000000003"), "unclear error at op {at}: {e}");
            }
            // The next save succeeds: the same step if it was not committed, else the next.
            let next = if visible.contains(&3) { 4 } else { 3 };
            run.save(&state(next), &opts(next)).unwrap();
            assert_eq!(check_visible(&run).last(), Some(&next));
            cases += 1;
        }
    }
    eprintln!("save: {ops} i/o boundaries x {} faults = {cases} cases survived", FAULTS.len());
}

#[test]
fn a_crash_at_every_io_boundary_of_retention_and_prune_loses_nothing_kept() {
    let setup = || {
        let inner = base(&[1, 2, 3, 4]);
        // Leftovers of an unfinished save.
        let leftover = direct(&inner).location().child("step-000000000009");
        cairn::runtime::block_on(async move {
            use object_store::ObjectStoreExt;
            leftover
                .store()
                .put(&leftover.path("shards/r00000-00000-of-00001-dead.safetensors"), "x".into())
                .await
                .unwrap();
            Ok(())
        })
        .unwrap();
        inner
    };
    let work = |run: &Run| -> cairn::Result<()> {
        run.delete(1)?;
        run.delete(2)?;
        run.prune_orphans(Duration::ZERO)?;
        Ok(())
    };
    let ops = count_ops(&setup(), |run| work(run).unwrap());
    for at in 0..ops {
        for fault in FAULTS {
            let inner = setup();
            let _ = work(&faulty(&inner, at, fault));
            let run = direct(&inner);
            let visible = check_visible(&run);
            assert!(visible.ends_with(&[3, 4]), "kept checkpoints lost at op {at} ({fault:?}): {visible:?}");
            work(&run).unwrap();
            assert_eq!(check_visible(&run), vec![3, 4]);
            assert!(run.prune_orphans(Duration::ZERO).unwrap().is_empty(), "orphans left at op {at}");
        }
    }
    eprintln!("retention + prune: {ops} i/o boundaries x {} faults survived", FAULTS.len());
}

#[test]
fn a_crash_at_every_io_boundary_of_a_copy_is_resumable() {
    let source = base(&[5]);
    let src = direct(&source).checkpoint(5).unwrap();
    let ops = count_ops(&Arc::new(InMemory::new()), |run| {
        transfer::copy_checkpoint(&src, &run.location().child("step-000000000005"), &cairn::progress::quiet).unwrap();
    });
    for at in 0..ops {
        for fault in FAULTS {
            let inner = Arc::new(InMemory::new());
            let dst = faulty(&inner, at, fault).location().child("step-000000000005");
            let result = transfer::copy_checkpoint(&src, &dst, &cairn::progress::quiet);
            let run = direct(&inner);
            let visible = check_visible(&run);
            assert!(visible.is_empty() || visible == vec![5], "{visible:?}");
            // A commit whose acknowledgement was lost is the copy's own: never a failure
            // (the copy used to read back only after a conflict, and failed spuriously).
            if let Err(e) = &result {
                let spurious = visible == vec![5] && e.to_string().contains("committing manifest");
                assert!(!spurious, "op {at} {fault:?}: committed copy reported failed: {e}");
            }
            transfer::copy_checkpoint(&src, &run.location().child("step-000000000005"), &cairn::progress::quiet)
                .unwrap();
            assert_eq!(check_visible(&run), vec![5]);
        }
    }
    eprintln!("copy: {ops} i/o boundaries x {} faults survived", FAULTS.len());
}

#[test]
fn a_reader_racing_a_writer_that_commits_and_prunes_never_sees_half_a_checkpoint() {
    let inner = base(&[1]);
    let run = direct(&inner);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for step in 2..60 {
                run.save(&state(step), &opts(step)).unwrap();
                run.delete(step - 1).unwrap();
            }
        });
        let mut loads = 0;
        while !writer.is_finished() {
            let Some(latest) = run.latest().unwrap() else { continue };
            match latest.load(&LoadOptions::default()).map(|st| (latest.info().step, st)) {
                Ok((step, loaded)) => {
                    assert_eq!(loaded, state(step), "half a checkpoint seen at step {step}");
                    loads += 1;
                }
                // Deleted between the listing and the read: gone, never half.
                Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound, "{e}"),
            }
        }
        writer.join().unwrap();
        eprintln!("reader: {loads} consistent loads while the writer committed and pruned");
    });
}
