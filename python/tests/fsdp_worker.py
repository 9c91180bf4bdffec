"""One rank of the FSDP2 tests (run under torchrun by test_sharded.py, not by pytest).

    torchrun --standalone --nproc_per_node=N fsdp_worker.py save RUN REF [MESH]
    torchrun --standalone --nproc_per_node=M fsdp_worker.py load RUN REF [MESH]
    torchrun --standalone --nproc_per_node=2 fsdp_worker.py tiers RUN REF

`save` trains one step of a small FSDP2 model with Adam, passes `get_state_dict` straight to
`cairn.save`, then trains one more step; rank 0 writes the full state at both points to
REF (steps 1 and 2) as plain tensors. `load` builds a fresh model (other weights, its
optimizer stepped once), loads the checkpoint into its own state dict with
`cairn.load(target=...)`, applies it with `set_state_dict`, checks every tensor and the
param groups bit-exact against REF step 1, trains the same step and compares with REF
step 2 (to float rounding: another world size reduces gradients in another order). MESH `2x2` shards the model over a 2-D mesh (HSDP: replicated over the first
dimension, sharded over the second, so each box is held by two ranks and written once);
MESH `tp` over a (dp, tp) mesh: tensor parallel, then FSDP over dp (`_StridedShard`).
`tiers` trains with a two-tier manager (see `tiers` below); rank 0 writes the full state
it saved last to REF (step 4).
"""

import pathlib
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import cairn
from _leave import leave  # beside this file


def build(seed, mesh):
    torch.manual_seed(seed)
    # 3 outputs: on 4 ranks the last layer's shards are uneven and one is empty
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    if mesh.mesh_dim_names == ("dp", "tp"):
        # FSDP x TP: the first weight is split by rows over "tp", then FSDP splits each
        # of those over "dp" (a _StridedShard); the second by columns over "tp".
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        mesh = mesh["dp"]
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model, opt, step):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 3, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def full(state):
    """Every tensor of a (nested) state dict as a full plain tensor; other leaves as they are."""
    if isinstance(state, dict):
        return {k: full(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(full(v) for v in state)
    if isinstance(state, DTensor):
        return state.full_tensor()
    if isinstance(state, torch.Tensor):
        return state.clone()  # Adam's `step` is updated in place by the next step
    return state


def compare(got, want, path, exact):
    if isinstance(want, dict):
        assert set(got) == set(want), (path, sorted(got), sorted(want))
        for k in want:
            compare(got[k], want[k], f"{path}.{k}", exact)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            compare(a, b, f"{path}.{i}", exact)
    elif hasattr(want, "shape"):
        got = torch.as_tensor(got)
        want = torch.as_tensor(want)
        if exact:
            assert torch.equal(got, want), (path, got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=path)
    else:
        assert got == want, (path, got, want)


def managed(run, state):
    """A manager that is told to save alone refuses a sharded state. Made with no ranks in
    a torch.distributed job, managers take the job's ranks and coordinate over a gloo
    group of their own, so a background save runs while the loop's own collectives do;
    `process_group=` chooses the group. Nothing is left for coordination in the run."""
    lone = cairn.CheckpointManager(run, policies=[cairn.Every(1)], preemption_signal=None, rank=0, world_size=1)
    try:
        lone.on_step(1, state)
        raise AssertionError("a lone manager saved a sharded state")
    except cairn.InvalidArgumentError as e:
        assert "world_size=" in str(e), e
    lone.close()
    with cairn.CheckpointManager(run, policies=[cairn.Every(1)], preemption_signal=None) as mgr:
        assert mgr.on_step(1, state)
        for _ in range(20):  # the training loop's collectives, beside the background save
            dist.all_reduce(torch.ones(4))
    group = dist.new_group(backend="gloo")
    with cairn.CheckpointManager(run, policies=[cairn.Every(1)], preemption_signal=None, process_group=group) as mgr:
        assert mgr.on_step(2, state)
        target = {"model": {n: torch.zeros_like(t) for n, t in state["model"].items()}, "optim": state["optim"]}
        restored, info = mgr.restore(target=target)
        assert info.step == 2
        for n, t in state["model"].items():
            assert torch.equal(restored["model"][n].to_local(), t.to_local()), n
        # Rank 1 cannot read its state for step 3: it is told why, the other ranks' save
        # of step 3 fails at once naming rank 1 (not after a timeout), and step 4 saves.
        try:
            mgr.on_step(3, dict(state, unreadable=object()) if dist.get_rank() == 1 else state)
            mgr.wait()
            raise AssertionError("step 3 was saved without rank 1's state")
        except cairn.CheckpointError as e:
            assert ("key=`unreadable`" if dist.get_rank() == 1 else "rank 1 could not take part") in str(e), e
        assert mgr.on_step(4, state)
    assert [i.step for i in cairn.list_checkpoints(run)] == [1, 2, 4]
    # A group must hold this process, and be gloo (the manager saves on its own thread).
    outside = dist.new_group(ranks=[0], backend="gloo")
    if dist.get_rank() != 0:
        try:
            cairn.CheckpointManager(run, preemption_signal=None, process_group=outside)
            raise AssertionError("a manager was made on a rank outside its group")
        except cairn.InvalidArgumentError as e:
            assert "not in process_group" in str(e), e
    left = [str(p) for p in pathlib.Path(run).rglob("*") if ".cairn-coord" in str(p)]
    assert not left, left


def strided(msd, mesh, run):
    """FSDP over TP gives the first weight a _StridedShard placement whose local data is
    one box; a strided layout that interleaves rows (several boxes per rank) is refused,
    naming the key, on every rank, and nothing is committed."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    assert any(isinstance(p, _StridedShard) for t in msd.values() for p in t.placements), msd
    local = torch.arange(2.0).reshape(2, 1) + 2 * dist.get_rank()
    rows = DTensor.from_local(local, mesh, [Shard(0), _StridedShard(0, split_factor=2)], shape=(8, 1), stride=(1, 1))
    try:
        cairn.save(run, {"interleaved": rows}, step=1)
        raise AssertionError("an interleaved strided DTensor was saved")
    except cairn.InvalidArgumentError as e:
        assert "key=`interleaved`" in str(e), e
    assert not pathlib.Path(run).exists() or cairn.list_checkpoints(run) == []


def sharded_tensor(run):
    """FSDP1's ShardedTensor: rows of a 10x3 tensor over the ranks (3, 3, 3, 1), saved,
    loaded whole and into another ShardedTensor of the same layout."""
    from torch.distributed._shard import sharded_tensor
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    world = dist.get_world_size()
    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
    whole = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    st = sharded_tensor.empty(spec, 10, 3)
    for shard in st.local_shards():
        lo, n = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
        shard.tensor.copy_(whole[lo : lo + n])
    cairn.save(run, {"st": st, "n": 7}, step=1)
    assert torch.equal(cairn.load(run, framework="torch")["st"], whole)
    other = sharded_tensor.zeros(spec, 10, 3)
    back = cairn.load(run, target={"st": other, "n": 0}, step=1)
    assert back["n"] == 7 and back["st"] is other
    for shard in other.local_shards():
        lo, n = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
        assert torch.equal(shard.tensor, whole[lo : lo + n])


def tiers(run, ref, mesh):
    """Two tiers on every rank: each saves its own part locally every step (into its own
    folder inside RUN-local), every second step is uploaded as one checkpoint of all ranks;
    fresh models restore from the newest step every rank can load, each rank from its own
    part, then (rank 1's part of step 4 damaged) rank 1 from the durable copy of the same
    step, with a warning, the others still from their parts."""
    import warnings

    local, rank = run + "-local", dist.get_rank()
    tiered = dict(local=local, local_policies=[cairn.Every(1)], policies=[cairn.Every(2)], keep_local=2,
                  preemption_signal=None)

    def state_of(model, opt):
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optim": osd}

    model, opt = build(0, mesh)
    with cairn.CheckpointManager(run, **tiered) as mgr:
        for step in range(1, 5):
            train_step(model, opt, step)
            assert mgr.on_step(step, state_of(model, opt))
        mgr.wait()
        assert mgr.pending_uploads() == [] and mgr.cleanup_errors() == []
    saved = full(state_of(model, opt))
    if rank == 0:
        cairn.save(ref, saved, step=4, rank=0, world_size=1)

    def restore():
        fresh, fresh_opt = build(1, mesh)
        train_step(fresh, fresh_opt, 99)
        with cairn.CheckpointManager(run, **tiered) as mgr, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restored, info = mgr.restore(target=state_of(fresh, fresh_opt))
        set_state_dict(fresh, fresh_opt, model_state_dict=restored["model"], optim_state_dict=restored["optim"])
        compare(full(state_of(fresh, fresh_opt)), saved, "", exact=True)
        return info, [w for w in caught if issubclass(w.category, cairn.DamagedCheckpointWarning)]

    info, warned = restore()
    assert info.step == 4 and f"rank-{rank:05}" in info.uri and not warned, (info.uri, warned)
    dist.barrier()
    if rank == 1:
        for shard in pathlib.Path(local, "rank-00001", "step-000000000004", "shards").iterdir():
            data = bytearray(shard.read_bytes())
            data[-1] ^= 0xFF
            shard.write_bytes(bytes(data))
    dist.barrier()
    info, warned = restore()
    assert info.step == 4, info
    if rank == 1:
        assert "rank-" not in info.uri and warned, (info.uri, warned)
    else:
        assert f"rank-{rank:05}" in info.uri and not warned, (info.uri, warned)


def main():
    mode, run, ref = sys.argv[1], sys.argv[2], sys.argv[3]
    shape = sys.argv[4] if len(sys.argv) > 4 else None
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    if shape == "2x2":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))  # HSDP
    elif shape == "tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))  # FSDP x TP
    else:
        mesh = init_device_mesh("cpu", (world,))
    if mode == "tiers":
        tiers(run, ref, mesh)
    elif mode == "save":
        model, opt = build(0, mesh)
        train_step(model, opt, 0)
        msd, osd = get_state_dict(model, opt)
        if shape == "tp":
            strided(msd, mesh, run + "-strided")
        cairn.save(run, {"model": msd, "optim": osd}, step=1)  # ranks and collectives from the job
        first = full({"model": msd, "optim": osd})
        train_step(model, opt, 1)
        msd, osd = get_state_dict(model, opt)
        second = full({"model": msd, "optim": osd})
        if dist.get_rank() == 0:
            cairn.save(ref, first, step=1, rank=0, world_size=1)
            cairn.save(ref, second, step=2, rank=0, world_size=1)
        managed(run + "-managed", {"model": msd, "optim": osd})
        if shape is None:
            sharded_tensor(run + "-st")
    else:
        model, opt = build(1, mesh)
        train_step(model, opt, 99)  # the optimizer has state (to be overwritten)
        msd, osd = get_state_dict(model, opt)
        loaded = cairn.load(run, target={"model": msd, "optim": osd})
        set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        msd, osd = get_state_dict(model, opt)
        compare(full({"model": msd, "optim": osd}), cairn.load(ref, step=1, framework="torch"), "", exact=True)
        train_step(model, opt, 1)
        msd, osd = get_state_dict(model, opt)
        compare(full({"model": msd, "optim": osd}), cairn.load(ref, step=2, framework="torch"), "", exact=False)
    dist.barrier()
    if dist.get_rank() == 0:
        print("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
