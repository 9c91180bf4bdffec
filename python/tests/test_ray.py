"""Cairn in Ray Train (`cairn.ray`): a real local Ray cluster, a TorchTrainer with 2 DDP
workers whose reports commit Cairn checkpoints. A worker failure mid-run restarts the group
from `ray.train.get_checkpoint()`, and the run ends bit-exact with one never interrupted;
Ray keeps `num_to_keep` checkpoints, each a committed Cairn checkpoint."""

import os
import pathlib

import pytest
import torch

ray = pytest.importorskip("ray")
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402

import cairn  # noqa: E402
import cairn.ray  # noqa: E402

EPOCHS = 5


def train_func(config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(100 + rank)  # each worker's dropout draws its own
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = cairn.ray.load(checkpoint, framework="torch")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.random.set_rng_state(state["rng"])
        start = state["epoch"] + 1
    model = ray.train.torch.prepare_model(model)
    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(rank))
    for epoch in range(start, EPOCHS):
        if epoch == 3 and not os.path.exists(config["failed_once"]):
            pathlib.Path(config["failed_once"]).touch()
            raise RuntimeError("a worker dies")
        loss = model(data).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = {
            "model": model.module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.random.get_rng_state(),
            "epoch": epoch,
        }
        cairn.ray.report({"loss": loss.item(), "epoch": epoch}, state, step=epoch)


def fit(tmp_path, name, fail):
    marker = tmp_path / f"{name}.failed"
    if not fail:
        marker.touch()
    trainer = ray.train.torch.TorchTrainer(
        train_func,
        train_loop_config={"failed_once": str(marker)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(tmp_path / "results"),
            failure_config=ray.train.FailureConfig(max_failures=1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


@pytest.fixture(scope="module")
def local_ray():
    # The workers import train_func from this file.
    here = str(pathlib.Path(__file__).parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": here}})
    yield
    ray.shutdown()


def test_a_failed_worker_group_resumes_from_the_cairn_checkpoint_bit_exact(tmp_path, local_ray):
    reference = fit(tmp_path, "reference", fail=False)
    resumed = fit(tmp_path, "failed", fail=True)
    assert (tmp_path / "failed.failed").exists()  # the failure did happen
    final = cairn.ray.load(resumed.checkpoint, framework="torch")
    expected = cairn.ray.load(reference.checkpoint, framework="torch")
    assert final["epoch"] == expected["epoch"] == EPOCHS - 1
    for key, tensor in expected["model"].items():
        assert torch.equal(final["model"][key], tensor), key
    # Each worker's RNG state is its own; the checkpoint keeps both.
    rngs = [cairn.ray.load(resumed.checkpoint, framework="torch", rank=r)["rng"] for r in (0, 1)]
    assert not torch.equal(rngs[0], rngs[1])

    # Ray kept the newest two; each is one committed Cairn checkpoint of its step, with
    # the metrics it was reported with, and nothing pickled.
    run = tmp_path / "results" / "failed"
    kept = [p for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    steps = sorted(i.step for p in kept for i in cairn.list_checkpoints(p))
    assert steps == [EPOCHS - 2, EPOCHS - 1]
    for folder in kept:
        assert "loss" in cairn.list_checkpoints(folder)[0].metrics
        assert {p.suffix for p in folder.rglob("*") if p.is_file()} <= {".json", ".safetensors"}


def test_an_asynchronous_upload_is_refused():
    # Ray would run the commit on a thread while training changes the state.
    with pytest.raises(cairn.InvalidArgumentError, match="synchronously"):
        cairn.ray.report({}, {}, step=0, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
