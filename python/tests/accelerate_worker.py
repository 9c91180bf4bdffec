"""A training loop written with a plain `accelerate.Accelerator` that checkpoints through
`cairn.accelerate` (see test_accelerate.py): a small MLP with dropout, AdamW, a step LR
schedule, a shuffled stateful dataloader, a custom object registered for checkpointing.

    accelerate_worker.py RUN OUT [KILL_AT]

Resumes from the newest committed checkpoint of RUN if there is one, saves every 5 steps
(keeping the last 2), SIGKILLs itself right after step KILL_AT, and writes the final
weights to OUT (safetensors) on the main process."""

import os
import signal
import sys

import accelerate
import safetensors.torch
import torch
from accelerate.utils import DataLoaderConfiguration

import cairn
import cairn.accelerate
from _leave import leave  # beside this file

EPOCHS, SAVE_EVERY = 3, 5


class Seen:
    """A custom object registered for checkpointing: how many samples went by."""

    def __init__(self):
        self.samples = 0

    def state_dict(self):
        return {"samples": self.samples}

    def load_state_dict(self, state):
        self.samples = state["samples"]


def main():
    run, out = sys.argv[1], sys.argv[2]
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    # A stateful dataloader resumes mid-epoch; the seedable sampler makes each epoch's order
    # a function of the epoch (Accelerate's way to resume a shuffled order).
    accelerator = accelerate.Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True, use_seedable_sampler=True)
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
    data = torch.utils.data.TensorDataset(torch.randn(48, 8), torch.randn(48, 1))
    # Its own generator: creating an iterator would otherwise draw from the global one.
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    seen = Seen()
    accelerator.register_for_checkpointing(seen)
    # Each process's own dropout draws (its RNG state then differs from the others').
    torch.manual_seed(100 + accelerator.process_index)

    step = cairn.accelerate.load_state(accelerator, run) or 0
    per_epoch = len(loader)
    model.train()
    for epoch in range(step // per_epoch, EPOCHS):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            seen.samples += len(x)
            if step % SAVE_EVERY == 0:
                cairn.accelerate.save_state(accelerator, run, step=step, keep=cairn.KeepLast(2), metrics={"loss": loss.item()})
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    assert seen.samples == EPOCHS * len(data) // accelerator.num_processes, seen.samples
    if accelerator.is_main_process:
        safetensors.torch.save_file(accelerator.unwrap_model(model).state_dict(), out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
    leave()
