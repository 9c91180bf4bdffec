"""A small real Lightning training run (run by test_lightning.py, not by pytest).

    python lightning_worker.py ROOT IO [KILL_AT[!]]

IO is `torch` (Lightning's default TorchCheckpointIO) or `cairn` (cairn.lightning's,
asynchronous). Trains a deterministic model for 6 epochs with `ModelCheckpoint(monitor=
"val_loss", save_top_k=2, save_last=True)` into ROOT/ckpts, resuming with
`fit(ckpt_path="last")`; with KILL_AT, SIGKILLs itself at that global step (mid-epoch)
once the background saves are done, or with `!` at once, a save possibly still writing. At the end writes the final weights and
the names in ROOT/ckpts to ROOT/final.json.
"""

import json
import os
import signal
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import cairn
import cairn.lightning
from _leave import leave  # beside this file


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        # Worse on purpose in the last epochs: the best two are not simply the newest.
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y) + 0.3 * (self.current_epoch >= 4))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.02)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]


class KillAt(L.Callback):
    """SIGKILLs the process at global step `step`: with `settled`, once the checkpoint IO
    has finished its background saves (Lightning's synchronous IO always has), else at
    once, whatever is still being written."""

    def __init__(self, step, settled):
        self.step = step
        self.settled = settled

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            if self.settled and hasattr(trainer.strategy.checkpoint_io, "wait"):
                trainer.strategy.checkpoint_io.wait()
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    root, io = sys.argv[1], sys.argv[2]
    kill_at = sys.argv[3] if len(sys.argv) > 3 else None
    torch.manual_seed(0)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    data = TensorDataset(x, x.sum(1, keepdim=True).sin())
    torch.manual_seed(2)
    model = Model()
    ckpts = os.path.join(root, "ckpts")
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpts, monitor="val_loss", save_top_k=2, save_last=True)]
    if kill_at is not None:
        callbacks.append(KillAt(int(kill_at.rstrip("!")), settled=not kill_at.endswith("!")))
    trainer = L.Trainer(
        max_epochs=6, callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        plugins=[cairn.lightning.CheckpointIO()] if io == "cairn" else [], deterministic=True,
    )
    trainer.fit(model, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32), ckpt_path="last")
    with open(os.path.join(root, "final.json"), "w") as f:
        json.dump({
            "weights": {k: v.tolist() for k, v in model.state_dict().items()},
            "names": sorted(os.listdir(ckpts)),
            "best": os.path.basename(trainer.checkpoint_callback.best_model_path),
        }, f)
    print("ok")


if __name__ == "__main__":
    main()
    leave()
