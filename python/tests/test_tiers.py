"""Two tiers from Python: a process SIGKILLed with an upload in flight leaves it owed, and
the next manager finishes it (local disk and S3 as the durable tier); restore passes
over a damaged local copy with a warning; events reach `on_event` and the JSON Lines log,
and an `on_event` that raises never fails a save."""

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cairn

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import cairn
    durable, local = sys.argv[1], sys.argv[2]
    mgr = cairn.CheckpointManager(durable, local=local, local_policies=[cairn.Every(1)], policies=[cairn.Every(2)],
                                  async_save=False, preemption_signal=None)
    for step in (1, 2):
        # 48 MiB: the upload is still copying when the process dies.
        mgr.on_step(step, {"w": np.full(12 << 20, step, np.float32), "step": step})
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def state(step):
    return np.full(12 << 20, step, np.float32)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_an_upload_cut_by_sigkill_is_finished_by_the_next_manager(tmp_path, store, request):
    durable = str(tmp_path / "durable") if store == "local" else request.getfixturevalue("s3_run")
    local = tmp_path / "local"
    child = subprocess.run([sys.executable, "-c", CHILD, durable, str(local)], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    # Step 2 committed locally before the kill; its upload was owed (the marker says so).
    assert (local / "step-000000000002" / "manifest.json").exists()
    assert (local / ".cairn-uploads" / "step-000000000002").exists()
    assert 2 not in [i.step for i in cairn.list_checkpoints(durable)]

    with cairn.CheckpointManager(durable, local=local, local_policies=[cairn.Every(1)], policies=[cairn.Every(2)],
                                 preemption_signal=None) as mgr:
        assert mgr.local is not None
        mgr.wait()
        assert mgr.pending_uploads() == []
        assert mgr.cleanup_errors() == []
    durable_steps = [i.step for i in cairn.list_checkpoints(durable)]
    assert durable_steps == [2]
    loaded = cairn.load(durable, step=2)
    np.testing.assert_array_equal(loaded["w"], state(2))
    assert loaded["step"] == 2
    assert not (local / ".cairn-uploads" / "step-000000000002").exists()


def test_restore_passes_over_a_damaged_local_copy_with_a_warning(tmp_path):
    durable, local = tmp_path / "durable", tmp_path / "local"
    with cairn.CheckpointManager(durable, local=local, local_policies=[cairn.Every(1)], policies=[cairn.Every(2)],
                                 keep_local=2, preemption_signal=None) as mgr:
        for step in range(1, 5):
            mgr.on_step(step, {"w": np.full(1024, step, np.float32)})
        mgr.wait()
        for shard in (local / "step-000000000004" / "shards").iterdir():
            data = bytearray(shard.read_bytes())
            data[-1] ^= 0xFF
            shard.write_bytes(bytes(data))
        with pytest.warns(cairn.DamagedCheckpointWarning, match="step-000000000004"):
            restored, info = mgr.restore()
        assert info.step == 4 and info.uri.startswith(mgr.run.rstrip("/") + "/"), (info.uri, mgr.run)
        np.testing.assert_array_equal(restored["w"], np.full(1024, 4, np.float32))
        # Into a target too: the damaged local copy is passed over the same way...
        target = {"w": np.zeros(1024, np.float32)}
        with pytest.warns(cairn.DamagedCheckpointWarning, match="step-000000000004"):
            _, info = mgr.restore(target=target)
        assert info.step == 4 and info.uri.startswith(mgr.run.rstrip("/") + "/"), (info.uri, mgr.run)
        np.testing.assert_array_equal(target["w"], np.full(1024, 4, np.float32))
        # ... a step is found on the tier that has it (3: local only)...
        _, info = mgr.restore(3, target=target)
        assert info.step == 3 and info.uri.startswith(mgr.local.rstrip("/") + "/")
        np.testing.assert_array_equal(target["w"], np.full(1024, 3, np.float32))
        # ... and the caller's own mistake is raised as it is, not passed over.
        with pytest.raises(cairn.CheckpointNotFoundError, match="nope"):
            mgr.restore(target={"nope": np.zeros(3, np.float32)})


def test_events_reach_the_callback_and_the_log_and_a_raising_callback_fails_nothing(tmp_path, monkeypatch):
    seen, reported = [], []
    monkeypatch.setattr(sys, "unraisablehook", lambda raised: reported.append(raised.exc_value))
    log = tmp_path / "events.jsonl"

    def on_event(event):
        seen.append(event)
        raise RuntimeError("a broken dashboard")

    with cairn.CheckpointManager(tmp_path / "durable", local=tmp_path / "local", local_policies=[cairn.Every(1)],
                                 policies=[cairn.Every(2)], keep_local=1, keep=cairn.KeepLast(1),
                                 on_event=on_event, event_log=log, preemption_signal=None) as mgr:
        for step in range(1, 5):
            mgr.on_step(step, {"w": np.full(1024, step, np.float32)}, metrics={"loss": 1.0 / step})
        mgr.wait()
        mgr.restore()
        infos = mgr.list()
    # Saves in order on one thread; each upload after its save; the restore last.
    order = [(e["operation"], e["step"]) for e in seen]
    assert [step for op, step in order if op == "save"] == [1, 2, 3, 4]
    assert all(order.index(("save", s)) < order.index(("upload", s)) for s in (2, 4))
    assert order[-1] == ("load", 4) and seen[-1]["tier"] == "local"
    saves = [e for e in seen if e["operation"] == "save"]
    assert all(set(e["phases"]) == {"snapshot", "write", "commit"} and e["bytes"] > 0 and e["error"] is None for e in saves)
    uploads = [e for e in seen if e["operation"] == "upload"]
    assert [e["step"] for e in uploads] == [2, 4] and all(set(e["phases"]) == {"upload", "verify"} for e in uploads)
    assert {e["step"] for e in seen if e["operation"] == "delete" and e["tier"] == "durable"} == {2}
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert logged == seen
    # The manifests keep the saves' own timings.
    assert all("write" in i.timings and "snapshot" in i.timings for i in infos)
    # Each exception of the callback was reported as unraisable, none reached a save.
    assert len(reported) == len(seen) and all(isinstance(e, RuntimeError) for e in reported)
