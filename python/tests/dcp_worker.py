"""One rank of the torch DCP backend tests (run under torchrun by test_dcp.py).

    torchrun --standalone --nproc_per_node=4 dcp_worker.py save RUN REF
    torchrun --standalone --nproc_per_node=2 dcp_worker.py load RUN REF

`save` trains one step of a small FSDP2 model and saves `get_state_dict` plus plain values
with `dcp.save` twice: through `cairn.dcp.Writer` into the run RUN (step 1) and through
DCP's own `FileSystemWriter` into REF. A save in which rank 1 holds a value Cairn cannot
store fails on every rank and commits nothing, as does one without DCP's collectives; an
`async_save` commits step 2. `load`
builds fresh models on another world size and fills one from RUN through
`cairn.dcp.Reader`, one from REF through DCP's own reader: every tensor and value is
equal.
"""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import cairn
import cairn.dcp
from _leave import leave  # beside this file


def build(seed, mesh):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1000 + seed)
    torch.nn.functional.mse_loss(model(torch.randn(8, 16, generator=g)), torch.randn(8, 3, generator=g)).backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def state_of(model, opt, epoch):
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "progress": {"epoch": epoch, "seen": [epoch * 8, 2**70]}}


def full(x):
    if isinstance(x, dict):
        return {k: full(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(full(v) for v in x)
    if isinstance(x, DTensor):
        return x.full_tensor()
    return x


def same(a, b, path="state"):
    if isinstance(b, dict):
        assert set(a) == set(b), (path, sorted(a), sorted(b))
        for k in b:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}.{i}")
    elif isinstance(b, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, (path, a, b)


def main():
    mode, run, ref = sys.argv[1:4]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank = dist.get_rank()
    if mode == "save":
        model, opt = build(0, mesh)
        state = state_of(model, opt, 1)
        dcp.save(state, storage_writer=cairn.dcp.Writer(run, step=1))
        dcp.save(state, checkpoint_id=ref)
        # Rank 1 alone holds an object that would need pickle: every rank fails, nothing
        # shows. (A key every rank holds is written by one of them, as DCP plans.)
        bad = dict(state, **({"rank1": {"loader": object()}} if rank == 1 else {}))
        try:
            dcp.save(bad, storage_writer=cairn.dcp.Writer(run, step=3))
            raise AssertionError("a save with an unstorable value succeeded")
        except BaseException as e:  # DCP wraps each rank's failure in a CheckpointException
            assert "rank1.loader" in str(e), e
        # Without DCP's collectives each rank would commit alone: refused on every rank.
        try:
            dcp.save(state, storage_writer=cairn.dcp.Writer(run, step=4), use_collectives=False)
            raise AssertionError("a save without collectives succeeded")
        except BaseException as e:
            assert "use_collectives" in str(e), e
        dcp.async_save(state_of(model, opt, 2), storage_writer=cairn.dcp.Writer(run, step=2)).result()
        dist.barrier()
        assert [i.step for i in cairn.list_checkpoints(run)] == [1, 2]
    else:
        model, opt = build(1, mesh)
        ours = state_of(model, opt, 0)
        dcp.load(ours, storage_reader=cairn.dcp.Reader(run, step=1), planner=cairn.dcp.LoadPlanner())
        other, other_opt = build(2, mesh)
        theirs = state_of(other, other_opt, 0)
        dcp.load(theirs, checkpoint_id=ref)
        same(full(ours), full(theirs))
        assert ours["progress"] == {"epoch": 1, "seen": [8, 2**70]}, ours["progress"]
    dist.barrier()
    print("ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
