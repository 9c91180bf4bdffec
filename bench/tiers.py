"""Two tiers against saving straight to S3, on one machine in one run.

The durable tier is S3 on SeaweedFS (run this under scripts/with-seaweedfs.sh, which sets
CAIRN_TEST_S3_URI and the AWS_* settings); the local tier is a folder on this disk. The
state is `--size-mb` of float32 (16 MiB tensors), changed before every save so that every
save writes everything. A training step is `--step-s` of waiting (a GPU step: the CPU is
free meanwhile, as it is while a GPU computes).

(a) Blocking and time until durable, per checkpoint (`--saves` of them, one every
    `--every` steps): a two-tier manager saving locally and uploading every checkpoint,
    against a manager saving straight to S3 (the same async manager, one save in flight).
    Blocking is what `on_step` takes on a saving step; durable is from that call to the
    upload's (or the S3 save's) commit, from the manager's events. Beside them: one memory
    copy of the state (`np.copyto` into preallocated arrays).
(b) The loop: `--steps` steps with a local save at every one (uploads every 2x `--every`),
    against the same loop without checkpoints: once with the copy inside `on_step`, once
    with `background_snapshot=True`, the loop calling `wait_snapshot()` before it changes
    the state (the copy then overlaps the step).

    scripts/with-seaweedfs.sh .venv/bin/python bench/tiers.py [--size-mb 256] [--report docs/report.png]

Prints the tables and writes bench/tiers.json. With `--report`, also writes the run's
`cairn report` page and its screenshot there (headless Chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid

import numpy as np

import cairn

TENSOR_MB = 16


def make_state(size_mb: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"layer.{i:03d}": rng.standard_normal(TENSOR_MB << 18, dtype=np.float32) for i in range(size_mb // TENSOR_MB)}


def touch(state: dict[str, np.ndarray], step: int) -> None:
    for array in state.values():
        array[:: 1 << 12] = step  # every page differs from the last save's


def memory_copy(state: dict[str, np.ndarray], reps: int = 5) -> float:
    out = {k: np.empty_like(v) for k, v in state.items()}
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for k, v in state.items():
            np.copyto(out[k], v)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_saves(mgr_args: dict, state, saves: int, every: int, step_s: float, upload: bool) -> dict:
    """Runs `saves * every` steps; returns the median blocking of saving steps and the
    median time from each durable save's call to its durable commit."""
    events = []
    mgr = cairn.CheckpointManager(**mgr_args, on_event=events.append, preemption_signal=None)
    called, blocked = {}, []
    try:
        # One save first, not counted: it allocates the snapshot memory the others reuse.
        mgr.on_step(0, state, force=True)
        for step in range(1, saves * every + 1):
            time.sleep(step_s)
            touch(state, step)
            called[step] = time.time()
            start = time.perf_counter()
            saved = mgr.on_step(step, state)
            if saved:
                blocked.append(time.perf_counter() - start)
        mgr.wait()
    finally:
        mgr.close()
    durable_op = "upload" if upload else "save"
    done = {e["step"]: e["unix_ms"] / 1000 for e in events if e["operation"] == durable_op and e["tier"] == "durable"}
    errors = [e["error"] for e in events if e["error"]]
    assert not errors, errors
    until_durable = [done[s] - called[s] for s in done if s in called]
    phases = {}
    for e in events:
        if e["operation"] == durable_op and e["tier"] == "durable" and e["step"] in called:
            for name, seconds in e["phases"].items():
                phases.setdefault(name, []).append(seconds)
    return {
        "durable_phases_s": {name: statistics.median(v) for name, v in phases.items()},
        "blocking_s": statistics.median(blocked),
        "until_durable_s": statistics.median(until_durable),
        "saves": len(blocked),
        "durable": len(done),
        "events": events,
    }


def loop(state, steps: int, step_s: float, mgr_args: dict | None) -> tuple[float, float]:
    """The loop's wall time, and the time its `on_step` (and `wait_snapshot`) calls
    blocked in all."""
    mgr = None if mgr_args is None else cairn.CheckpointManager(**mgr_args, preemption_signal=None)
    if mgr is not None:
        mgr.on_step(0, state, force=True)  # as in (a): the snapshot memory, once
        mgr.wait()
    blocked = 0.0
    start = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            time.sleep(step_s)
            if mgr is not None:
                called = time.perf_counter()
                mgr.wait_snapshot()  # the state changes next
                blocked += time.perf_counter() - called
            touch(state, step)
            if mgr is not None:
                called = time.perf_counter()
                mgr.on_step(step, state)
                blocked += time.perf_counter() - called
        if mgr is not None:
            mgr.wait()
    finally:
        if mgr is not None:
            mgr.close()
    return time.perf_counter() - start, blocked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--saves", type=int, default=8)
    parser.add_argument("--every", type=int, default=8, help="steps between checkpoints in (a)")
    parser.add_argument("--step-s", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--report", default=None, help="write the run's report screenshot here (a .png)")
    args = parser.parse_args()
    base = os.environ.get("CAIRN_TEST_S3_URI")
    if not base:
        raise SystemExit("run under scripts/with-seaweedfs.sh (CAIRN_TEST_S3_URI is not set)")
    work = tempfile.mkdtemp(dir=args.dir, prefix="cairn-tiers-")
    state = make_state(args.size_mb)
    copy_s = memory_copy(state)
    results = {"size_mb": args.size_mb, "step_s": args.step_s, "memory_copy_s": copy_s}
    try:
        s3 = lambda: f"{base}/bench-{uuid.uuid4().hex[:8]}"  # noqa: E731
        keep = cairn.KeepLast(2)
        tiered_args = dict(run=s3(), local=os.path.join(work, "local"), local_policies=[cairn.Every(args.every)],
                           policies=[cairn.Every(args.every)], keep_local=2, keep=keep)
        direct_args = dict(run=s3(), policies=[cairn.Every(args.every)], keep=keep)
        tiered = measure_saves(tiered_args, state, args.saves, args.every, args.step_s, upload=True)
        direct = measure_saves(direct_args, state, args.saves, args.every, args.step_s, upload=False)
        results["tiered"] = {k: v for k, v in tiered.items() if k != "events"}
        results["direct_s3"] = {k: v for k, v in direct.items() if k != "events"}

        plain, _ = loop(state, args.steps, args.step_s, None)
        every_step = dict(run=s3(), local=os.path.join(work, "loop"), local_policies=[cairn.Every(1)],
                          policies=[cairn.Every(args.every * 2)], keep_local=2, keep=keep)
        saving, blocked = loop(state, args.steps, args.step_s, every_step)
        every_step.update(run=s3(), local=os.path.join(work, "loop-behind"), background_snapshot=True)
        behind, behind_blocked = loop(state, args.steps, args.step_s, every_step)
        results["loop"] = {"steps": args.steps, "without_s": plain, "local_every_step_s": saving, "blocked_s": blocked,
                           "background_snapshot_s": behind, "background_snapshot_blocked_s": behind_blocked}

        if args.report:
            report_run(work, args.report)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    t, d = results["tiered"], results["direct_s3"]
    print(f"state {args.size_mb} MiB; memory copy {copy_s:.3f} s; step {args.step_s} s")
    print("| | blocking per checkpoint | vs memory copy | until durable |")
    print("|---|---|---|---|")
    print(f"| two tiers (local disk + S3) | {t['blocking_s']:.3f} s | {t['blocking_s'] / copy_s:.2f}x | {t['until_durable_s']:.2f} s |")
    print(f"| straight to S3 | {d['blocking_s']:.3f} s | {d['blocking_s'] / copy_s:.2f}x | {d['until_durable_s']:.2f} s |")
    print("durable phases (median s): two tiers", t["durable_phases_s"], "straight to S3", d["durable_phases_s"])
    lp = results["loop"]
    print(f"loop of {lp['steps']} steps: without checkpoints {lp['without_s']:.2f} s, "
          f"saving locally every step {lp['local_every_step_s']:.2f} s ({lp['local_every_step_s'] / lp['without_s']:.3f}x), "
          f"on_step blocked {lp['blocked_s']:.2f} s in all; with background_snapshot "
          f"{lp['background_snapshot_s']:.2f} s ({lp['background_snapshot_s'] / lp['without_s']:.3f}x), "
          f"blocked {lp['background_snapshot_blocked_s']:.2f} s in all")
    with open(os.path.join(os.path.dirname(__file__), "tiers.json"), "w") as f:
        json.dump(results, f, indent=2)


def report_run(work: str, png: str) -> None:
    """A small two-tier run with metrics and a temporary checkpoint, its report page and a
    screenshot of it."""
    durable, local = os.path.join(work, "report-durable"), os.path.join(work, "report-local")
    rng = np.random.default_rng(1)
    state = {"base": rng.standard_normal(4 << 20, dtype=np.float32), "head": np.zeros(1 << 18, np.float32)}
    with cairn.CheckpointManager(durable, local=local, local_policies=[cairn.Every(5)], policies=[cairn.Every(20)],
                                 keep_local=3, keep=cairn.KeepLast(4), preemption_signal=None) as mgr:
        for step in range(1, 121):
            state["head"] += np.float32(0.01)
            loss = 2.5 * np.exp(-step / 40) + 0.3 + 0.05 * rng.standard_normal()
            mgr.on_step(step, state, metrics={"loss": float(loss), "lr": 3e-4 * min(1.0, step / 20)})
            time.sleep(0.05)
        mgr.save(121, state, temporary=True, metrics={"loss": float(loss)})
    page = os.path.join(work, "report.html")
    cli = os.environ.get("CAIRN_CLI", "target/ci/cairn")
    subprocess.run([cli, "report", durable, "--local", local, "-o", page, "--keep-last", "3"], check=True)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1500",
                    f"--screenshot={os.path.abspath(png)}", "file://" + page], check=True, capture_output=True)


if __name__ == "__main__":
    main()
