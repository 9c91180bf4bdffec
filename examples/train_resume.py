"""The main job: a real training loop checkpointing with cairn.CheckpointManager to
./runs/, SIGKILLed at a random step, resumed from the latest checkpoint, and checked
bit-exact against an uninterrupted run. The state is copied in the background
(`background_snapshot=True`): the loop waits for the copy only where it changes the state
(the optimizer's update).

    python examples/train_resume.py            # the whole demonstration
    python examples/train_resume.py --child --run DIR --steps N   # one training process
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

import cairn

try:
    import torch
except ImportError:  # numpy fallback: the same loop on a numpy linear model
    torch = None

STEPS = 600
POLICIES = [cairn.Every(25, until=200), cairn.Every(100)]


def batch(step: int):
    """Synthetic data for a step: a pure function of the step (no loader state to resume)."""
    rng = np.random.default_rng(1000 + step)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    y = (x[:, :10] * 2.0 - x[:, 10:20]).argmax(axis=1)
    return x, y


class TorchTrainer:
    def __init__(self) -> None:
        torch.manual_seed(0)
        torch.set_num_threads(1)  # deterministic float sums across processes
        self.model = torch.nn.Sequential(
            torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Dropout(0.1),
            torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 10),
        )
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    def before_update(self, wait) -> None:
        """Calls `wait()` before every change to the state (the weights and the optimizer's
        moments change only in its step; the model has no buffers that forward updates)."""
        self.opt.register_step_pre_hook(lambda *_: wait())

    def step(self, step: int) -> float:
        x, y = batch(step)
        loss = torch.nn.functional.cross_entropy(self.model(torch.from_numpy(x)), torch.from_numpy(y))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def state(self, step: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "optim": self.opt.state_dict(),
            "rng": torch.get_rng_state(),
            "step": step,
        }

    def load(self, state: dict) -> None:
        report = cairn.load_state_dict(self.model, state["model"], strict=True)
        assert report.ok
        self.opt.load_state_dict(state["optim"])
        torch.set_rng_state(state["rng"])

    def weights(self) -> dict:
        return {k: v.numpy() for k, v in self.model.state_dict().items()}


class NumpyTrainer:
    def __init__(self) -> None:
        self.w = np.random.default_rng(0).standard_normal((32, 10)).astype(np.float32) * 0.1
        self.wait = lambda: None

    def before_update(self, wait) -> None:
        self.wait = wait

    def step(self, step: int) -> float:
        x, y = batch(step)
        logits = x @ self.w
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.log(p[np.arange(len(y)), y]).mean())
        p[np.arange(len(y)), y] -= 1
        self.wait()
        self.w -= np.float32(0.1) * (x.T @ p / len(y)).astype(np.float32)
        return loss

    def state(self, step: int) -> dict:
        return {"model": {"w": self.w}, "step": step}

    def load(self, state: dict) -> None:
        self.w = np.array(state["model"]["w"])

    def weights(self) -> dict:
        return {"w": self.w}


def train(run: str, steps: int, stats_path: str) -> None:
    """One training process: resume from the run's latest checkpoint, train to `steps`."""
    trainer = TorchTrainer() if torch is not None else NumpyTrainer()
    framework = "torch" if torch is not None else "numpy"
    blocked, saves, start = 0.0, 0, 1
    keep = [cairn.KeepLast(3), cairn.KeepEvery(200)]
    waited = [0.0]  # the loop's waits for a copy before an update
    with cairn.CheckpointManager(run, policies=POLICIES, keep=keep, background_snapshot=True) as mgr:

        def wait_snapshot() -> None:
            began = time.perf_counter()
            mgr.wait_snapshot()
            waited[0] += time.perf_counter() - began

        trainer.before_update(wait_snapshot)
        try:
            state, info = mgr.restore(framework=framework)
            trainer.load(state)
            start = info.step + 1
            print(f"[train pid {os.getpid()}] resumed from step {info.step}", flush=True)
        except cairn.CheckpointNotFoundError:
            print(f"[train pid {os.getpid()}] starting fresh", flush=True)
        for step in range(start, steps + 1):
            loss = trainer.step(step)
            began = time.perf_counter()
            saved = mgr.on_step(step, trainer.state(step), metrics={"loss": loss}, force=step == steps)
            if saved:
                blocked += time.perf_counter() - began
                saves += 1
            if mgr.preempted:
                break
    with open(stats_path, "w") as f:
        json.dump({"blocked_s": blocked + waited[0], "saves": saves}, f)


def final_weights(run: str) -> dict:
    state = cairn.load(run, prefix="model.")
    return state["model"]


def spawn(run: str, steps: int, stats: str) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--run", run, "--steps", str(steps), "--stats", stats]
    return subprocess.Popen(cmd)


def main() -> int:
    root = os.path.abspath("runs")
    reference, interrupted = os.path.join(root, "reference"), os.path.join(root, "demo")
    for d in (reference, interrupted):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    seed = int(os.environ.get("CAIRN_DEMO_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    kill_after = rng.randrange(60, STEPS - 100)
    print(f"framework: {'torch ' + torch.__version__ if torch else 'numpy'}; seed {seed} (CAIRN_DEMO_SEED to replay)")

    print(f"1. uninterrupted reference run to step {STEPS} -> {reference}")
    assert spawn(reference, STEPS, os.path.join(root, "reference.stats.json")).wait() == 0

    print(f"2. training run -> {interrupted}, SIGKILLed once step {kill_after} is committed")
    child = spawn(interrupted, STEPS, os.path.join(root, "first.stats.json"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        infos = cairn.list_checkpoints(interrupted) if os.path.isdir(interrupted) else []
        if infos and infos[-1].step >= kill_after:
            break
        time.sleep(0.005)
    time.sleep(rng.random() * 0.05)  # land somewhere inside the following steps
    if child.poll() is not None:
        print("error: the training process ended before it could be killed", file=sys.stderr)
        return 1
    child.send_signal(signal.SIGKILL)
    child.wait()
    latest = cairn.list_checkpoints(interrupted)[-1]
    print(f"   killed (SIGKILL); latest committed checkpoint: step {latest.step}")

    print("3. resuming from the latest committed checkpoint")
    assert spawn(interrupted, STEPS, os.path.join(root, "resumed.stats.json")).wait() == 0

    ref, got = final_weights(reference), final_weights(interrupted)
    exact = ref.keys() == got.keys() and all(
        np.asarray(ref[k]).tobytes() == np.asarray(got[k]).tobytes() and np.asarray(ref[k]).dtype == np.asarray(got[k]).dtype
        for k in ref
    )
    stats = [json.load(open(os.path.join(root, f"{n}.stats.json"))) for n in ("reference", "resumed")]

    print("\ncheckpoints kept in", interrupted)
    print(f"{'step':>6}  {'created (UTC)':<23}  {'size':>9}  {'temporary':<9}  loss")
    for info in cairn.list_checkpoints(interrupted):
        size = f"{info.tensor_bytes / 1e6:.2f} MB"
        created = info.created.strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
        loss = info.metrics.get("loss", float("nan"))
        print(f"{info.step:>6}  {created:<23}  {size:>9}  {str(info.temporary):<9}  {loss:.4f}")
    ref_stats = stats[0]
    print(f"\nreference run: {ref_stats['saves']} checkpoints saved, training loop blocked {ref_stats['blocked_s'] * 1e3:.1f} ms in total "
          f"({ref_stats['blocked_s'] * 1e3 / max(ref_stats['saves'], 1):.2f} ms per save)")
    print(f"bit-exact: {'yes' if exact else 'NO'} (final weights after kill + resume == uninterrupted run)")
    return 0 if exact else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help="run one training process")
    parser.add_argument("--run", help="run directory (child)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--stats", default=os.devnull)
    args = parser.parse_args()
    if args.child:
        train(args.run, args.steps, args.stats)
        sys.exit(0)
    sys.exit(main())
