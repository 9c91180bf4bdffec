"""The frameworks' sharded state saved as it is held and loaded into what a job has:
FSDP2 DTensors under torchrun (gloo, CPU) on other world sizes, HSDP on a 2-D mesh,
jax arrays sharded over 8 host devices."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cairn

WORKER = str(pathlib.Path(__file__).with_name("fsdp_worker.py"))
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"


def torchrun(n, *args):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [TORCHRUN, "--standalone", f"--nproc_per_node={n}", WORKER, *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-3000:] + done.stderr[-6000:]


def test_fsdp2_state_dict_saved_on_four_processes_loads_into_fresh_models_on_two_and_three(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    torchrun(4, "save", run, ref)
    ckpt = cairn.list_checkpoints(run)[0]
    assert ckpt.step == 1
    # Each DTensor's pieces were written by the rank holding them, and tile the tensor.
    whole = cairn.load(run, framework="torch")
    first = cairn.load(ref, step=1, framework="torch")
    for name, tensor in first["model"].items():
        assert whole["model"][name].equal(tensor), name
    for n in (2, 3):
        torchrun(n, "load", run, ref)


def test_hsdp_on_a_two_by_two_mesh_writes_each_box_once_and_loads_on_a_plain_mesh(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    torchrun(4, "save", run, ref, "2x2")
    info = cairn.list_checkpoints(run)[0]
    plain = cairn.list_checkpoints(ref)[0]
    assert info.tensor_bytes == plain.tensor_bytes
    # The data bytes of every shard file (size less its header) add up to the state once.
    manifest = json.loads((run / "step-000000000001" / "manifest.json").read_text())
    data = sum(f["size"] - f["header_len"] for f in manifest["files"].values())
    assert data == plain.tensor_bytes, "a replicated box was written twice"
    torchrun(2, "load", run, ref)


def test_fsdp2_ranks_save_parts_locally_upload_together_and_restore_from_their_own_parts(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    torchrun(2, "tiers", run, ref)
    # The durable run holds every second step as one checkpoint of both ranks.
    assert [i.step for i in cairn.list_checkpoints(run)] == [2, 4]
    whole = cairn.load(run, step=4, framework="torch")
    want = cairn.load(ref, step=4, framework="torch")
    for name, tensor in want["model"].items():
        assert whole["model"][name].equal(tensor), name
    # Each rank's own folder holds its parts of the last two steps.
    for rank in range(2):
        own = tmp_path / "run-local" / f"rank-{rank:05}"
        assert [i.step for i in cairn.list_checkpoints(own)] == [3, 4]


def test_fsdp_over_tensor_parallel_on_a_two_by_two_mesh_loads_on_a_plain_mesh(tmp_path):
    # FSDP2 over a tensor-parallel model: the first weight is sharded by rows over "tp"
    # and each of those again over "dp" (a _StridedShard placement), the second by
    # columns over "tp" and rows over "dp".
    run, ref = tmp_path / "run", tmp_path / "ref"
    torchrun(4, "save", run, ref, "tp")
    whole = cairn.load(run, framework="torch")
    first = cairn.load(ref, step=1, framework="torch")
    for name, tensor in first["model"].items():
        assert whole["model"][name].equal(tensor), name
    torchrun(2, "load", run, ref)


JAX_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import cairn

    run = sys.argv[1]
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rows = jax.device_put(jnp.arange(64 * 6, dtype=jnp.float32).reshape(64, 6), NamedSharding(mesh, P("data", None)))
    cols = jax.device_put(jnp.arange(4 * 32, dtype=jnp.int32).reshape(4, 32), NamedSharding(mesh, P(None, "model")))
    both = jax.device_put(jnp.ones((8, 8), jnp.bfloat16), NamedSharding(mesh, P("data", "model")))
    rep = jax.device_put(jnp.linspace(0, 1, 5), NamedSharding(mesh, P()))
    info = cairn.save(run, {"rows": rows, "cols": cols, "both": both, "rep": rep}, step=1)
    back = cairn.load(run, framework="jax")
    for k, v in {"rows": rows, "cols": cols, "both": both, "rep": rep}.items():
        assert np.array_equal(np.asarray(back[k]), np.asarray(v)), k
    # every box written once: the bytes are the global arrays', not the replicas'
    assert info.tensor_bytes == sum(np.asarray(v).nbytes for v in (rows, cols, both, rep)), info
    print("ok")
    """
)


def on_eight_devices(script, *args):
    """Runs a Python `script` in a process whose jax has 8 host devices; it prints ok."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-4000:]


def test_jax_arrays_sharded_over_eight_devices_save_their_pieces_once(tmp_path):
    on_eight_devices(JAX_SCRIPT, tmp_path / "run")
    # Stored as pieces: the manifest holds one piece per distinct box.
    manifest = json.loads((tmp_path / "run" / "step-000000000001" / "manifest.json").read_text())
    assert len(manifest["tensors"]["rows"]["pieces"]) == 4 and len(manifest["tensors"]["both"]["pieces"]) == 8


JAX_RESTORE = textwrap.dedent(
    """
    import sys
    from typing import NamedTuple
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import cairn

    class AdamState(NamedTuple):
        count: jax.Array
        mu: dict

    run = sys.argv[1]
    devices = np.array(jax.devices())
    saved_on = Mesh(devices.reshape(4, 2), ("data", "model"))
    w = jax.device_put(jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8), NamedSharding(saved_on, P("data", None)))
    mu = jax.device_put(jnp.ones((16, 8), jnp.bfloat16), NamedSharding(saved_on, P(None, "model")))
    state = {"params": {"w": w}, "opt": AdamState(count=jnp.array(3, jnp.int32), mu={"w": mu}), "step": 7}
    cairn.save(run, state, step=1)

    # Restore onto another mesh, from abstract arrays only: each device gets its box.
    load_on = Mesh(devices.reshape(2, 4), ("a", "b"))
    def abstract(x):
        spec = P(None, "b") if x.ndim == 2 else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(load_on, spec))
    target = jax.tree.map(abstract, {"params": state["params"], "opt": state["opt"]})
    target["step"] = 0
    back = cairn.load(run, target=target, step=1)
    assert isinstance(back["opt"], AdamState), type(back["opt"])
    assert back["step"] == 7
    for got, want, spec in [(back["params"]["w"], w, target["params"]["w"]), (back["opt"].mu["w"], mu, target["opt"].mu["w"]),
                            (back["opt"].count, state["opt"].count, target["opt"].count)]:
        assert got.sharding == spec.sharding, (got.sharding, spec.sharding)
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))
    # A target sharding that does not divide its shape: a typed error naming the key.
    three = NamedSharding(Mesh(devices[:3], ("x",)), P("x", None))
    try:
        cairn.load(run, target={"params": {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=three)}}, step=1)
        raise AssertionError("a sharding that does not fit was accepted")
    except cairn.InvalidArgumentError as e:
        assert "key=`params.w`" in str(e), e
    print("ok")
    """
)


def test_jax_state_restores_into_abstract_arrays_on_another_mesh_keeping_namedtuples(tmp_path):
    on_eight_devices(JAX_RESTORE, tmp_path / "run")


JAX_PROCESSES = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import cairn

    run, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    full = {"rows": np.arange(64 * 6, dtype=np.float32).reshape(64, 6),
            "cols": np.arange(4 * 32, dtype=np.int32).reshape(4, 32),
            "rep": np.linspace(0, 1, 5, dtype=np.float32)}
    specs = {"rows": P("data", None), "cols": P(None, "model"), "rep": P()}
    # Global arrays no process holds whole: each makes only its own devices' shards.
    state = {k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, specs[k]), lambda i, v=v: v[i])
             for k, v in full.items()}
    assert not state["rows"].is_fully_addressable
    state["loader"] = {"pos": 100 + pid}
    info = cairn.save(run, state, step=3)  # ranks from jax.distributed, coordinated through the store
    assert info.tensor_bytes == sum(v.nbytes for v in full.values()), info

    # Restored on another mesh from abstract arrays: each process reads its devices' boxes.
    other = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    other_specs = {"rows": P("b", None), "cols": P("a", "b"), "rep": P()}
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(other, other_specs[k]))
              for k, v in full.items()}
    target["loader"] = {"pos": 0}
    back = cairn.load(run, target=target, step=3)
    assert back["loader"]["pos"] == 100 + pid, back["loader"]  # each process its own values
    for k, v in full.items():
        assert back[k].sharding == target[k].sharding, k
        for shard in back[k].addressable_shards:
            assert np.array_equal(np.asarray(shard.data), v[shard.index]), (k, shard.index)
    print("ok")
    """
)


def test_a_two_process_jax_job_saves_and_restores_arrays_no_process_holds_whole(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", JAX_PROCESSES, str(tmp_path / "run"), str(port), str(pid)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for pid in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "ok" in out, err[-4000:]
    manifest = json.loads((tmp_path / "run" / "step-000000000003" / "manifest.json").read_text())
    assert manifest["writer"]["world_size"] == 2
    assert len(manifest["tensors"]["rows"]["pieces"]) == 4 and len(manifest["tensors"]["rep"]["pieces"]) == 1


def test_a_target_of_another_shape_is_refused_naming_the_key(tmp_path):
    torch = pytest.importorskip("torch")
    cairn.save(tmp_path / "run", {"w": torch.zeros(4, 4), "b": torch.zeros(4)}, step=1)
    target = {"w": torch.ones(4, 4), "b": torch.ones(5)}
    with pytest.raises(cairn.InvalidArgumentError, match="key=`b`"):
        cairn.load(tmp_path / "run", target=target)
    target = {"w": torch.ones(4, 4), "b": torch.ones(4), "extra": torch.ones(1)}
    with pytest.raises(cairn.CheckpointNotFoundError, match="extra"):
        cairn.load(tmp_path / "run", target=target)
    with pytest.raises(cairn.InvalidArgumentError, match="dtype .* key=`w`"):
        cairn.load(tmp_path / "run", target={"w": torch.ones(4, 4, dtype=torch.bfloat16), "b": torch.ones(4)})
    with pytest.raises(cairn.InvalidArgumentError, match="meta device key=`w`"):
        cairn.load(tmp_path / "run", target={"w": torch.ones(4, 4, device="meta"), "b": torch.ones(4)})
    target = {"w": torch.ones(4, 4), "b": np.ones(4, np.float32)}
    filled = cairn.load(tmp_path / "run", target=target)
    assert filled["w"] is target["w"] and filled["b"] is target["b"]
    assert not target["w"].any() and not target["b"].any()


def test_a_value_where_the_target_has_a_tensor_is_refused_and_a_jax_target_is_made(tmp_path):
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    cairn.save(tmp_path / "run", {"w": torch.arange(2, dtype=torch.float32), "lr": 0.1}, step=1)
    with pytest.raises(cairn.InvalidArgumentError, match="plain value where a tensor is required key=`lr`"):
        cairn.load(tmp_path / "run", target={"w": torch.ones(2), "lr": torch.ones(1)})
    back = cairn.load(tmp_path / "run", target={"w": jnp.ones(2), "lr": 0.0})
    assert np.array_equal(np.asarray(back["w"]), [0, 1]) and back["lr"] == 0.1
    with pytest.raises(cairn.InvalidArgumentError, match="dtype .* key=`w`"):
        cairn.load(tmp_path / "run", target={"w": jnp.ones(2, jnp.int32)})
    with pytest.raises(cairn.InvalidArgumentError, match="together"):
        cairn.save(tmp_path / "other", {"w": torch.zeros(2)}, rank=1)


def test_the_manager_restores_into_a_target_and_reads_boxes(tmp_path):
    torch = pytest.importorskip("torch")
    w = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    with cairn.CheckpointManager(tmp_path / "run", policies=[cairn.Every(1)], preemption_signal=None) as mgr:
        mgr.save(5, {"w": w, "lr": 0.5})
        mgr.wait()
        target = {"w": torch.zeros(4, 3), "lr": 0.0}
        state, info = mgr.restore(target=target)
        assert info.step == 5 and state["w"] is target["w"] and torch.equal(target["w"], w) and state["lr"] == 0.5
        part, _ = mgr.restore(boxes={"w": ((2, 0), (2, 3))}, framework="torch")
        assert torch.equal(part["w"], w[2:])


def test_a_load_into_a_target_reads_in_bounded_batches_bf16_included(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from cairn import _api

    d = object()
    places = {"a": [(d, [0], [10])], "b": [(d, [0], [4]), (d, [4], [4])], "v": None}
    monkeypatch.setattr(_api, "_LOAD_BATCH_BYTES", 48)
    assert list(_api._batches(places, {"a": 4, "b": 4})) == [{"a": 0, "v": 0}, {"b": 0}, {"b": 1}]
    monkeypatch.setattr(_api, "_LOAD_BATCH_BYTES", 1024)
    w = torch.randn(64, 64).to(torch.bfloat16)
    state = {"w": w, "u": torch.arange(32, dtype=torch.float32), "n": 3}
    cairn.save(tmp_path / "run", state, step=1)
    target = {"w": torch.zeros(64, 64, dtype=torch.bfloat16), "u": torch.zeros(32), "n": 0}
    back = cairn.load(tmp_path / "run", target=target, step=1)
    assert back["w"] is target["w"] and torch.equal(target["w"], w)
    assert torch.equal(target["u"], state["u"]) and back["n"] == 3


def test_boxes_that_tile_their_bounding_box_are_read_once_and_sliced(tmp_path):
    from cairn import _api

    a, b, c = object(), object(), object()
    # Two column blocks of one array (two devices' boxes): one read of the 4x8 block.
    reads = _api._reads([(a, [0, 0], [4, 4]), (b, [0, 4], [4, 4])])
    assert reads == [([(a, (slice(0, 4), slice(0, 4))), (b, (slice(0, 4), slice(4, 8)))], [0, 0], [4, 8])]
    # Boxes with a gap between them are read one by one (the gap is not read).
    apart = _api._reads([(a, [0], [2]), (c, [6], [2])])
    assert apart == [([(a, None)], [0], [2]), ([(c, None)], [6], [2])]
    assert _api._reads(None) is None and _api._reads([]) == []
    # Through a load: a numpy target's box and a ShardedTensor-like pair fill correctly.
    full = np.arange(32, dtype=np.float32).reshape(4, 8)
    cairn.save(tmp_path / "run", {"w": full}, step=1)
    left, right = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)
    places = {"w": _api._reads([(left, [0, 0], [4, 4]), (right, [0, 4], [4, 4])])}
    opened = cairn._cairn.open(str(tmp_path / "run"), 1, None)
    got = _api._raw(opened.load(None, ["w"], None, {"w": (places["w"][0][1], places["w"][0][2])}, None, None))
    for dest, within in places["w"][0][0]:
        _api._fill("w", dest, got["w"][within])
    assert np.array_equal(left, full[:, :4]) and np.array_equal(right, full[:, 4:])
