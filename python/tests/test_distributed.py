"""Many writers, for real: 4 processes save row- and column-sharded tensors plus replicated
ones (to local disk and to S3 on SeaweedFS, coordinated through the store, or through
torch.distributed with gloo); 1, 2 and 3 processes load them back bit-exact; a rank
killed mid-save leaves nothing committed."""

import json
import os
import pathlib
import subprocess
import sys
import uuid

import numpy as np
import pytest

import cairn

WORKER = str(pathlib.Path(__file__).with_name("dist_worker.py"))


def run_ranks(mode, uri, world, *extra, env=None):
    procs = [
        subprocess.Popen([sys.executable, WORKER, mode, str(uri), str(r), str(world), *map(str, extra)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        for r in range(world)
    ]
    return [(p.wait(timeout=180), p.stdout.read(), p.stderr.read()) for p in procs]


def save_and_reload(uri, coord="store", env=None):
    results = run_ranks("save", uri, 4, 7, coord, env=env)
    assert all(code == 0 for code, _, _ in results), results
    ids = {out.split()[1] for _, out, _ in results}
    assert len(ids) == 1, f"ranks disagree on the outcome: {results}"
    for m in (1, 2, 3):
        loads = run_ranks("load", uri, m)
        assert all(code == 0 and out.strip() == "ok" for code, out, _ in loads), loads
    full = cairn.load(uri)
    assert full["model"]["rows"].tolist() == np.arange(48, dtype=np.float32).reshape(8, 6).tolist()


def test_four_processes_save_to_local_disk_and_reload_on_one_two_three(tmp_path):
    save_and_reload(tmp_path / "run")
    info = cairn.list_checkpoints(tmp_path / "run")[0]
    assert info.step == 7


def test_four_processes_save_to_s3(tmp_path):
    base = os.environ.get("CAIRN_TEST_S3_URI")
    if not base:
        if os.environ.get("CI"):
            pytest.fail("CAIRN_TEST_S3_URI is not set: run under scripts/with-seaweedfs.sh")
        pytest.skip("no S3 server: run under scripts/with-seaweedfs.sh")
    save_and_reload(f"{base}/dist-{uuid.uuid4().hex[:8]}")


def test_torch_distributed_gloo_collectives_coordinate(tmp_path):
    env = {"CAIRN_TEST_INIT": f"file://{tmp_path}/rendezvous", "GLOO_SOCKET_IFNAME": "lo"}
    save_and_reload(tmp_path / "run", coord="torch", env=env)


def test_a_rank_killed_mid_save_leaves_nothing_committed(tmp_path):
    uri = tmp_path / "run"
    procs = []
    for r in range(4):
        args = [sys.executable, WORKER, "save", str(uri), str(r), "4", "9", "store"]
        args += ["150", "big"] if r == 3 else ["-1", "big"]
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "CAIRN_TEST_TIMEOUT": "8"}))
    results = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
    assert results[3][0] == -9, results  # SIGKILLed
    for code, out in results[:3]:
        assert code == 3 and "timed out waiting for ranks [3]" in out, results
    assert cairn.list_checkpoints(uri) == []
    # The next save succeeds, and the dead attempt's files are pruned.
    again = run_ranks("save", uri, 4, 9)
    assert all(code == 0 for code, _, _ in again), again
    assert [i.step for i in cairn.list_checkpoints(uri)] == [9]
    assert cairn.load(uri)["step"] == 7


def test_the_old_names_shard_and_slices_still_work_and_warn(tmp_path):
    with pytest.warns(DeprecationWarning, match="cairn.Piece"):
        old = cairn.Shard(np.zeros((2, 3), np.float32), offsets=(0, 0), global_shape=(4, 3))
    assert isinstance(old, cairn.Piece)
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    cairn.save(str(tmp_path / "run"), {"w": w}, step=1)
    with pytest.warns(DeprecationWarning, match="boxes="):
        part = cairn.load(str(tmp_path / "run"), slices={"w": ((2, 0), (2, 3))})
    np.testing.assert_array_equal(part["w"], w[2:])
    with pytest.raises(cairn.InvalidArgumentError, match="boxes"):
        cairn.load(str(tmp_path / "run"), boxes={"w": ((0, 0), (1, 3))}, slices={"w": ((0, 0), (1, 3))})


def test_each_rank_gets_back_its_own_plain_values_and_tensors(tmp_path):
    import threading

    run = tmp_path / "run"
    errors = []

    def rank(r):
        try:
            state = {"w": cairn.Piece(np.full((1, 3), r, np.float32), offsets=(r, 0), global_shape=(2, 3)),
                     "loader": {"pos": 100 + r}, "step": 5,
                     "rng": np.full(4, 7 + r, np.uint8), "shared": np.arange(3.0)}
            if r == 1:
                state["only_mine"] = "rank one"
            cairn.save(run, state, step=5, rank=r, world_size=2, timeout=60)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    mine = cairn.load(run, rank=1)
    assert mine["loader"]["pos"] == 101 and mine["only_mine"] == "rank one"
    assert mine["rng"].tolist() == [8] * 4 and mine["shared"].tolist() == [0.0, 1.0, 2.0]
    assert mine["w"].tolist() == [[0, 0, 0], [1, 1, 1]]
    first = cairn.load(run)
    assert first["loader"]["pos"] == 100 and "only_mine" not in first and first["rng"].tolist() == [7] * 4
    target = {"w": np.zeros((2, 3), np.float32), "loader": {"pos": 0}, "step": 0, "only_mine": "",
              "rng": np.zeros(4, np.uint8), "shared": np.zeros(3)}
    filled = cairn.load(run, target=target, rank=1, step=5)
    assert filled["loader"]["pos"] == 101 and filled["only_mine"] == "rank one" and target["w"][1].tolist() == [1, 1, 1]
    assert target["rng"].tolist() == [8] * 4
    # The per-rank record follows the published schema.
    import jsonschema
    schema = json.loads((pathlib.Path(__file__).resolve().parents[2] / "docs" / "manifest.schema.json").read_text())
    manifest = json.loads((run / "step-000000000005" / "manifest.json").read_text())
    jsonschema.validate(manifest, schema)
    assert list(manifest["ranks"]) == ["1"]
    assert list(manifest["ranks"]["1"]["tensors"]) == ["rng"]  # "shared" is written once
