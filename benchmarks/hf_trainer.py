"""Hugging Face Trainer checkpoints: optimizer file size, save/load time and state memory, q8 vs the anchors.

Model: a GPT-2 built from a config (default 6 layers, width 512, vocabulary 16384: 27.4M
parameters, 31% of them in the tied token embedding, as in GPT-2 small) trained for a few
steps on Zipf-distributed token ids (no network here, so no downloaded text or weights).
Each contender trains the same steps and writes one checkpoint, in the same run:

- `Trainer(optim="adamw_torch")`: torch AdamW, `optimizer.pt` (the anchor);
- `Trainer(optim="adamw_bnb_8bit")`: bitsandbytes AdamW8bit, `optimizer.pt` (the Trainer
  keeps embedding state in 32 bits for it);
- `Q8Trainer(q8_optim="adamw8bit")`: q8 AdamW8bit, `optimizer.q8` (embeddings 32-bit, as
  the Trainer does for bitsandbytes), and the same with `embeddings_32bit=False`;
- `Q8Trainer()` with torch AdamW: its fp32 state in `optimizer.q8`, lossless and with
  `quantize_optimizer_state=True`.

Reported: the optimizer file(s) of the checkpoint (for Q8Trainer including its 1.3 KB
placeholder `optimizer.pt`), the ratio to torch AdamW's `optimizer.pt`, the optimizer state
held in memory, and medians of REPEATS saves and loads of the optimizer + scheduler state
through the Trainer's own `_save_optimizer_and_scheduler` / `_load_optimizer_and_scheduler`
(what checkpointing and `resume_from_checkpoint` run).

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/hf_trainer.py [--layers 6 --width 512 --vocab 16384]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time

import q8
import torch
import transformers
from q8.integrations.hf import Q8Trainer
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments

CONTENDERS = {
    "torch AdamW (Trainer)": (Trainer, {"optim": "adamw_torch"}, {}),
    "bitsandbytes AdamW8bit (Trainer)": (Trainer, {"optim": "adamw_bnb_8bit"}, {}),
    "q8 AdamW8bit (Q8Trainer)": (Q8Trainer, {}, {"q8_optim": "adamw8bit"}),
    "q8 AdamW8bit, embeddings 8-bit": (Q8Trainer, {}, {"q8_optim": "adamw8bit", "embeddings_32bit": False}),
    "torch AdamW (Q8Trainer, lossless)": (Q8Trainer, {"optim": "adamw_torch"}, {}),
    "torch AdamW (Q8Trainer, quantized)": (Q8Trainer, {"optim": "adamw_torch"}, {"quantize_optimizer_state": True}),
}


def zipf_tokens(vocab: int, samples: int, seq: int) -> torch.Tensor:
    """Token ids with a Zipf(1) frequency law, like words in text."""
    g = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, samples * seq, replacement=True, generator=g).view(samples, seq)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held in memory (8-bit state: codes + absmax)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, q8.QTensor):
                total += value.nbytes
            elif isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(name: str, config: GPT2Config, data: list, steps: int, repeats: int, root: str) -> dict:
    trainer_cls, arg_overrides, trainer_kwargs = CONTENDERS[name]
    torch.manual_seed(0)
    args = TrainingArguments(
        os.path.join(root, "run"),
        max_steps=steps,
        save_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        weight_decay=0.01,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **arg_overrides,
    )
    trainer = trainer_cls(GPT2LMHeadModel(config), args, train_dataset=data, **trainer_kwargs)
    trainer.remove_callback(PrinterCallback)  # keep the training-metrics dicts out of the table
    trainer.train()
    checkpoint = os.path.join(root, "run", f"checkpoint-{steps}")
    files = [f for f in ("optimizer.pt", "optimizer.q8") if os.path.isfile(os.path.join(checkpoint, f))]
    file_bytes = sum(os.path.getsize(os.path.join(checkpoint, f)) for f in files)
    scratch = os.path.join(root, "scratch")
    os.makedirs(scratch)
    save = median_seconds(lambda: trainer._save_optimizer_and_scheduler(scratch), repeats)
    load = median_seconds(lambda: trainer._load_optimizer_and_scheduler(scratch), repeats)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    result = {"files": " + ".join(files), "bytes": file_bytes, "memory": state_bytes(optimizer)}
    result.update(save=save, load=load)
    shutil.rmtree(root)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("q8.integrations.hf").setLevel(logging.ERROR)  # the quantized contender logs its error
    seq = 128
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=seq,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=8,
        bos_token_id=0,
        eos_token_id=0,
    )
    ids = zipf_tokens(args.vocab, 4 * args.steps, seq)
    data = [{"input_ids": x, "labels": x} for x in ids]
    params = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    print(
        f"Trainer checkpoint optimizer state: GPT-2 {args.layers} layers x {args.width}, vocabulary {args.vocab}, "
        f"{params / 1e6:.1f}M parameters, {args.steps} steps; q8 {q8.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}; save/load: medians of {args.repeats}\n"
    )
    rows, anchor = [], None
    for name in CONTENDERS:
        with tempfile.TemporaryDirectory() as tmp:
            r = run(name, config, data, args.steps, args.repeats, os.path.join(tmp, "x"))
        anchor = anchor or r["bytes"]
        rows.append(
            (
                name,
                r["files"],
                f"{r['bytes'] / 1e6:.1f}",
                f"{anchor / r['bytes']:.2f}x",
                f"{r['memory'] / 1e6:.1f}",
                f"{r['save'] * 1e3:.0f}",
                f"{r['load'] * 1e3:.0f}",
            )
        )
    header = ("contender", "checkpoint files", "MB", "vs torch", "state MB in RAM", "save ms", "load ms")
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
