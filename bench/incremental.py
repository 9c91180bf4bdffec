"""Incremental saves against full ones and the peers, on one machine in one run.

(a) fine-tuning: a frozen base (`--base-mb`, float32, 16 MiB tensors) plus 1% trainable
    weights and their two Adam moments, the trainable part changed before every save.
    Ten saves each by Cairn incremental (`CheckpointManager`'s default), Cairn full,
    safetensors, torch.save and torch DCP, alternated save by save. Every save is
    durable (Cairn fsyncs; the peers' files are fsynced after they return).
(b) full training: every tensor changes before every save; Cairn incremental vs full.

For each method: the median time of saves 2 to 10 (the first save of a run writes
everything whatever the method), the bytes each of them wrote, and what the ten saves
occupy on disk against one full checkpoint. A raw O_DIRECT write of the changed bytes
and of the whole state runs beside them (the disk's limit).

    .venv/bin/python bench/incremental.py [--base-mb 2048] [--saves 10] [--dir DIR]

Prints the tables and writes bench/incremental.json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from run import fsync_tree  # bench/run.py, beside this file

PEERS = ["safetensors", "torch_save", "dcp"]
TENSOR_MB = 16


def make_state(base_mb: int, seed: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    """The fine-tuning state and the keys of its trainable part (1% of the base, and two
    moments of the same size)."""
    rng = np.random.default_rng(seed)
    n = TENSOR_MB << 18  # float32 elements per tensor
    state = {f"base.{i:03d}": rng.standard_normal(n, dtype=np.float32) for i in range(base_mb // TENSOR_MB)}
    lora = (base_mb << 20) // 100 // 4 // 8  # 1% of the base in 8 tensors
    trainable = []
    for i in range(8):
        for group in ("lora", "exp_avg", "exp_avg_sq"):
            key = f"{group}.{i}"
            state[key] = rng.standard_normal(lora, dtype=np.float32)
            trainable.append(key)
    return state, trainable


def change(state: dict[str, np.ndarray], keys, step: int) -> None:
    for key in keys:
        state[key] += np.float32(step * 1e-3)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def save(method: str, state, root: str, step: int) -> tuple[float, int]:
    """Saves `state` as `step`; returns the seconds and the bytes this save wrote."""
    before = dir_bytes(root)
    t0 = time.perf_counter()
    if method in ("cairn_incremental", "cairn_full"):
        import cairn

        cairn.save(root, state, step=step, incremental=method == "cairn_incremental")
    elif method == "safetensors":
        import safetensors.numpy

        path = os.path.join(root, f"step-{step}")
        os.makedirs(path)
        safetensors.numpy.save_file(state, os.path.join(path, "model.safetensors"))
        fsync_tree(path)
    elif method == "torch_save":
        import torch

        path = os.path.join(root, f"step-{step}")
        os.makedirs(path)
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, os.path.join(path, "model.pt"))
        fsync_tree(path)
    elif method == "dcp":
        import torch
        import torch.distributed.checkpoint as dcp

        path = os.path.join(root, f"step-{step}")
        dcp.save({k: torch.from_numpy(v) for k, v in state.items()}, checkpoint_id=path, no_dist=True)
        fsync_tree(path)
    seconds = time.perf_counter() - t0
    return seconds, dir_bytes(root) - before


def drop_older(method: str, root: str, step: int) -> None:
    """Frees the disk of what a full method saved before `step` (counted already)."""
    if method == "cairn_incremental":
        return
    for name in os.listdir(root):
        if name.startswith("step-") and int(name.split("-")[1]) < step:
            shutil.rmtree(os.path.join(root, name))


def raw_write(root: str, nbytes: int) -> float:
    chunk = 64 << 20
    buf = mmap.mmap(-1, chunk)
    buf.write(b"\x01" * chunk)
    path = os.path.join(root, "raw.bin")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    written = 0
    while written < nbytes:  # whole 64 MiB chunks: at most one chunk more than asked
        written += os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - t0
    os.remove(path)
    return seconds


def scenario(name: str, methods: list[str], state, changing, saves: int, work: str) -> dict:
    roots = {m: os.path.join(work, name, m) for m in methods}
    for r in roots.values():
        os.makedirs(r)
    times = {m: [] for m in methods}
    written = {m: [] for m in methods}
    for step in range(1, saves + 1):
        if step > 1:
            change(state, changing, step)
        for m in methods if step % 2 else reversed(methods):
            s, b = save(m, state, roots[m], step)
            times[m].append(s)
            written[m].append(b)
            drop_older(m, roots[m], step)
    total = sum(a.nbytes for a in state.values())
    changed = sum(state[k].nbytes for k in changing)
    out = {"state_bytes": total, "changed_bytes": changed, "methods": {}}
    for m in methods:
        out["methods"][m] = {
            "save_s": statistics.median(times[m][1:]),
            "first_save_s": times[m][0],
            "written_bytes": statistics.median(written[m][1:]),
            "occupied_bytes": dir_bytes(roots[m]) if m == "cairn_incremental" else sum(written[m]),
            "times_s": times[m],
        }
        shutil.rmtree(roots[m])
    out["raw_odirect_changed_s"] = raw_write(work, changed)
    out["raw_odirect_state_s"] = raw_write(work, total)
    return out


def table(name: str, result: dict) -> None:
    methods = result["methods"]
    peers = [m for m in PEERS if m in methods]
    best = min((methods[m]["save_s"] for m in peers), default=methods["cairn_full"]["save_s"])
    full = result["state_bytes"]
    print(f"\n{name}: state {full / 2**30:.2f} GiB, changed per save {result['changed_bytes'] / 2**20:.0f} MiB")
    print(f"raw O_DIRECT write: changed bytes {result['raw_odirect_changed_s']:.3f} s, whole state {result['raw_odirect_state_s']:.3f} s")
    print(f"{'method':<18} {'save s':>8} {'vs best peer':>13} {'written/changed':>16} {'10 saves / 1 full':>18}")
    for m, r in methods.items():
        print(f"{m:<18} {r['save_s']:>8.3f} {r['save_s'] / best:>12.3f}x {r['written_bytes'] / result['changed_bytes']:>15.2f}x"
              f" {r['occupied_bytes'] / full:>17.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-mb", type=int, default=2048)
    ap.add_argument("--saves", type=int, default=10)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="cairn-incr-", dir=args.dir)
    try:
        state, trainable = make_state(args.base_mb)
        results = {"fine_tuning": scenario("fine_tuning", ["cairn_incremental", "cairn_full", *PEERS], state, trainable,
                                           args.saves, work)}
        results["full_training"] = scenario("full_training", ["cairn_incremental", "cairn_full"], state, list(state),
                                            args.saves, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, result in results.items():
        table(name, result)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "incremental.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
