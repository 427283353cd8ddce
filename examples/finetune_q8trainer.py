"""Fine-tune a small GPT-2 with Q8Trainer and AdamW8bit, interrupt it, resume it: runs on CPU in under a minute.

    python examples/finetune_q8trainer.py [--output-dir DIR] [--steps 40]

The model is built from a config and the text is generated here, so nothing is downloaded. The script
trains with checkpoints every `steps / 2` steps, compares the checkpoint's optimizer file with the
optimizer.pt a plain Trainer writes with torch AdamW, then resumes from the middle checkpoint and checks
that the resumed run ends with exactly the same weights as the uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

import torch
from q8.integrations.hf import OPTIMIZER_FILE, Q8Trainer
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments


class GeneratedText(torch.utils.data.Dataset):
    """Random sentences from a small vocabulary, UTF-8 bytes as token ids (vocab 256), `seq` tokens a sample."""

    def __init__(self, samples: int, seq: int = 64) -> None:
        words = "the model learns to predict the next byte of these short generated sentences".split()
        rng = random.Random(0)
        text = " ".join(rng.choice(words) for _ in range(samples * seq)).encode()[: samples * seq]
        self.ids = torch.tensor(list(text)).view(samples, seq)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def new_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def arguments(output_dir: str, steps: int, **kwargs) -> TrainingArguments:
    return TrainingArguments(
        output_dir,
        max_steps=steps,
        save_steps=steps // 2,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        weight_decay=0.01,
        logging_steps=steps // 4,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **kwargs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    root = args.output_dir or tempfile.mkdtemp(prefix="q8trainer-")
    data = GeneratedText(samples=args.steps * 8)
    half = args.steps // 2

    # 1. Train with the 8-bit optimizer; checkpoints keep its state in optimizer.q8.
    run = os.path.join(root, "run")
    trainer = Q8Trainer(new_model(), arguments(run, args.steps), train_dataset=data, q8_optim="adamw8bit")
    trainer.train()
    checkpoint = os.path.join(run, f"checkpoint-{half}")
    print(f"\ncheckpoint {checkpoint}:")
    for name in sorted(os.listdir(checkpoint)):
        print(f"  {name:24} {os.path.getsize(os.path.join(checkpoint, name)):>12,} bytes")

    # 2. The same checkpoint from a plain Trainer with torch AdamW, for comparison.
    plain = os.path.join(root, "plain")
    Trainer(new_model(), arguments(plain, args.steps, optim="adamw_torch"), train_dataset=data).train()
    torch_bytes = os.path.getsize(os.path.join(plain, f"checkpoint-{half}", "optimizer.pt"))
    q8_bytes = os.path.getsize(os.path.join(checkpoint, OPTIMIZER_FILE))
    print(f"\noptimizer state: torch AdamW optimizer.pt {torch_bytes:,} bytes, AdamW8bit optimizer.q8 {q8_bytes:,}")
    print(f"  {torch_bytes / q8_bytes:.2f}x smaller (embedding tables keep 32-bit state)")

    # 3. Resume from the middle checkpoint: the run continues exactly where it stopped.
    resumed = Q8Trainer(
        new_model(), arguments(os.path.join(root, "resumed"), args.steps), train_dataset=data, q8_optim="adamw8bit"
    )
    resumed.train(resume_from_checkpoint=checkpoint)
    same = all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), resumed.model.parameters(), strict=True))
    print(f"\nresumed from step {half}: final weights identical to the uninterrupted run: {same}")
    print(f"(files under {root})")
    if not same:
        raise SystemExit("resume was not exact")


if __name__ == "__main__":
    main()
