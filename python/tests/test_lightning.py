"""Cairn as Lightning's checkpoint IO (`cairn.lightning.CheckpointIO`): a real
`lightning.Trainer` run, SIGKILLed mid-run and resumed with `fit(ckpt_path="last")`, ends
bit-exact with an uninterrupted run under Lightning's own TorchCheckpointIO, keeping the
same checkpoints (`save_top_k=2` by `val_loss`, and `last`)."""

import json
import pathlib
import subprocess
import sys
import time

import pytest
import torch

import cairn
import cairn.lightning

WORKER = str(pathlib.Path(__file__).with_name("lightning_worker.py"))


def train(root, io, kill_at=None):
    args = [sys.executable, WORKER, str(root), io] + ([str(kill_at)] if kill_at is not None else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if kill_at is not None:
        assert done.returncode == -9, done.stderr[-3000:]
        return None
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((root / "final.json").read_text())


def test_a_killed_trainer_resumes_bit_exact_and_keeps_the_best_two(tmp_path):
    reference = train(tmp_path / "torch", "torch")
    train(tmp_path / "cairn", "cairn", kill_at=14)  # in epoch 3, after epoch 2's saves
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

    # A background failure is raised by the next save, and by teardown.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    io.save_checkpoint({"w": weights}, blocker / "b.ckpt")
    deadline = time.monotonic() + 30
    while io._in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(cairn.CheckpointError):
        io.save_checkpoint({"w": weights}, tmp_path / "c.ckpt")
    io.save_checkpoint({"w": weights}, blocker / "d.ckpt")
    with pytest.raises(cairn.CheckpointError):
        io.teardown()
    io.teardown()  # reported once

    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()
    io.remove_checkpoint(tmp_path / "never-saved.ckpt")
    with pytest.raises(cairn.InvalidArgumentError, match="map_location"):
        io.load_checkpoint(tmp_path / "c.ckpt", map_location=lambda storage, loc: storage)
