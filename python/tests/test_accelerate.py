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
    assert set(newest) == {"models", "optimizers", "schedulers", "dataloaders", "custom", "num_models", "step", "rng"}
    assert newest["custom"] == [{"samples": steps[-1] * 4}]
    assert not [p for p in run.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    manifest = json.loads((run / f"step-{steps[-1]:012d}" / "manifest.json").read_text())
    assert manifest["writer"]["world_size"] == processes
    if processes == 2:  # each process's RNG state is its own
        other = cairn.load(run, framework="torch", prefix="rng.", rank=1)["rng"]
        assert not torch.equal(other["cpu"], newest["rng"]["cpu"])


def test_a_run_without_checkpoints_starts_fresh_and_what_does_not_match_is_refused(tmp_path):
    accelerator = accelerate.Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    run = tmp_path / "run"
    assert cairn.accelerate.load_state(accelerator, run) is None
    cairn.accelerate.save_state(accelerator, run, step=3)
    assert cairn.accelerate.load_state(accelerator, run) == 3
    # Going back: a save at or below the newest step would be shadowed by it on resume.
    with pytest.raises(cairn.InvalidArgumentError, match="step 3, at or after step=2"):
        cairn.accelerate.save_state(accelerator, run, step=2)
    assert [info.step for info in cairn.list_checkpoints(run)] == [3]

    # Another set of prepared objects: refused before anything is changed.
    other = accelerate.Accelerator(cpu=True)
    models = [other.prepare(torch.nn.Linear(2, 2)) for _ in range(2)]
    before = [p.detach().clone() for p in models[0].parameters()]
    other.prepare(torch.optim.SGD(models[0].parameters(), lr=0.1))
    with pytest.raises(cairn.InvalidArgumentError, match="holds 1 models, this accelerator has 2"):
        cairn.accelerate.load_state(other, run)
    assert all(torch.equal(a, b) for a, b in zip(before, models[0].parameters()))

    # State hooks would not run: refused, on save and on load.
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: None)
    with pytest.raises(cairn.InvalidArgumentError, match="register_save_state_pre_hook"):
        cairn.accelerate.save_state(accelerator, run, step=4)
