"""How long a checkpoint blocks a training loop whose state lives on a GPU.

The state is bench/run.py's transformer layout (model plus Adam moments), on the first
CUDA device. Each measurement is repeated, methods alternated, medians reported:

- d2h_pinned: every tensor copied into one preallocated page-locked host buffer, then one
  synchronize. The floor for anything that must get the state off the GPU.
- d2h_cpu: `tensor.cpu()` for every tensor, into fresh pageable memory: what a loop pays
  before `torch.save` or any host-side saver.
- cairn_first / cairn_steady: `CheckpointManager.on_step` on a saving step (async save),
  the first one of the process and later ones once the previous save is durable.
- cairn_via_cpu: `on_step` with the state moved to the host by the caller (`.cpu()`), then
  snapshotted: the path Cairn took before it staged device tensors itself.
- cairn_skip: `on_step` on a step that saves nothing.
- torch_save: `torch.save` of the state (durable: fsynced), which blocks for all of it.

Usage: python bench/gpu.py [--size-mb 2048] [--reps 5] [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

import torch

import cairn
from cairn import _staging
from run import synthetic_state


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    state = {k: torch.from_numpy(v).cuda() for k, v in synthetic_state(args.size_mb).items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    views, offset = [], 0
    for t in state.values():
        n = t.numel() * t.element_size()
        views.append(pinned[offset : offset + n].view(t.dtype).view(t.shape))
        offset += n

    def d2h_pinned():
        for view, t in zip(views, state.values()):
            view.copy_(t, non_blocking=True)
        torch.cuda.synchronize()

    def d2h_cpu():
        return {k: t.cpu() for k, t in state.items()}

    root = tempfile.mkdtemp(dir=args.dir)
    mgr = cairn.CheckpointManager(os.path.join(root, "run"), policies=[cairn.Every(1000)], keep=cairn.KeepLast(1))
    step = 0
    results: dict[str, list[float]] = {k: [] for k in ("d2h_pinned", "d2h_cpu", "cairn_steady", "cairn_via_cpu", "cairn_skip", "torch_save")}

    def on_step(make_state):
        nonlocal step
        step += 1000
        mgr.wait()
        return timed(lambda: mgr.on_step(step, make_state()))

    matrix = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def train_steps(seconds: float) -> list[float]:
        """Times matrix products (about a millisecond each) for `seconds`: a stand-in for
        the training loop that runs on while Cairn works in the background."""
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            times.append(timed(lambda: (matrix @ matrix, torch.cuda.synchronize())))
        return times

    alone = train_steps(1.0)
    first = on_step(lambda: state)
    beside = train_steps(2.0)  # while the first save is written in the background
    for _ in range(args.reps):
        results["d2h_pinned"].append(timed(d2h_pinned))
        results["d2h_cpu"].append(timed(d2h_cpu))
        results["cairn_steady"].append(on_step(lambda: state))
        results["cairn_via_cpu"].append(on_step(d2h_cpu))
        mgr.wait()
        results["cairn_skip"].append(timed(lambda: mgr.on_step(step + 1, state)))
        path = os.path.join(root, "torch.pt")

        def torch_save():
            torch.save(state, path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())

        results["torch_save"].append(timed(torch_save))
        os.remove(path)
    mgr.wait()
    medians = {k: statistics.median(v) for k, v in results.items()}
    medians["cairn_first"] = first
    floor = medians["d2h_pinned"]
    report = {
        "device": torch.cuda.get_device_name(),
        "state_bytes": total,
        "tensors": len(state),
        # One matrix product (a stand-in training step) alone, and beside a background save.
        "train_step_s": {"alone_median": statistics.median(alone), "beside_median": statistics.median(beside), "beside_max": max(beside)},
        "seconds": medians,
        "gb_per_s": {k: total / v / 1e9 for k, v in medians.items() if k != "cairn_skip"},
        "vs_d2h_pinned": {k: v / floor for k, v in medians.items() if k != "cairn_skip"},
        # The pinned buffers Cairn stages this state into (as torch allocates them).
        "staging_bytes": sum(_staging.pack([t.numel() * t.element_size() for t in state.values()])[1]),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(f"state {total / 1e9:.2f} GB in {len(state)} tensors on {report['device']}")
    print(f"{'method':<16}{'blocked s':>12}{'GB/s':>10}{'x d2h_pinned':>14}")
    for k in ("d2h_pinned", "d2h_cpu", "cairn_first", "cairn_steady", "cairn_via_cpu", "torch_save"):
        print(f"{k:<16}{medians[k]:>12.3f}{report['gb_per_s'][k]:>10.2f}{report['vs_d2h_pinned'][k]:>14.2f}")
    print(f"{'cairn_skip':<16}{medians['cairn_skip'] * 1e6:>10.1f}us")
    steps = report["train_step_s"]
    print(f"train step alone {steps['alone_median'] * 1e3:.2f} ms, beside the first save {steps['beside_median'] * 1e3:.2f} ms (max {steps['beside_max'] * 1e3:.1f} ms)")
    print(f"cairn staging buffers {report['staging_bytes'] / 1e9:.2f} GB ({report['staging_bytes'] / total:.3f}x the state)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
