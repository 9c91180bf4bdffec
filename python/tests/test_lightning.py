"""Cairn as Lightning's checkpoint IO (`cairn.lightning.CheckpointIO`): a real
`lightning.Trainer` run, SIGKILLed mid-run and resumed with `fit(ckpt_path="last")`, ends
bit-exact with an uninterrupted run under Lightning's own TorchCheckpointIO, keeping the
same checkpoints (`save_top_k=2` by `val_loss`, and `last`)."""

import concurrent.futures
import json
import pathlib
import subprocess
import sys

import pytest
import torch

import cairn
import cairn.lightning

WORKER = str(pathlib.Path(__file__).with_name("lightning_worker.py"))


def train(root, io, kill_at=None):
    args = [sys.executable, WORKER, str(root), io] + ([kill_at] if kill_at is not None else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if kill_at is not None:
        assert done.returncode == -9, done.stderr[-3000:]
        return None
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((root / "final.json").read_text())


def test_a_killed_trainer_resumes_bit_exact_and_keeps_the_best_two(tmp_path):
    reference = train(tmp_path / "torch", "torch")
    # Killed while epoch 2's saves may still be writing: whatever was committed resumes
    # (last.ckpt of epoch 1 or 2), never a torn one, and the run ends bit-exact.
    train(tmp_path / "torn", "cairn", kill_at="14!")
    assert train(tmp_path / "torn", "cairn")["weights"] == reference["weights"]

    train(tmp_path / "cairn", "cairn", kill_at="14")  # in epoch 3, after epoch 2's saves landed
    killed = sorted(p.name for p in (tmp_path / "cairn" / "ckpts").iterdir())
    assert "last.ckpt" in killed
    resumed = train(tmp_path / "cairn", "cairn")
    assert resumed["weights"] == reference["weights"]
    # ModelCheckpoint(save_top_k=2, monitor="val_loss") kept the same two as with
    # Lightning's own IO (not the newest two), and removed the others.
    assert resumed["names"] == reference["names"]
    assert resumed["best"] == reference["best"]
    assert resumed["names"] != ["epoch=4-step=20.ckpt", "epoch=5-step=24.ckpt", "last.ckpt"]
    for name in resumed["names"]:
        path = tmp_path / "cairn" / "ckpts" / name
        infos = cairn.list_checkpoints(path)
        assert len(infos) == 1, (name, infos)  # each save of `last.ckpt` replaced the one before
        assert not [p for p in path.rglob("*") if p.is_file() and p.suffix not in (".json", ".safetensors")]
    # `last.ckpt` holds what Lightning's own holds (the state when the last top-k save
    # happened), loaded back without pickle.
    last = cairn.load(tmp_path / "cairn" / "ckpts" / "last.ckpt", framework="torch")
    theirs = torch.load(tmp_path / "torch" / "ckpts" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (theirs["epoch"], theirs["global_step"])
    for key, tensor in theirs["state_dict"].items():
        assert torch.equal(last["state_dict"][key], tensor), key


def test_saves_run_in_the_background_bounded_and_failures_surface(tmp_path):
    io = cairn.lightning.CheckpointIO(max_in_flight=1)
    weights = torch.zeros(256, 256)
    io.save_checkpoint({"w": weights, "global_step": 3}, tmp_path / "a.ckpt")
    weights += 1  # training goes on: the save in flight wrote the state as it was
    io.save_checkpoint({"w": weights, "global_step": 4}, tmp_path / "a.ckpt")  # waits for the first
    back = io.load_checkpoint(tmp_path / "a.ckpt")
    assert back["global_step"] == 4 and torch.equal(back["w"], weights)
    assert [i.step for i in cairn.list_checkpoints(tmp_path / "a.ckpt")] == [4]

    # Lightning removes the checkpoint a new one replaces right after asking for the new
    # save: the removal queues behind it, so the new one is there before the old goes.
    io.save_checkpoint({"w": weights, "global_step": 5}, tmp_path / "b.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    io.teardown()
    assert not (tmp_path / "a.ckpt").exists()
    assert cairn.load(tmp_path / "b.ckpt")["global_step"] == 5

    # A background failure is raised by the next save, and by teardown; it stops the
    # removals queued behind it.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    io.save_checkpoint({"w": weights}, blocker / "c.ckpt")
    io.remove_checkpoint(tmp_path / "b.ckpt")
    concurrent.futures.wait(list(io._pending))
    with pytest.raises(cairn.CheckpointError):
        io.save_checkpoint({"w": weights}, tmp_path / "d.ckpt")
    assert (tmp_path / "b.ckpt").exists()
    io.save_checkpoint({"w": weights}, blocker / "e.ckpt")
    with pytest.raises(cairn.CheckpointError):
        io.teardown()
    io.teardown()  # reported once

    io.remove_checkpoint(tmp_path / "never-saved.ckpt")
    with pytest.raises(cairn.InvalidArgumentError, match="map_location"):
        io.load_checkpoint(tmp_path / "b.ckpt", map_location=lambda storage, loc: storage)
    io.teardown()


def test_synchronous_saves_write_before_returning(tmp_path):
    io = cairn.lightning.CheckpointIO(async_save=False)
    io.save_checkpoint({"w": torch.ones(3), "global_step": 1}, tmp_path / "a.ckpt")
    assert [i.step for i in cairn.list_checkpoints(tmp_path / "a.ckpt")] == [1]
    io.save_checkpoint({"w": torch.ones(3), "global_step": 1}, tmp_path / "a.ckpt")  # same step again
    assert [i.step for i in cairn.list_checkpoints(tmp_path / "a.ckpt")] == [2]
    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()
    with pytest.raises(cairn.CheckpointError):
        io.save_checkpoint({"w": object()}, tmp_path / "b.ckpt")
