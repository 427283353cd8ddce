"""8-bit optimizer benchmark on CPU: q8 AdamW8bit vs torch AdamW (foreach and fused),
bitsandbytes AdamW8bit and torchao AdamW8bit, in the same run.

One 4096x4096 nn.Linear (16.8M parameters, fp32). Each optimizer gets the same sequence
of random gradients; after WARMUP steps (torchao compiles its step on the first one) the
median wall time of STEPS optimizer steps is reported, interleaved round by round so that
every optimizer sees the same load on a shared machine. State memory is the bytes of the
optimizer state tensors (8-bit codes, per-block scales, fp32 moments; shared code tables
not counted). Ratio: the other optimizer's time / q8's (> 1: q8 is faster).

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/optim.py
"""

from __future__ import annotations

import os
import statistics
import time
import warnings

import q8
import torch

DIM = 4096
WARMUP, STEPS = 2, 7


def state_bytes(opt: torch.optim.Optimizer) -> int:
    if isinstance(opt, q8.optim.Optimizer8bit):
        return opt.state_nbytes()
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key.startswith("qmap") or not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue  # bitsandbytes' code tables (shared values), step counters
            if hasattr(value, "codes"):  # torchao's OptimState8bit: codes + per-block scale
                total += value.codes.nbytes + value.scale.nbytes
            else:
                total += value.nbytes
    return total


def optimizers() -> dict[str, callable]:
    import bitsandbytes as bnb
    import torchao.optim

    return {
        "q8 AdamW8bit": lambda p: q8.optim.AdamW8bit(p, lr=1e-3),
        "torch AdamW (foreach)": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
        "torch AdamW (fused)": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "bitsandbytes AdamW8bit": lambda p: bnb.optim.AdamW8bit(p, lr=1e-3),
        "torchao AdamW8bit": lambda p: torchao.optim.AdamW8bit(p, lr=1e-3),
    }


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"one {DIM}x{DIM} nn.Linear ({DIM * DIM + DIM:,} parameters, fp32), AdamW step on CPU\n")
    g = torch.Generator().manual_seed(0)
    grads = [(torch.randn(DIM, DIM, generator=g) * 1e-3, torch.randn(DIM, generator=g) * 1e-3) for _ in range(3)]
    runs = {}
    for name, make in optimizers().items():
        torch.manual_seed(0)
        layer = torch.nn.Linear(DIM, DIM)
        opt = make(layer.parameters())
        runs[name] = (layer, opt, [])

    def step(name: str, i: int) -> float:
        layer, opt, _ = runs[name]
        layer.weight.grad, layer.bias.grad = (t.clone() for t in grads[i % len(grads)])
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0

    for i in range(WARMUP):
        for name in runs:
            step(name, i)
    for i in range(STEPS):
        for name, (_, _, times) in runs.items():
            times.append(step(name, WARMUP + i))

    base = statistics.median(runs["q8 AdamW8bit"][2])
    rows = []
    for name, (_, opt, times) in runs.items():
        ms = 1e3 * statistics.median(times)
        rows.append((name, f"{ms:.1f}", f"{statistics.median(times) / base:.2f}x", f"{state_bytes(opt) / 2**20:.1f}"))
    header = ("optimizer", "step ms (median)", "time / q8", "state MiB")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
