"""A Lightning run checkpointing through Lightning's default TorchCheckpointIO against the
same run through `cairn.lightning.CheckpointIO` (asynchronous).

    .venv/bin/python bench/lightning.py [--size-mb 384] [--steps 24] [--every 6] [--reps 3]

Each repetition trains the same model (float32 linear layers with Adam: parameters plus
two moments, about `--size-mb` MiB of checkpoint state) for `--steps` steps on CPU in a
fresh process per tool, `ModelCheckpoint(every_n_train_steps=--every, save_top_k=-1)`
into a temporary folder on the disk. Reported per tool (medians over repetitions): the
time the training loop was blocked in `save_checkpoint` per checkpoint, and the whole
`fit` wall time (Cairn's includes waiting for its last save at teardown). Before timing
each run, the raw disk limit is measured beside it: an O_DIRECT write plus fsync of the
same bytes. TorchCheckpointIO does not fsync; Cairn does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WORKER = r'''
import json, os, sys, time
import torch, lightning as L
import cairn.lightning
from lightning.fabric.plugins import TorchCheckpointIO

tool, root, size_mb, steps, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
width = 1024
layers = max(1, (size_mb << 20) // 3 // (4 * width * width))
blocked = []

def timed(cls):
    class Timed(cls):
        def save_checkpoint(self, *args, **kwargs):
            start = time.perf_counter()
            super().save_checkpoint(*args, **kwargs)
            blocked.append(time.perf_counter() - start)
    return Timed

class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    def training_step(self, batch, _):
        return self.net(batch[0]).square().mean()
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)

data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(steps * 4, width)), batch_size=4)
io = timed(cairn.lightning.CheckpointIO)() if tool == "cairn" else timed(TorchCheckpointIO)()
trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False, plugins=[io],
                    callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1)])
start = time.perf_counter()
trainer.fit(Model(), data)
wall = time.perf_counter() - start
print(json.dumps({"blocked": blocked, "wall": wall}))
'''


def raw_write(path: str, size_mb: int) -> float:
    """Seconds for an O_DIRECT write of `size_mb` MiB in 8 MiB blocks plus fsync."""
    import mmap

    block = mmap.mmap(-1, 8 << 20)
    block.write(os.urandom(8 << 20))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(max(1, size_mb // 8)):
            os.write(fd, block)
        os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=384)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder here)")
    args = parser.parse_args()
    base = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target")
    os.makedirs(base, exist_ok=True)
    results: dict[str, dict[str, list[float]]] = {t: {"blocked": [], "wall": []} for t in ("torch", "cairn")}
    raw: list[float] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    for _ in range(args.reps):
        for tool in ("torch", "cairn"):
            with tempfile.TemporaryDirectory(dir=base) as root:
                raw.append(raw_write(os.path.join(root, "raw"), args.size_mb))
                done = subprocess.run(
                    [sys.executable, "-c", WORKER, tool, root, str(args.size_mb), str(args.steps), str(args.every)],
                    capture_output=True, text=True, env=env, check=False,
                )
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-4000:])
                got = json.loads(done.stdout.strip().splitlines()[-1])
                results[tool]["blocked"].append(statistics.mean(got["blocked"]))
                results[tool]["wall"].append(got["wall"])
    med = {t: {k: statistics.median(v) for k, v in r.items()} for t, r in results.items()}
    print(f"| {args.size_mb} MiB state, {args.steps // args.every} checkpoints | blocked per checkpoint | fit wall time |")
    print("|---|---|---|")
    for tool, name in (("torch", "Lightning TorchCheckpointIO"), ("cairn", "cairn.lightning.CheckpointIO")):
        print(f"| {name} | {med[tool]['blocked']:.3f} s | {med[tool]['wall']:.2f} s |")
    print(f"| ratio Cairn / default | {med['cairn']['blocked'] / med['torch']['blocked']:.2f}x "
          f"| {med['cairn']['wall'] / med['torch']['wall']:.2f}x |")
    print(f"| raw O_DIRECT write + fsync of the same bytes | {statistics.median(raw):.3f} s | |")


if __name__ == "__main__":
    main()
