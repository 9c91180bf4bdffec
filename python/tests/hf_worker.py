"""A small real Hugging Face Trainer run (run by test_huggingface.py, not by pytest).

    python hf_worker.py OUTPUT_DIR TRAINER [KILL_AT]

TRAINER is `plain` (transformers.Trainer, its own checkpoints) or `cairn`
(cairn.huggingface.Trainer). Trains a tiny randomly initialised GPT-2 (dropout on, so the
RNG states matter) for 12 steps, checkpointing every 3 steps with `save_total_limit=2`,
resuming with `train(resume_from_checkpoint=True)` when OUTPUT_DIR holds a checkpoint.
With KILL_AT, SIGKILLs itself at that global step. At the end writes the final weights to
OUTPUT_DIR/final.safetensors.
"""

import os
import signal
import sys

import safetensors.torch
import torch
import transformers

import cairn.huggingface
from _leave import leave  # beside this file


class KillAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 97, (40, 12), generator=torch.Generator().manual_seed(7))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    output_dir, kind = sys.argv[1], sys.argv[2]
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=output_dir,
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        warmup_steps=2,
        save_strategy="steps",
        save_steps=3,
        save_total_limit=2,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        seed=0,
        disable_tqdm=True,
    )
    trainer_class = {"plain": transformers.Trainer, "cairn": cairn.huggingface.Trainer}[kind]
    trainer = trainer_class(
        model=model, args=args, train_dataset=Tokens(), callbacks=[KillAt(kill_at)] if kill_at else []
    )
    resume = any(name.startswith("checkpoint-") for name in os.listdir(output_dir)) if os.path.isdir(output_dir) else False
    trainer.train(resume_from_checkpoint=resume or None)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
        os.path.join(output_dir, "final.safetensors"),
    )


if __name__ == "__main__":
    main()
    leave()
