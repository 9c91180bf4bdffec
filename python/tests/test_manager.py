"""CheckpointManager end to end from Python: policies, retention, async snapshots, resume."""

import datetime
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import cairn


def state(step):
    return {"model": {"w": np.full((4, 4), step, np.float32)}, "step": step}


def test_policies_choose_the_saved_steps(run_dir):
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(10, until=50), cairn.Every(100)]) as mgr:
        saved = [s for s in range(0, 301) if mgr.on_step(s, state(s))]
    assert saved == [10, 20, 30, 40, 50, 100, 200, 300]
    assert [i.step for i in mgr.list()] == saved


def test_keep_last_and_keep_every(run_dir):
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(10)], keep=[cairn.KeepLast(2), cairn.KeepEvery(50)]) as mgr:
        for s in range(1, 121):
            mgr.on_step(s, state(s))
    assert [i.step for i in mgr.list()] == [50, 100, 110, 120]


def test_keep_best_by_metric(run_dir):
    losses = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.3, 5: 0.7}
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(1)], keep=cairn.KeepBest(2, "loss")) as mgr:
        for s, loss in losses.items():
            mgr.on_step(s, state(s), metrics={"loss": loss})
    infos = mgr.list()
    assert [i.step for i in infos] == [2, 4, 5]
    assert infos[0].metrics == {"loss": 0.1}


def test_async_save_snapshots_before_the_caller_mutates(run_dir):
    w = np.zeros(1 << 20, np.float32)
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(1)]) as mgr:
        mgr.on_step(1, {"w": w})
        w[:] = 1.0  # mutate immediately after on_step returned
    restored, info = mgr.restore()
    assert info.step == 1 and not restored["w"].any()


def test_a_background_snapshot_saves_the_state_as_it_was_when_the_caller_changes_it_after_wait_snapshot(run_dir):
    # Large enough that changing it while the copy runs would show in the saved values.
    state = {"w": np.zeros(1 << 24, np.float32), "b": np.arange(1000, dtype=np.int64)}
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(1)], background_snapshot=True, keep=cairn.KeepLast(10)) as mgr:
        for step in range(1, 6):
            assert mgr.on_step(step, state, metrics={"loss": float(step)})
            mgr.wait_snapshot()
            for array in state.values():
                array += 1  # the update, in place, right after the copy is done
    for step in range(1, 6):
        restored, info = mgr.restore(step)
        assert info.step == step and info.metrics == {"loss": float(step)}
        np.testing.assert_array_equal(restored["w"], np.full(1 << 24, step - 1, np.float32))
        np.testing.assert_array_equal(restored["b"], np.arange(1000) + step - 1)


def test_a_background_snapshot_with_the_optimizer_hook_saves_each_step_of_a_torch_loop_bit_exact(run_dir):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    expected = {}
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(1)], background_snapshot=True, keep=cairn.KeepLast(10)) as mgr:
        optimizer.register_step_pre_hook(lambda *_: mgr.wait_snapshot())
        model.register_forward_pre_hook(lambda *_: mgr.wait_snapshot())  # batch norm updates its buffers
        for step in range(1, 7):
            loss = model(torch.randn(32, 64)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
            mgr.on_step(step, state)
            expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
    for step, weights in expected.items():
        restored, _ = mgr.restore(step)
        assert restored["model"].keys() == weights.keys()
        for key, value in weights.items():
            assert torch.equal(torch.as_tensor(restored["model"][key]), value), (step, key)


def test_restore_returns_state_and_info_and_resumes(run_dir):
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(5)]) as mgr:
        for s in range(1, 13):
            mgr.on_step(s, state(s), metadata={"note": "hi"})
    mgr2 = cairn.CheckpointManager(run_dir, policies=[cairn.Every(5)])
    restored, info = mgr2.restore()
    assert info.step == 10 and info.metadata == {"note": "hi"} and not info.temporary
    assert isinstance(info.created, datetime.datetime)
    assert restored["step"] == 10 and restored["model"]["w"][0, 0] == 10
    older, _ = mgr2.restore(5, prefix="model.")
    assert list(older) == ["model"] and older["model"]["w"][0, 0] == 5
    assert mgr2.latest_step() == 10
    assert not mgr2.on_step(10, state(10))


def test_time_interval_makes_temporaries_replaced_by_newer(run_dir):
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(1000)], save_interval=datetime.timedelta(0)) as mgr:
        for s in range(1, 4):
            assert mgr.on_step(s, state(s))
    infos = mgr.list()
    assert [(i.step, i.temporary) for i in infos] == [(3, True)]


def test_reset_deletes_everything(run_dir):
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(1)]) as mgr:
        for s in range(1, 4):
            mgr.on_step(s, state(s))
        mgr.wait()
        mgr.reset()
        assert mgr.latest_step() is None
        with pytest.raises(cairn.CheckpointNotFoundError):
            mgr.restore()


def test_background_error_is_raised_by_wait(run_dir):
    mgr = cairn.CheckpointManager(run_dir, policies=[cairn.Every(1)])
    (run_dir / "step-000000000002").write_bytes(b"in the way")
    mgr.on_step(2, state(2))
    with pytest.raises(cairn.CheckpointError, match="step-000000000002"):
        mgr.wait()


class CountingDict(dict):
    """A dict that counts how often it is read."""

    reads = 0

    def items(self):
        CountingDict.reads += 1
        return super().items()


def test_on_step_reads_state_and_metrics_only_on_the_steps_it_saves(run_dir):
    CountingDict.reads = 0
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(10)]) as mgr:
        saved = [s for s in range(1, 31) if mgr.on_step(s, CountingDict(state(s)), metrics=CountingDict(loss=0.5))]
    assert saved == [10, 20, 30]
    assert CountingDict.reads == 6, "the state and the metrics, once per saved step"
    assert [i.metrics for i in mgr.list()] == [{"loss": 0.5}] * 3


def test_a_state_that_cannot_be_read_fails_the_step_and_frees_its_slot(run_dir):
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(1)]) as mgr:
        with pytest.raises(cairn.InvalidArgumentError, match="key=`bad`"):
            mgr.on_step(1, {"bad": object()})
        assert mgr.on_step(1, state(1)), "the failed step was not booked"
        assert mgr.on_step(2, state(2))
    assert [i.step for i in mgr.list()] == [1, 2]


def test_an_error_while_reading_the_state_comes_back_as_it_is_and_frees_the_slot(run_dir):
    class Lost(dict):
        def items(self):
            raise RuntimeError("device lost")

    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(1)]) as mgr:
        with pytest.raises(RuntimeError, match="device lost"):
            mgr.on_step(1, Lost(w=np.zeros(2)))

        class Reentrant(dict):
            def items(self):
                mgr.save(7, state(7))
                return super().items()

        with pytest.raises(cairn.InvalidArgumentError, match="cannot itself save"):
            mgr.on_step(1, Reentrant(state(1)))
        assert mgr.on_step(1, state(1))
    assert [i.step for i in mgr.list()] == [1]


def test_the_default_policy_is_the_rust_one(run_dir):
    with cairn.CheckpointManager(run_dir) as mgr:
        saved = [s for s in range(0, 7001) if mgr.on_step(s, {"s": s})]
    assert saved == [500 * i for i in range(1, 11)] + [6000, 7000]


def test_the_old_retention_flags_still_work_and_warn(run_dir):
    with pytest.warns(DeprecationWarning, match="keep_last"):
        mgr = cairn.CheckpointManager(run_dir, policies=[cairn.Every(1)], keep_last=2, async_save=False)
    with mgr:
        for s in range(1, 5):
            mgr.on_step(s, state(s))
    assert [i.step for i in mgr.list()] == [3, 4]
    with pytest.warns(DeprecationWarning, match="keep_best"):
        report = cairn.prune(run_dir, keep_best=1, metric="loss", dry_run=True)
    assert report.deleted == [3], "no metric recorded: only the latest is kept"


def test_invalid_policies_are_refused(run_dir):
    with pytest.raises(cairn.InvalidArgumentError, match="open-ended"):
        cairn.CheckpointManager(run_dir, policies=[cairn.Every(10), cairn.Every(5, until=100)])
    with pytest.raises(cairn.InvalidArgumentError, match="metric"), pytest.warns(DeprecationWarning):
        cairn.CheckpointManager(run_dir, keep_best=2)


def test_sigterm_saves_at_the_next_step_and_flushes(run_dir):
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np, cairn
        mgr = cairn.CheckpointManager({str(run_dir)!r}, policies=[cairn.Every(1000)])
        for step in range(1, 100):
            if step == 7:
                os.kill(os.getpid(), signal.SIGTERM)
            saved = mgr.on_step(step, {{"w": np.full(3, step)}})
            if mgr.preempted:
                print("stopped at", step, "saved", saved)
                break
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "stopped at 7 saved True" in out.stdout
    restored = cairn.load(run_dir)
    assert restored["w"].tolist() == [7, 7, 7]


def test_cleanup_problems_are_reported_apart_and_never_fail_a_save(tmp_path):
    run = tmp_path / "run"
    with cairn.CheckpointManager(str(run), keep=cairn.KeepLast(1), async_save=False) as mgr:
        mgr.on_step(1, {"w": np.ones(3, np.float32)}, force=True)
        # Retention will fail to delete step 1, every time: its manifest became a folder
        # (tests run as root, so permission bits would not stop a deletion).
        manifest = run / "step-000000000001" / "manifest.json"
        manifest.unlink()
        manifest.mkdir()
        (manifest / "x").write_bytes(b"x")
        mgr.on_step(2, {"w": np.ones(3, np.float32)}, force=True)
        mgr.wait()  # step 2 was saved: nothing raised
        problems = mgr.cleanup_errors()
        assert problems and all(isinstance(p, cairn.CheckpointError) for p in problems), problems
        assert "step-000000000001" in str(problems[0])
        assert mgr.cleanup_errors() == []
        assert [i.step for i in mgr.list()] == [2]


def _two_hours_old(path):
    then = time.time() - 7200
    os.utime(path, (then, then))


def test_prune_applies_retention_and_removes_old_leftovers(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        cairn.save(str(run), {"w": np.full(2, step, np.float32)}, step=step)
    leftover = run / "step-000000000009" / "shards" / "r00000-00000-of-00001-dead.safetensors"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x")
    empty = run / "step-000000000007"
    empty.mkdir()
    for path in (leftover, leftover.parent, leftover.parent.parent, empty):
        _two_hours_old(path)
    dry = cairn.prune(str(run), keep=cairn.KeepLast(1), dry_run=True)
    assert (dry.deleted, dry.kept) == ([1, 2], 1)
    assert len(dry.removed) == 1 and dry.removed[0].endswith(leftover.name), dry.removed
    assert [i.step for i in cairn.list_checkpoints(str(run))] == [1, 2, 3] and leftover.exists()
    report = cairn.prune(str(run), keep=cairn.KeepLast(1), grace=datetime.timedelta(hours=1))
    assert report.deleted == [1, 2] and report.kept == 1
    assert not leftover.exists() and not empty.exists(), report.removed
    assert [i.step for i in cairn.list_checkpoints(str(run))] == [3]
    with pytest.raises(cairn.InvalidArgumentError, match="metric"), pytest.warns(DeprecationWarning):
        cairn.prune(str(run), keep_best=1)


def test_a_damaged_checkpoint_is_listed_with_a_warning_and_kept_by_prune(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        cairn.save(str(run), {"w": np.ones(2, np.float32)}, step=step)
    (run / "step-000000000001" / "manifest.json").write_text("{")
    with pytest.warns(cairn.DamagedCheckpointWarning, match="step-000000000001"):
        assert [i.step for i in cairn.list_checkpoints(str(run))] == [2, 3]
    report = cairn.prune(str(run), keep=cairn.KeepLast(1))
    assert report.deleted == [2] and len(report.damaged) == 1
    assert (run / "step-000000000001" / "manifest.json").exists()


def test_a_manager_removes_old_leftovers_of_killed_saves_when_it_opens(tmp_path):
    run = tmp_path / "run"
    cairn.save(str(run), {"w": np.ones(2, np.float32)}, step=1)
    old = run / "step-000000000005"
    old.mkdir()
    young = run / "step-000000000006"
    young.mkdir()
    _two_hours_old(old)
    with cairn.CheckpointManager(str(run)) as mgr:
        mgr.wait()
    assert not old.exists() and young.exists()
    with cairn.CheckpointManager(str(run), orphan_grace=0) as mgr:
        mgr.wait()
    assert not young.exists()


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_sigterm_ends_the_process_again_once_the_manager_is_closed(run_dir):
    out = _run_python(
        f"""
        import os, signal, time, numpy as np, cairn
        with cairn.CheckpointManager({str(run_dir)!r}) as mgr:
            mgr.on_step(1, {{"w": np.ones(2)}}, force=True)
        print("closed", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("still alive")
        """
    )
    assert "closed" in out.stdout and "still alive" not in out.stdout, out
    assert out.returncode == -signal.SIGTERM, (out.returncode, out.stderr)


def test_a_second_sigterm_while_the_first_is_pending_ends_the_process_as_killed(run_dir):
    out = _run_python(
        f"""
        import os, signal, time, cairn
        mgr = cairn.CheckpointManager({str(run_dir)!r})
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        assert mgr.preempted
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("still alive")
        """
    )
    assert "still alive" not in out.stdout, out
    assert out.returncode == -signal.SIGTERM, (out.returncode, out.stderr)


def test_forcing_an_already_committed_step_returns_false(run_dir):
    with cairn.CheckpointManager(str(run_dir), policies=[cairn.Every(10)]) as mgr:
        assert mgr.on_step(10, {"w": np.ones(2)})
        mgr.wait()
        assert mgr.on_step(10, {"w": np.zeros(2)}, force=True) is False
    assert cairn.load(str(run_dir))["w"].tolist() == [1, 1]
