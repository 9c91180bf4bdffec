"""Cold loads as a restart sees them: each tool's files written once, then for every load
the page cache dropped (posix_fadvise DONTNEED after a sync; nothing read beforehand), a
fresh process (that has touched and freed 4 GiB first, see `back_memory`), the methods
alternated within each repetition; medians. A plain O_DIRECT
read of a file of the same size runs beside them (the disk's read limit), and a primed
warm load of each tool (its files read once just before) is kept, labelled as such.

Layouts: `large` (few large tensors), `gpt2m` (a GPT-2-medium-like transformer: 24 layers,
d=768, parameters and two Adam moments, several hundred float32 tensors) and `tiny`
(100,000 tensors of 1 KiB), where saves are timed too (durable: fsynced by every tool).

    .venv/bin/python bench/cold.py [--layouts large,gpt2m,tiny] [--reps 3] [--dir DIR]

Prints one table per layout (GB/s, and ratios to the best peer and to the raw read, per
repetition then the median) and writes bench/cold.json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from run import fsync_tree  # bench/run.py, beside this file

LOADERS = ["raw_odirect", "cairn", "safetensors_np", "safetensors_torch", "torch_load_mmap"]
PEERS = ["safetensors_np", "safetensors_torch", "torch_load_mmap"]
SAVERS = ["cairn", "safetensors_np"]  # timed on the tiny layout only
FILES = {"raw_odirect": "raw.bin", "cairn": "ckpt", "safetensors_np": "model.safetensors",
         "safetensors_torch": "model.safetensors", "torch_load_mmap": "model.pt"}
# Loaders that read another method's files.
SOURCE = {"safetensors_torch": "safetensors_np"}


def layout(name: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes (float32) of a layout."""
    if name == "large":  # 1 GiB in 128 tensors of 8 MiB
        return {f"block.{i}.weight": (2048, 1024) for i in range(128)}
    if name == "gpt2m":
        d, layers, vocab = 768, 24, 8192
        params = {"wte": (vocab, d), "wpe": (1024, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
        for i in range(layers):
            p = f"h.{i}."
            params |= {p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d),
                       p + "attn.c_attn.bias": (3 * d,), p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                       p + "ln_2.weight": (d,), p + "ln_2.bias": (d,), p + "mlp.c_fc.weight": (d, 4 * d),
                       p + "mlp.c_fc.bias": (4 * d,), p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,)}
        return {f"{group}.{k}": s for group in ("model", "exp_avg", "exp_avg_sq") for k, s in params.items()}
    if name == "tiny":
        return {f"t.{i:06d}": (256,) for i in range(100_000)}
    raise SystemExit(f"unknown layout {name}")


def make_state(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.random(s, dtype=np.float32) for k, s in layout(name).items()}


def paths(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]


def evict(path: str) -> None:
    os.sync()
    for f in paths(path):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def prime(path: str) -> None:
    buf = bytearray(64 << 20)
    for f in paths(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def touch(arrays) -> int:
    """One byte of every 4 KiB page of every array (a mapped load really reads)."""
    total = 0
    for a in arrays:
        flat = np.asarray(a.numpy() if hasattr(a, "numpy") else a).reshape(-1).view(np.uint8)
        total += int(flat[::4096].sum()) + (int(flat[-1]) if flat.size else 0)
    return total


def save(method: str, state: dict[str, np.ndarray], where: str) -> None:
    if method == "cairn":
        import cairn

        cairn.save(where, state)
    elif method == "safetensors_np":
        import safetensors.numpy

        safetensors.numpy.save_file(state, where)
        fsync_tree(os.path.dirname(where))
    elif method == "torch_load_mmap":
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, where)
        fsync_tree(os.path.dirname(where))
    elif method == "raw_odirect":
        total = sum(a.nbytes for a in state.values())
        chunk = 16 << 20
        buf = mmap.mmap(-1, chunk)
        buf.write(b"\x01" * chunk)
        fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        for _ in range(-(-total // chunk)):
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)


def load(method: str, where: str) -> None:
    if method == "cairn":
        import cairn

        touch(cairn.load(where).values())
    elif method == "safetensors_np":
        import safetensors.numpy

        touch(safetensors.numpy.load_file(where).values())
    elif method == "safetensors_torch":
        import safetensors.torch

        touch(safetensors.torch.load_file(where).values())
    elif method == "torch_load_mmap":
        import torch

        touch(torch.load(where, mmap=True, weights_only=True).values())
    elif method == "raw_odirect":
        chunk = 16 << 20
        buf = mmap.mmap(-1, chunk)
        fd = os.open(where, os.O_RDONLY | os.O_DIRECT)
        while os.readv(fd, [buf]):
            pass
        os.close(fd)


IMPORTS = {"cairn": ["cairn"], "safetensors_np": ["safetensors.numpy"], "safetensors_torch": ["torch", "safetensors.torch"],
           "torch_load_mmap": ["torch"]}


def back_memory() -> None:
    """Touches and frees 4 GiB, so that what the measurement then allocates (page cache,
    buffers) is memory this VM's host has backed, as on a machine that keeps its memory
    (see bench/run.py's `back_memory`: touching memory the VM gave back costs about 1 s per
    GB, which would otherwise fall on the loaders that use the page cache and not on the
    O_DIRECT read)."""
    buf = np.ones(4 << 30, dtype=np.uint8)
    del buf


def worker(op: str, method: str, where: str, name: str) -> None:
    """One timed save or load in this fresh process; prints the seconds."""
    for module in IMPORTS.get(method, []):
        __import__(module)
    state = make_state(name) if op == "save" else None
    back_memory()
    t0 = time.perf_counter()
    save(method, state, where) if op == "save" else load(method, where)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def timed(op: str, method: str, where: str, name: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", op, method, where, name], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{op} {method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=4)
    ap.add_argument("--layouts", default="large,gpt2m,tiny")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure")
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    results = {}
    for name in args.layouts.split(","):
        scratch = tempfile.mkdtemp(prefix=f"cairn-cold-{name}-", dir=args.dir)
        nbytes = sum(4 * int(np.prod(s)) for s in layout(name).values())
        where = {m: os.path.join(scratch, FILES[m]) for m in LOADERS}
        runs: dict[str, list[float]] = {f"{op} {m}": [] for m in LOADERS for op in ("cold", "warm")}
        saves: dict[str, list[float]] = {m: [] for m in SAVERS}
        for rep in range(args.reps):
            for m in LOADERS:  # written fresh each repetition: nothing read beforehand
                if m not in SOURCE:
                    shutil.rmtree(where[m], ignore_errors=True) if os.path.isdir(where[m]) else None
                    if os.path.exists(where[m]):
                        os.remove(where[m])
                    os.sync()
                    took = timed("save", m, where[m], name)
                    if name == "tiny" and m in saves:
                        saves[m].append(took)
            order = LOADERS if rep % 2 == 0 else LOADERS[::-1]
            for m in order:
                evict(where[m])
                time.sleep(1.0)
                runs[f"cold {m}"].append(nbytes / timed("load", m, where[SOURCE.get(m, m)], name) / 1e9)
            for m in order:
                prime(where[SOURCE.get(m, m)])
                runs[f"warm {m}"].append(nbytes / timed("load", m, where[SOURCE.get(m, m)], name) / 1e9)
        shutil.rmtree(scratch)
        results[name] = {"bytes": nbytes, "tensors": len(layout(name)), "load_gbps": runs, "save_s": saves}
        report(name, results[name])
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cold.json"), "w") as f:
        json.dump(results, f, indent=1)


def report(name: str, r: dict) -> None:
    runs = r["load_gbps"]
    reps = len(runs["cold cairn"])
    print(f"\n{name}: {r['tensors']} tensors, {r['bytes'] / 2**30:.2f} GiB; GB/s, medians of {reps}")
    for kind in ("cold", "warm"):
        best = [max(runs[f"{kind} {p}"][i] for p in PEERS) for i in range(reps)]
        raw = runs[f"{kind} raw_odirect"]
        for m in LOADERS:
            v = runs[f"{kind} {m}"]
            line = f"  {kind}{' (primed)' if kind == 'warm' else ''} {m:18s} {statistics.median(v):6.2f}"
            if m == "cairn":
                vs_best = statistics.median([v[i] / best[i] for i in range(reps)])
                vs_raw = statistics.median([v[i] / raw[i] for i in range(reps)])
                line += f"   {vs_best:.2f}x best peer, {vs_raw:.2f}x raw O_DIRECT read"
            print(line)
    for m, s in r["save_s"].items():
        if s:
            print(f"  save {m:18s} {statistics.median(s):6.2f} s")


if __name__ == "__main__":
    main()
