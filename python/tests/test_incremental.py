"""Incremental saves through the Python API: a fine-tuning run with a frozen base writes
only what changed, retention keeps every committed checkpoint whole, and the CLI shows
the saving and copies a checkpoint that stands alone."""

import datetime as _dt
import json
import math
import subprocess

import numpy as np
import pytest
import torch

import cairn

BASE = 1 << 20  # float32 elements: 4 MiB frozen


def fine_tuning(step: int, base: torch.Tensor) -> dict:
    g = torch.Generator().manual_seed(step)
    adapter = torch.randn(64, 64, generator=g)
    return {
        "model": {"base.weight": base, "lora.A": adapter, "lora.B": adapter.T.contiguous()},
        "optim": {"exp_avg": adapter * 0.1, "step": torch.tensor(step)},
        "rng": np.random.default_rng(step).bit_generator.state,
        "step": step,
    }


def test_a_frozen_base_is_written_once_and_every_kept_checkpoint_resumes_bit_exact(run_dir, cli):
    base = torch.randn(BASE, generator=torch.Generator().manual_seed(0))
    with cairn.CheckpointManager(run_dir, keep=cairn.KeepLast(2), async_save=True) as manager:  # the default
        for step in range(1, 7):
            manager.save(step, fine_tuning(step, base))
            manager.wait()
    infos = cairn.list_checkpoints(run_dir)
    assert [i.step for i in infos] == [5, 6]
    for info in infos:
        assert info.tensor_bytes > BASE * 4
        assert info.written_bytes < 100_000, info
        restored = cairn.load(run_dir / f"step-{info.step:012d}", framework="torch")
        expected = fine_tuning(info.step, base)
        assert torch.equal(restored["model"]["base.weight"], base)
        assert torch.equal(restored["model"]["lora.A"], expected["model"]["lora.A"])
        assert restored["rng"] == expected["rng"]
    # Steps 1 to 4 are gone, but the base they wrote stays while 5 and 6 refer to it.
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-"))[0] == "step-000000000001"
    assert not (run_dir / "step-000000000001" / "manifest.json").exists()

    listed = subprocess.run([cli, "ls", str(run_dir)], capture_output=True, text=True, check=True).stdout
    assert "WRITTEN" in listed and "saved by incremental saves" in listed, listed
    rows = json.loads(subprocess.run([cli, "ls", "--json", str(run_dir)], capture_output=True, text=True, check=True).stdout)
    assert all(r["written_bytes"] < r["bytes"] for r in rows), rows
    subprocess.run([cli, "verify", str(run_dir)], capture_output=True, text=True, check=True)

    # A copy of one checkpoint stands alone: it loads after the whole run is gone.
    copy = run_dir.parent / "copy"
    subprocess.run([cli, "cp", str(run_dir / "step-000000000006"), str(copy)], capture_output=True, text=True, check=True)
    with cairn.CheckpointManager(run_dir) as manager:
        manager.reset()
    assert not any(run_dir.rglob("*.safetensors"))
    restored = cairn.load(copy, framework="torch")
    assert torch.equal(restored["model"]["base.weight"], base)


def test_a_manager_without_incremental_saves_writes_everything(run_dir):
    base = torch.randn(BASE // 4, generator=torch.Generator().manual_seed(1))
    with cairn.CheckpointManager(run_dir, incremental=False) as manager:
        manager.save(1, fine_tuning(1, base))
        manager.save(2, fine_tuning(2, base))
    assert all(i.written_bytes >= i.tensor_bytes for i in cairn.list_checkpoints(run_dir))
    # Full saves record no content ids: the first incremental save after them writes
    # everything, the next one refers to it.
    info = cairn.save(run_dir, fine_tuning(3, base), step=3, incremental=True)
    assert info.written_bytes >= info.tensor_bytes
    info = cairn.save(run_dir, fine_tuning(4, base), step=4, incremental=True)
    assert info.written_bytes < info.tensor_bytes // 2
    assert torch.equal(cairn.load(run_dir, framework="torch")["model"]["base.weight"], base)


def test_an_automatic_save_interval_follows_what_saves_cost(run_dir):
    base = torch.randn(BASE // 4, generator=torch.Generator().manual_seed(2))
    with pytest.raises(cairn.InvalidArgumentError, match="mtbf"):
        cairn.CheckpointManager(run_dir, save_interval="auto")
    with pytest.raises(cairn.InvalidArgumentError, match="mtbf"):
        cairn.CheckpointManager(run_dir, mtbf=3600)
    with cairn.CheckpointManager(run_dir, policies=[cairn.Every(10**9)], save_interval="auto",
                                 mtbf=_dt.timedelta(hours=1), async_save=False) as manager:
        assert manager.cadence() == cairn.Cadence(None, None, None, 3600.0)
        assert manager.on_step(1, fine_tuning(1, base)), "nothing measured yet: the first save is due at once"
        cadence = manager.cadence()
        assert cadence.blocking > 0 and cadence.writing >= cadence.blocking
        # Daly's optimum for the measured stall, never shorter than a write.
        c, m = cadence.blocking, 3600.0
        r = c / (2 * m)
        daly = math.sqrt(2 * c * m) * (1 + math.sqrt(r) / 3 + r / 9) - c
        assert cadence.interval == pytest.approx(max(daly, cadence.writing), rel=1e-9)
        assert not manager.on_step(2, fine_tuning(2, base)), "the interval has not passed"
    assert [i.temporary for i in cairn.list_checkpoints(run_dir)] == [True]
