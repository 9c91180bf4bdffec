"""Side-by-side checkpoint benchmark (see bench/run.sh).

Every measurement runs in a fresh process; methods are alternated within each repetition
and the median is reported. Saves are durable (every tool's files are fsynced inside the
timing; Cairn fsyncs by itself). Libraries are imported (and a save's state built)
before the clock starts; right before it starts, each process touches and frees
`BACKED_MEMORY_BYTES` (`back_memory`; examples/bench_io.rs does the same). Cold loads
first read the files once (so that the VM's host holds every tool's files in its own
cache alike), then evict them from the page cache (posix_fadvise DONTNEED); warm loads
first read the files into the page cache. Reports GB/s, ratios
to the raw limits (medians of the ratios within each repetition, the limit measured right
beside Cairn) and to the best peer, and peak RSS; for Cairn's async manager, the time the
training loop is blocked (the first save, and later ones that reuse the snapshot memory)
against a plain copy of the state into fresh and into warm memory.
"""

from __future__ import annotations

import argparse
import importlib
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

# The raw limits run right beside Cairn (the disk's speed drifts over minutes on a VM), and
# Cairn's ratios to them are medians of the ratios within each repetition.
SAVERS = ["raw_odirect", "cairn", "cairn_rust", "cairn_async", "torch_save", "safetensors_np", "safetensors_torch", "dcp", "orbax", "raw_buffered", "raw_memcpy"]
# raw_read reads the file raw_buffered wrote; raw_read_odirect the one raw_odirect wrote.
# On a VM the first read of data written with O_DIRECT can miss a cache of the host that
# buffered writes fill, so each write path gets its own read limit (Cairn's shards are
# written with O_DIRECT).
LOADERS = ["raw_read_odirect", "cairn", "cairn_rust", "raw_read", "torch_load", "torch_load_mmap", "safetensors_np", "safetensors_torch", "dcp", "orbax"]
# The directory each loader reads (by default its saver's).
LOAD_DIR = {"raw_read": "raw_buffered", "raw_read_odirect": "raw_odirect", "torch_load": "torch_save", "torch_load_mmap": "torch_save"}
RUST_BENCH = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target")), "release", "examples", "bench_io")
SETTLE_S = 1.0
# Memory each measurement touches and frees just before its clock starts: the page cache
# of the checkpoint and a copy of it, which the copying loaders and savers make.
BACKED_MEMORY_BYTES = 4 << 30
PEERS_SAVE = ["torch_save", "safetensors_np", "safetensors_torch", "dcp", "orbax"]
PEERS_LOAD = ["torch_load", "torch_load_mmap", "safetensors_np", "safetensors_torch", "dcp", "orbax"]


def synthetic_state(size_mb: int) -> dict[str, np.ndarray]:
    """A transformer layout: embeddings, per-layer attention and MLP weights, norms, plus
    Adam moments for each, all float32 (random in [0, 1)), about `size_mb` MiB in a few
    hundred tensors."""
    layers, vocab = 12, 32000
    target = size_mb << 20
    # bytes ≈ 3 (param + 2 moments) * 4 * (vocab*h + layers*(12 h^2 + 2 h))
    h = 64
    while 12 * (vocab * (h + 64) + layers * 12 * (h + 64) ** 2) <= target:
        h += 64
    params = {"embed.weight": (vocab, h)}
    for i in range(layers):
        for name in ("q", "k", "v", "o"):
            params[f"layers.{i}.attn.{name}.weight"] = (h, h)
        params[f"layers.{i}.mlp.up.weight"] = (4 * h, h)
        params[f"layers.{i}.mlp.down.weight"] = (h, 4 * h)
        params[f"layers.{i}.norm1.weight"] = (h,)
        params[f"layers.{i}.norm2.weight"] = (h,)
    # Random values, as trained weights and moments look to a compressor: a constant fill
    # lets compressing savers (orbax writes zstd) store almost nothing.
    rng = np.random.default_rng(0)
    state = {}
    for key, shape in params.items():
        for group in ("model", "optim.exp_avg", "optim.exp_avg_sq"):
            state[f"{group}.{key}"] = rng.random(shape, dtype=np.float32)
    return state


def nbytes(state) -> int:
    return sum(a.nbytes for a in state.values())


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def evict(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def warm(path: str) -> None:
    """Reads every file under `path` once: a warm load then finds it all in the page cache
    (the files of all the tools together outgrow it, so without this what is still
    cached depends on what ran before), and a cold load, evicted after this, finds it in
    the VM host's cache like every other tool's."""
    buf = bytearray(64 << 20)
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def back_memory() -> None:
    """Touches and frees `BACKED_MEMORY_BYTES`, so that what the measurement then allocates
    (page cache, buffers, tensors) is memory this VM's host has backed. The VM hands memory
    freed in the guest back to its host within seconds, a little at a time, and touching it
    again costs about 1 s per GB: a cold Rust load took 0.88 s right after a load had freed
    its pages, 2.46 s five seconds later (median of 4); 6 GiB took 4-11 s to touch.
    How much was still backed followed what ran before (torch.load(mmap) cold: 2.04 s right
    after torch.load, 2.74 s otherwise), so every figure depended on the order of the
    methods. A machine that keeps its memory (bare metal, a VM without free page
    reporting) pays none of it. The peak RSS is then reset to the current RSS."""
    buf = np.ones(BACKED_MEMORY_BYTES, dtype=np.uint8)
    del buf
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    """The process's peak resident memory since `back_memory` (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def touch_pages(arrays) -> int:
    """Reads one byte of every 4 KiB page of every array, so that a lazily mapped load has
    really brought its data into memory, as a load that copies or verifies it has."""
    total = 0
    for a in arrays:
        flat = np.asarray(a.numpy() if hasattr(a, "numpy") else a).reshape(-1).view(np.uint8)
        total += int(flat[::4096].sum()) + (int(flat[-1]) if flat.size else 0)
    return total


def as_torch(state):
    import torch

    return {k: torch.from_numpy(v) for k, v in state.items()}


def save(method: str, state, path: str) -> dict:
    if method == "raw_memcpy":  # measured by the worker, after this
        return {"seconds": None}
    os.makedirs(path, exist_ok=True)
    blocked = None
    t0 = time.perf_counter()
    if method == "cairn":
        import cairn

        cairn.save(os.path.join(path, "ckpt"), state)
    elif method == "cairn_async":
        import cairn

        # The first on_step snapshots into fresh memory; later ones reuse it, as in a
        # training loop that checkpoints again and again. Each save finishes before the next.
        # Full saves, as the other tools make: the state does not change between these
        # steps, so incremental saves (bench/incremental.py) would write nothing.
        with cairn.CheckpointManager(os.path.join(path, "run"), policies=[cairn.Every(1)], preemption_signal=None,
                                     incremental=False) as mgr:
            blocked = []
            for step in range(1, 4):
                b0 = time.perf_counter()
                mgr.on_step(step, state)
                blocked.append(time.perf_counter() - b0)
                mgr.wait()
                if step == 1:
                    first_save = time.perf_counter() - t0
    elif method == "torch_save":
        import torch

        torch.save(as_torch(state), os.path.join(path, "model.pt"))
        fsync_tree(path)
    elif method == "safetensors_np":
        import safetensors.numpy

        safetensors.numpy.save_file(state, os.path.join(path, "model.safetensors"))
        fsync_tree(path)
    elif method == "safetensors_torch":
        import safetensors.torch

        safetensors.torch.save_file(as_torch(state), os.path.join(path, "model.safetensors"))
        fsync_tree(path)
    elif method == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save(as_torch(state), checkpoint_id=os.path.join(path, "dcp"), no_dist=True)
        fsync_tree(path)
    elif method == "orbax":
        import orbax.checkpoint as ocp

        ocp.PyTreeCheckpointer().save(os.path.join(path, "orbax"), state)
        fsync_tree(path)
    elif method in ("raw_odirect", "raw_buffered"):
        total = nbytes(state)
        chunk = 64 << 20
        buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
        buf.write(b"\x01" * chunk)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if method == "raw_odirect" else 0)
        fd = os.open(os.path.join(path, "raw.bin"), flags, 0o644)
        written = 0
        while written < total:
            written += os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - t0
    if method == "cairn_async":
        return {"seconds": first_save, "blocked_first_s": blocked[0], "blocked_s": statistics.median(blocked[1:])}
    return {"seconds": seconds}


def load(method: str, path: str) -> dict:
    t0 = time.perf_counter()
    if method == "cairn":
        import cairn

        out = cairn.load(os.path.join(path, "ckpt"))
        touch_pages(out.values())
    elif method in ("torch_load", "torch_load_mmap"):
        import torch

        out = torch.load(os.path.join(path, "model.pt"), mmap=method.endswith("mmap"), weights_only=True)
        touch_pages(out.values())
    elif method == "safetensors_np":
        import safetensors.numpy

        out = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
        touch_pages(out.values())
    elif method == "safetensors_torch":
        import safetensors.torch

        out = safetensors.torch.load_file(os.path.join(path, "model.safetensors"))
        touch_pages(out.values())
    elif method == "dcp":
        import torch
        import torch.distributed.checkpoint as dcp

        meta = dcp.FileSystemReader(os.path.join(path, "dcp")).read_metadata()
        target = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.state_dict_metadata.items()}
        dcp.load(target, checkpoint_id=os.path.join(path, "dcp"), no_dist=True)
        touch_pages(target.values())
    elif method == "orbax":
        import orbax.checkpoint as ocp

        out = ocp.PyTreeCheckpointer().restore(os.path.join(path, "orbax"))
        touch_pages(out.values())
    elif method in ("raw_read", "raw_read_odirect"):
        with open(os.path.join(path, "raw.bin"), "rb", buffering=0) as f:
            buf = bytearray(64 << 20)
            view = memoryview(buf)
            while f.readinto(view):
                pass
    return {"seconds": time.perf_counter() - t0}


# What each method imports, done before its clock starts: a training process has already
# imported its libraries (torch takes 1.5-4 s to import here, cairn 20-50 ms).
IMPORTS = {
    "cairn": ["cairn"],
    "cairn_async": ["cairn"],
    "torch_save": ["torch"],
    "torch_load": ["torch"],
    "torch_load_mmap": ["torch"],
    "safetensors_np": ["safetensors.numpy"],
    "safetensors_torch": ["torch", "safetensors.torch"],
    "dcp": ["torch", "torch.distributed.checkpoint"],
    "orbax": ["orbax.checkpoint"],
}


def worker(args) -> None:
    for module in IMPORTS.get(args.method, []):
        importlib.import_module(module)
    state = synthetic_state(args.size_mb) if args.op == "save" else None
    back_memory()
    result = save(args.method, state, args.dir) if args.op == "save" else load(args.method, args.dir)
    result["rss_mb"] = peak_rss_mb()
    if args.op == "save":
        result["bytes"] = nbytes(state)
        result["largest_bytes"] = max(a.nbytes for a in state.values())
        if args.method == "raw_memcpy":
            # A plain copy of the state, in a fresh process like every other measurement.
            copy0 = time.perf_counter()
            copies = {k: v.copy() for k, v in state.items()}  # into fresh memory
            result["memcpy_fresh_s"] = time.perf_counter() - copy0
            copy0 = time.perf_counter()
            for k, v in state.items():  # into warm memory
                np.copyto(copies[k], v)
            result["memcpy_s"] = time.perf_counter() - copy0
    print(json.dumps(result))


def run_worker(method, op, directory, size_mb, cold=False) -> dict:
    # Let the previous measurement's writes and discards settle, for every method alike.
    os.sync()
    time.sleep(SETTLE_S)
    if cold:
        # The VM's host caches its disk: a file it still holds reads 5-10x faster than
        # one it has dropped (2 GB here: 3.96 s the first time, 0.42 s the next), and
        # which files it holds depends on what was written and read before. Read once,
        # every tool's files are in the host's cache alike, then evicted from this VM's.
        warm(directory)
        evict(directory)
    elif op == "load":
        warm(directory)
    if method == "cairn_rust":  # the Rust API, through examples/bench_io.rs
        os.makedirs(directory, exist_ok=True)
        cmd = [RUST_BENCH, op, os.path.join(directory, "ckpt")] + ([str(size_mb)] if op == "save" else [])
    else:
        cmd = [sys.executable, __file__, "--worker", "--method", method, "--op", op, "--dir", directory, "--size-mb", str(size_mb)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--method")
    ap.add_argument("--op")
    ap.add_argument("--only", default=None, help="comma-separated methods to run (default: all)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.only:
        chosen = set(args.only.split(","))
        SAVERS[:] = [m for m in SAVERS if m in chosen]
        LOADERS[:] = [m for m in LOADERS if m in chosen]

    scratch = args.dir or tempfile.mkdtemp(prefix="cairn-bench-", dir=os.getcwd())
    size = None
    results: dict[str, dict[str, list]] = {}
    for rep in range(args.reps):
        order = SAVERS if rep % 2 == 0 else list(reversed(SAVERS))
        for method in order:
            d = os.path.join(scratch, method)
            shutil.rmtree(d, ignore_errors=True)
            r = run_worker(method, "save", d, args.size_mb)
            results.setdefault(method, {}).setdefault("save", []).append(r)
            size = size or r.get("bytes")
        for cold in (True, False):
            for method in (LOADERS if rep % 2 == 0 else list(reversed(LOADERS))):
                d = os.path.join(scratch, LOAD_DIR.get(method, method))
                r = run_worker(method, "load", d, args.size_mb, cold=cold)
                results.setdefault(method, {}).setdefault("cold_load" if cold else "warm_load", []).append(r)
    shutil.rmtree(scratch, ignore_errors=True)

    def med(method, op, field="seconds"):
        vals = [r[field] for r in results.get(method, {}).get(op, []) if r.get(field) is not None]
        return statistics.median(vals) if vals else None

    def paired(method, limit, op):
        """Median over the repetitions of `method`'s speed relative to `limit`, measured
        moments apart in the same repetition."""
        runs = zip(results.get(method, {}).get(op, []), results.get(limit, {}).get(op, []))
        ratios = [lim["seconds"] / mine["seconds"] for mine, lim in runs if mine.get("seconds") and lim.get("seconds")]
        return statistics.median(ratios) if ratios else None

    gbs = lambda s: size / s / 1e9 if s else None  # noqa: E731
    table = {}
    for method in sorted(set(SAVERS) | set(LOADERS) | {"cairn", "cairn_rust", "raw_odirect", "raw_read", "raw_read_odirect"}):
        row = {op: gbs(med(method, op)) for op in ("save", "cold_load", "warm_load")}
        row["rss_mb"] = max((r.get("rss_mb", 0) for rs in results.get(method, {}).values() for r in rs), default=None)
        errors = [r["error"] for rs in results.get(method, {}).values() for r in rs if "error" in r]
        if errors:
            row["error"] = errors[0]
        table[method] = row
    blocked, memcpy = med("cairn_async", "save", "blocked_s"), med("raw_memcpy", "save", "memcpy_s")
    blocked_first, memcpy_fresh = med("cairn_async", "save", "blocked_first_s"), med("raw_memcpy", "save", "memcpy_fresh_s")
    best = lambda op, peers: max((table[p][op] for p in peers if table.get(p, {}).get(op)), default=None)  # noqa: E731
    summary = {
        "bytes": size,
        "save_vs_best_peer": (table["cairn"]["save"] or 0) / (best("save", PEERS_SAVE) or 1),
        "save_vs_odirect": paired("cairn", "raw_odirect", "save"),
        "rust_save_vs_odirect": paired("cairn_rust", "raw_odirect", "save"),
        "cold_load_vs_raw_read": paired("cairn", "raw_read_odirect", "cold_load"),
        "rust_cold_load_vs_raw_read": paired("cairn_rust", "raw_read_odirect", "cold_load"),
        "cold_load_vs_raw_read_of_buffered_file": paired("cairn", "raw_read", "cold_load"),
        "cold_load_vs_best_peer": (table["cairn"]["cold_load"] or 0) / (best("cold_load", PEERS_LOAD) or 1),
        "warm_load_vs_best_peer": (table["cairn"]["warm_load"] or 0) / (best("warm_load", PEERS_LOAD) or 1),
        # Memory a save adds beyond the state (Rust: nothing else lives in the process).
        "rust_save_extra_mb": (table["cairn_rust"]["rss_mb"] or 0) - size / 2**20,
        "largest_tensor_mb": med("cairn", "save", "largest_bytes") / 2**20 if med("cairn", "save", "largest_bytes") else None,
        "async_blocked_s": blocked,
        "memcpy_warm_s": memcpy,
        "blocked_vs_memcpy": blocked / memcpy if blocked and memcpy else None,
        "first_blocked_s": blocked_first,
        "memcpy_fresh_s": memcpy_fresh,
        "first_blocked_vs_fresh": blocked_first / memcpy_fresh if blocked_first and memcpy_fresh else None,
    }
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"state: {size / 2**30:.2f} GiB, {args.reps} reps, medians; GB/s (higher is better)")
    print(f"{'method':<20}{'save':>8}{'cold load':>11}{'warm load':>11}{'peak RSS MB':>13}")
    for method, row in table.items():
        print(f"{method:<20}{fmt(row['save']):>8}{fmt(row['cold_load']):>11}{fmt(row['warm_load']):>11}{fmt(row['rss_mb']):>13}"
              + (f"   ({row['error'][:60]})" if "error" in row else ""))
    print()
    for k, v in summary.items():
        if k != "bytes":
            print(f"{k:<40}{fmt(v)}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")
    with open(out, "w") as f:
        json.dump({"table": table, "summary": summary, "raw": results}, f, indent=1)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
