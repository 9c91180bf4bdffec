"""Accelerate: a loop with a plain `accelerate.Accelerator` checkpointing through
`cairn.accelerate`, SIGKILLed mid-epoch and resumed, ends with the same weights as a run
never stopped (model, optimizer, schedule, dataloader position, custom objects, RNG)."""

import json
import os
import pathlib
import subprocess
import sys

import accelerate
import pytest
import safetensors.torch
import torch

import cairn
import cairn.accelerate

WORKER = str(pathlib.Path(__file__).with_name("accelerate_worker.py"))


def train(run, out, kill_at=None, processes=1):
    launch = [sys.executable] if processes == 1 else [
        str(pathlib.Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + [WORKER, str(run), str(out)] + ([str(kill_at)] if kill_at else []),
                          capture_output=True, text=True, timeout=300, env=env)
    expected = 0 if kill_at is None else (-9 if processes == 1 else 1)
    assert done.returncode == expected, done.stderr[-4000:]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_accelerate_loop_resumes_bit_exact(tmp_path, processes):
    train(tmp_path / "straight", tmp_path / "straight.safetensors", processes=processes)
    run = tmp_path / "run"
    # Killed at step 13 (of 36 on one process, 18 on two), mid-epoch: the newest
    # checkpoint is step 10, the one before 5.
    train(run, tmp_path / "unused", kill_at=13, processes=processes)
    assert [info.step for info in cairn.list_checkpoints(run)] == [5, 10]
    train(run, tmp_path / "resumed.safetensors", processes=processes)
    straight = safetensors.torch.load_file(tmp_path / "straight.safetensors")
    resumed = safetensors.torch.load_file(tmp_path / "resumed.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # Retention kept the last two; the newest checkpoint, written by every process, holds
    # no pickles and loads as plain tensors and values.
    steps = [info.step for info in cairn.list_checkpoints(run)]
    assert steps == [steps[0], steps[0] + 5] and steps[-1] == (35 if processes == 1 else 15)
    newest = cairn.load(run, framework="torch")
    assert set(newest) == {"models", "optimizers", "schedulers", "dataloaders", "custom", "step", "rng"}
    assert newest["custom"] == [{"samples": steps[-1] * 4}]
    assert not [p for p in run.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    manifest = json.loads((run / f"step-{steps[-1]:012d}" / "manifest.json").read_text())
    assert manifest["writer"]["world_size"] == processes


def test_a_run_without_checkpoints_starts_fresh_and_a_mismatched_state_is_refused(tmp_path):
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    assert cairn.accelerate.load_state(accelerator, tmp_path / "run") is None
    cairn.accelerate.save_state(accelerator, tmp_path / "run", step=3)
    assert cairn.accelerate.load_state(accelerator, tmp_path / "run") == 3
    other = accelerate.Accelerator(cpu=True)  # a second optimizer the save did not have
    params = list(other.prepare(torch.nn.Linear(2, 2)).parameters())
    other.prepare(torch.optim.SGD(params, lr=0.1), torch.optim.SGD(params, lr=0.2))
    with pytest.raises(cairn.InvalidArgumentError, match="1 optimizers.*has 2"):
        cairn.accelerate.load_state(other, tmp_path / "run")
