"""Cairn as torch DCP's storage backend (`cairn.dcp`): real `torch.distributed.checkpoint`
saves and loads, in one process and on FSDP2 under torchrun, compared with DCP's own
`FileSystemWriter` on the same state."""

import datetime
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

import cairn
import cairn.dcp

WORKER = str(pathlib.Path(__file__).with_name("dcp_worker.py"))
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def trained(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def state_of(model, opt, epoch=0):
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "progress": {"epoch": epoch, "history": [0.5, 0.25], "name": "run", "rng": (1, 2**80)},
    }


def equal(a, b, path="state"):
    if isinstance(b, dict):
        assert set(map(str, a)) == set(map(str, b)), (path, sorted(a), sorted(b))
        by_name = {str(k): v for k, v in a.items()}
        for k, v in b.items():
            equal(by_name[str(k)], v, f"{path}.{k}")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            equal(x, y, f"{path}.{i}")
    elif isinstance(b, torch.Tensor):
        assert torch.equal(torch.as_tensor(a), b), path
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("planner", [None, cairn.dcp.SavePlanner()], ids=["dcp_planner", "cairn_planner"])
def test_a_dcp_save_is_a_cairn_checkpoint_equal_to_dcps_own(tmp_path, planner):
    model, opt = trained(0)
    state = state_of(model, opt, epoch=3)
    writer = cairn.dcp.Writer(tmp_path / "cairn")
    dcp.save(state, storage_writer=writer, planner=planner)
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    assert writer.info.num_tensors == len(state["model"]) + 3 * len(state["model"])

    # DCP's load through the Cairn reader fills fresh objects exactly as DCP's own.
    for load_planner in (None, cairn.dcp.LoadPlanner()):
        ours, theirs = state_of(*trained(1)), state_of(*trained(2))
        dcp.load(ours, storage_reader=cairn.dcp.Reader(tmp_path / "cairn"), planner=load_planner)
        dcp.load(theirs, checkpoint_id=str(tmp_path / "dcp"))
        equal(ours, theirs)
        equal(ours, state)

    # An ordinary Cairn checkpoint: plain safetensors shards and the manifest (JSON), no
    # pickle anywhere; cairn.load gives the nested state, verify passes.
    files = sorted(str(p.relative_to(tmp_path / "cairn")) for p in (tmp_path / "cairn").rglob("*") if p.is_file())
    assert files[0] == "manifest.json" and all(f.startswith("shards/") and f.endswith(".safetensors") for f in files[1:])
    loaded = cairn.load(tmp_path / "cairn", framework="torch")
    equal(loaded, state)
    assert loaded["progress"]["rng"] == (1, 2**80)
    manifest = json.loads((tmp_path / "cairn" / "manifest.json").read_text())
    assert manifest["values"]["progress.epoch"] == {"int": 3}


def test_a_value_that_would_need_pickle_is_refused_naming_it_and_nothing_is_committed(tmp_path):
    model, opt = trained(0)
    for planner in (None, cairn.dcp.SavePlanner()):
        state = dict(state_of(model, opt), progress={"when": datetime.date(2026, 1, 1)})
        with pytest.raises(BaseException, match="progress.when"):
            dcp.save(state, storage_writer=cairn.dcp.Writer(tmp_path / "run", step=1), planner=planner)
        assert not (tmp_path / "run").exists() or cairn.list_checkpoints(tmp_path / "run") == []
    # The same step saves once the state is storable; a committed step is never rewritten.
    dcp.save(state_of(model, opt), storage_writer=cairn.dcp.Writer(tmp_path / "run", step=1))
    with pytest.raises(BaseException, match="already"):
        dcp.save(state_of(model, opt), storage_writer=cairn.dcp.Writer(tmp_path / "run", step=1))


def test_keys_that_would_collide_in_the_manifest_are_refused(tmp_path):
    # DCP keeps a tuple whole (one value `t`); Cairn stores its items as `t.0`, `t.1`,
    # which a sibling key `t.0` would overwrite.
    state = {"w": torch.ones(2), "meta": {"t": (1, 2), "t.0": 5}}
    with pytest.raises(BaseException, match="meta.t.0"):
        dcp.save(state, storage_writer=cairn.dcp.Writer(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt" / "manifest.json").exists()


def test_steps_saved_through_dcp_form_a_run_with_retention(tmp_path):
    model, opt = trained(0)
    run = tmp_path / "run"
    for step in (10, 20, 30):
        dcp.save(state_of(model, opt, epoch=step), storage_writer=cairn.dcp.Writer(run, step=step))
    assert [i.step for i in cairn.list_checkpoints(run)] == [10, 20, 30]
    # checkpoint_id names the checkpoint folder itself (torchtitan's way); its step comes
    # from the folder's name.
    dcp.save(state_of(model, opt, epoch=40), checkpoint_id=str(run / "step-000000000040"), storage_writer=cairn.dcp.Writer())
    assert [i.step for i in cairn.list_checkpoints(run)] == [10, 20, 30, 40]
    report = cairn.prune(run, keep=cairn.KeepLast(2))
    assert report.deleted == [10, 20]
    target = state_of(*trained(1))
    dcp.load(target, storage_reader=cairn.dcp.Reader(run))  # the latest
    assert target["progress"]["epoch"] == 40


def test_a_checkpoint_saved_by_cairn_loads_through_dcp(tmp_path):
    model, opt = trained(0)
    cairn.save(tmp_path / "ckpt", {"model": model.state_dict(), "meta": {"layers": [8, 16, 4], "tag": "x"}})
    fresh, _ = trained(1)
    target = {"model": fresh.state_dict(), "meta": {"layers": [], "tag": ""}}
    dcp.load(target, storage_reader=cairn.dcp.Reader(tmp_path / "ckpt"))
    equal(target["model"], model.state_dict())
    assert target["meta"] == {"layers": [8, 16, 4], "tag": "x"}


def test_dcp_saves_to_s3(tmp_path):
    base = os.environ.get("CAIRN_TEST_S3_URI")
    if not base:
        if os.environ.get("CI"):
            pytest.fail("CAIRN_TEST_S3_URI is not set: run under scripts/with-seaweedfs.sh")
        pytest.skip("no S3 server: run under scripts/with-seaweedfs.sh")
    run = f"{base}/dcp-{os.getpid()}-{tmp_path.name}"
    model, opt = trained(0)
    dcp.save(state_of(model, opt, epoch=5), storage_writer=cairn.dcp.Writer(run, step=5))
    target = state_of(*trained(1))
    dcp.load(target, storage_reader=cairn.dcp.Reader(run, step=5))
    equal(target, state_of(model, opt, epoch=5))


def torchrun(n, *args):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [TORCHRUN, "--standalone", f"--nproc_per_node={n}", WORKER, *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-3000:] + done.stderr[-6000:]


def test_fsdp2_saved_through_dcp_on_four_ranks_loads_on_two_as_dcps_own(tmp_path, cli):
    run, ref = tmp_path / "run", tmp_path / "ref"
    torchrun(4, "save", run, ref)
    info = cairn.list_checkpoints(run)[0]
    assert info.step == 1
    # Every box was written once (DCP planned it): each tensor's pieces add up to it.
    manifest = json.loads((run / "step-000000000001" / "manifest.json").read_text())
    for key, tensor in manifest["tensors"].items():
        assert sum(math.prod(p["shape"]) for p in tensor["pieces"]) == math.prod(tensor["shape"]), key
    assert len({p["file"] for t in manifest["tensors"].values() for p in t["pieces"]}) > 1
    assert manifest["writer"]["world_size"] == 4
    torchrun(2, "load", run, ref)
    done = subprocess.run([cli, "verify", str(run)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
