"""Sharded state side by side: Cairn against torch DCP on an FSDP2 model, and against
Orbax on jax arrays sharded over 8 host devices.

    .venv/bin/python bench/sharded.py [--size-mb 512] [--reps 3] [--save-ranks 4] [--load-ranks 2] [--only torch|jax]

Each repetition launches `torchrun --standalone` (gloo, CPU) twice per tool: N ranks build
the same FSDP2 model with Adam state (parameters plus two moments, float32, about
`--size-mb` MiB in all), save `get_state_dict(model, opt)` (Cairn: `cairn.save`; DCP:
`torch.distributed.checkpoint.save` with its FileSystemWriter), then M ranks build a
fresh model and load into its own state dict (Cairn: `load(target=...)`; DCP: `dcp.load`)
and apply it with `set_state_dict`. Times are the slowest rank's, from a barrier before
to a barrier after (saves durable: DCP's writer fsyncs, Cairn always does); the tools
alternate within each repetition; medians are reported with the ratio Cairn/DCP and each
rank's peak RSS growth during the call (extra host memory). Before each load the
checkpoint's pages are dropped from the page cache (after a sync; the tools write through
the cache differently: Cairn with direct I/O, DCP and Orbax buffered), so every load reads
from the disk, as after a restart on another machine.

jax: one process with 8 host devices (XLA_FLAGS) holds a state of the same size (three
float32 arrays per layer, random, sharded by rows over a 4x2 mesh, plus a replicated
one); Cairn `save(..., step=1)` against Orbax `StandardCheckpointer().save` (waited until
finished), then a fresh process restores onto another mesh (2x4, sharded by columns) from
abstract `ShapeDtypeStruct`s: Cairn `load(target=...)`, Orbax `restore(path, abstract)`.
Orbax is given its defaults; it does not fsync what it writes, Cairn does.

Beside each: the disk's limit for the same number of bytes, measured in the same
repetition (a VM's disk drifts over minutes): an O_DIRECT write of `--size-mb` MiB in 8 MiB
blocks plus fsync, and an O_DIRECT read of it back from the disk ("raw").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

WORKER = r'''
import json, os, resource, sys, time
import torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

tool, mode, path, size_mb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dist.init_process_group("gloo")
torch.manual_seed(0 if mode == "save" else 1)
# Adam doubles the parameters twice over: params are a third of the state.
width = 1024
layers = max(1, (size_mb << 20) // 3 // (4 * width * width))
model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
for layer in model:
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model(torch.randn(2, width)).sum().backward()
opt.step()
msd, osd = get_state_dict(model, opt)
state = {"model": msd, "optim": osd}

def rss_kb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])

import cairn
import torch.distributed.checkpoint as dcp
dist.barrier()
before = rss_kb()
start = time.perf_counter()
if mode == "save":
    if tool == "cairn":
        cairn.save(path, state, step=1)
    else:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, sync_files=True))
else:
    if tool == "cairn":
        state = cairn.load(path, target=state, step=1)
    else:
        dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
dist.barrier()
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = [None] * dist.get_world_size()
dist.all_gather_object(out, {"s": elapsed, "extra_mb": max(0, peak - before) / 1024})
if dist.get_rank() == 0:
    print("RESULT " + json.dumps({"s": max(o["s"] for o in out), "extra_mb": max(o["extra_mb"] for o in out)}))
dist.destroy_process_group()
'''


JAX_WORKER = r'''
import json, os, resource, sys, time
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

tool, mode, path, size_mb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
width = 1024
layers = max(1, (size_mb << 20) // 3 // (4 * width * width))
devices = np.array(jax.devices())
if mode == "save":
    mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
    rows = NamedSharding(mesh, P("data", None))
    rng = np.random.default_rng(0)
    def make(i):
        return jax.device_put(rng.standard_normal((width, width), dtype=np.float32), rows)
    state = {f"layer{i}": {"w": make(i), "mu": make(i), "nu": make(i)} for i in range(layers)}
    state["step"] = jax.device_put(jnp.array(1, jnp.int32), NamedSharding(mesh, P()))
    jax.block_until_ready(state)
else:
    mesh = Mesh(devices.reshape(2, 4), ("a", "b"))
    cols = NamedSharding(mesh, P(None, "b"))
    abstract = lambda: jax.ShapeDtypeStruct((width, width), jnp.float32, sharding=cols)
    state = {f"layer{i}": {"w": abstract(), "mu": abstract(), "nu": abstract()} for i in range(layers)}
    state["step"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))

def rss_kb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])

import cairn
import orbax.checkpoint as ocp
before = rss_kb()
start = time.perf_counter()
if mode == "save":
    if tool == "cairn":
        cairn.save(path, state, step=1)
    else:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(path, "1"), state)
        ckptr.wait_until_finished()
else:
    if tool == "cairn":
        got = cairn.load(path, target=state, step=1)
    else:
        got = ocp.StandardCheckpointer().restore(os.path.join(path, "1"), state)
    jax.block_until_ready(got)
    assert got["layer0"]["w"].sharding == state["layer0"]["w"].sharding
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({"s": elapsed, "extra_mb": max(0, peak - before) / 1024}))
'''


def evict(path: str) -> None:
    """Drops the pages of every file under `path` from the page cache (written back
    first), so that the next load reads from the disk whoever wrote the files."""
    os.sync()
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def raw(path: str, size_mb: int) -> dict:
    """The disk's limit for these bytes: `size_mb` MiB written with O_DIRECT in 8 MiB
    blocks and fsynced, then (page cache dropped) read back with O_DIRECT."""
    import mmap

    os.makedirs(path, exist_ok=True)
    name, block = os.path.join(path, "raw.bin"), 8 << 20
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(block))
    start = time.perf_counter()
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    for _ in range((size_mb << 20) // block):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    write_s = time.perf_counter() - start
    evict(path)
    start = time.perf_counter()
    fd = os.open(name, os.O_RDONLY | os.O_DIRECT)
    while os.readv(fd, [buf]) == block:
        pass
    os.close(fd)
    return {"save": {"s": write_s, "extra_mb": 0.0}, "load": {"s": time.perf_counter() - start, "extra_mb": 0.0}}


def run_jax(tool: str, mode: str, path: str, size_mb: int, worker: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, worker, tool, mode, path, str(size_mb)],
                          capture_output=True, text=True, env=env, timeout=1200)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{tool} {mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[0][len("RESULT "):])


def run(tool: str, mode: str, path: str, ranks: int, size_mb: int, worker: str) -> dict:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [torchrun, "--standalone", f"--nproc_per_node={ranks}", worker, tool, mode, path, str(size_mb)],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{tool} {mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    if done.returncode != 0:
        # Measured and reported, then a rank died tearing gloo down (seen once with DCP).
        print(f"note: {tool} {mode} exited {done.returncode} after reporting its result", file=sys.stderr)
    return json.loads(lines[0][len("RESULT "):])


def report(title: str, med: dict, peer: str) -> None:
    print(title)
    print(f"{'tool':8} {'save s':>8} {'load s':>8} {'save extra MB':>14} {'load extra MB':>14}")
    for tool in ("cairn", peer, "raw"):
        m = med[tool]
        print(f"{tool:8} {m['save']['s']:8.2f} {m['load']['s']:8.2f} {m['save']['extra_mb']:14.0f} {m['load']['extra_mb']:14.0f}")
    print(f"save speedup ({peer} time / Cairn time): {med[peer]['save']['s'] / med['cairn']['save']['s']:.2f}x; "
          f"load: {med[peer]['load']['s'] / med['cairn']['load']['s']:.2f}x; "
          f"Cairn at {med['raw']['save']['s'] / med['cairn']['save']['s']:.2f}x / "
          f"{med['raw']['load']['s'] / med['cairn']['load']['s']:.2f}x the raw O_DIRECT write / read of the same bytes")


def medians(results: dict) -> dict:
    return {t: {m: {k: statistics.median(r[k] for r in runs) for k in ("s", "extra_mb")} for m, runs in ms.items()}
            for t, ms in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--save-ranks", type=int, default=4)
    ap.add_argument("--load-ranks", type=int, default=2)
    ap.add_argument("--only", choices=["torch", "jax"], default=None)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="cairn-sharded-", dir=args.dir or os.getcwd())
    worker, jax_worker = os.path.join(root, "worker.py"), os.path.join(root, "jax_worker.py")
    with open(worker, "w") as f:
        f.write(WORKER)
    with open(jax_worker, "w") as f:
        f.write(JAX_WORKER)
    torch_results = {t: {"save": [], "load": []} for t in ("cairn", "dcp", "raw")}
    jax_results = {t: {"save": [], "load": []} for t in ("cairn", "orbax", "raw")}
    try:
        for rep in range(args.reps):
            if args.only != "jax":
                for tool in (["cairn", "dcp"] if rep % 2 == 0 else ["dcp", "cairn"]):
                    path = os.path.join(root, f"{tool}-{rep}")
                    torch_results[tool]["save"].append(run(tool, "save", path, args.save_ranks, args.size_mb, worker))
                    evict(path)
                    torch_results[tool]["load"].append(run(tool, "load", path, args.load_ranks, args.size_mb, worker))
                    shutil.rmtree(path, ignore_errors=True)
                limit = raw(os.path.join(root, f"raw-{rep}"), args.size_mb)
                shutil.rmtree(os.path.join(root, f"raw-{rep}"), ignore_errors=True)
                for mode in ("save", "load"):
                    torch_results["raw"][mode].append(limit[mode])
            if args.only != "torch":
                for tool in (["cairn", "orbax"] if rep % 2 == 0 else ["orbax", "cairn"]):
                    path = os.path.join(root, f"jax-{tool}-{rep}")
                    jax_results[tool]["save"].append(run_jax(tool, "save", path, args.size_mb, jax_worker))
                    evict(path)
                    jax_results[tool]["load"].append(run_jax(tool, "load", path, args.size_mb, jax_worker))
                    shutil.rmtree(path, ignore_errors=True)
                limit = raw(os.path.join(root, f"raw-jax-{rep}"), args.size_mb)
                shutil.rmtree(os.path.join(root, f"raw-jax-{rep}"), ignore_errors=True)
                for mode in ("save", "load"):
                    jax_results["raw"][mode].append(limit[mode])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.only != "jax":
        report(f"FSDP2 + Adam, about {args.size_mb} MiB, save on {args.save_ranks} ranks, load on {args.load_ranks}; "
               f"{args.reps} reps, medians (slowest rank)", medians(torch_results), "dcp")
    if args.only != "torch":
        report(f"jax, about {args.size_mb} MiB over 8 host devices, saved on a 4x2 mesh, restored onto 2x4; "
               f"{args.reps} reps, medians", medians(jax_results), "orbax")


if __name__ == "__main__":
    main()
