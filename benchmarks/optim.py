"""8-bit optimizer benchmark on CPU: every q8 optimizer against torch's foreach and fused
fp32 optimizers, bitsandbytes' and torchao's 8-bit ones, in the same run.

Three tables, each from one interleaved run (every optimizer steps once per round, so all
see the same load on a shared machine), medians of STEPS steps after WARMUP steps
(torchao compiles its step on the first one):

1. AdamW on one 4096x4096 nn.Linear (16.8M fp32 parameters) against every anchor, with the
   optimizer state's bytes (8-bit codes, per-block scales, fp32 moments; shared code tables
   not counted).
2. Each of the eight q8 optimizers on the same layer against torch's fp32 optimizer
   (foreach and fused, where torch has them). torch has no Lion, LAMB or LARS: those are
   compared with the same q8 optimizer keeping fp32 state (`min_8bit_size` above the
   parameter count: the fused fp32 rule, the reference) and bitsandbytes' 8-bit one; Lion
   also with `ForeachLion`, its fp32 rule in torch foreach ops (the form issue 13's
   "torch foreach fp32 optimizer" anchor takes for a rule torch lacks).
3. Many small parameters: SMALL nn.Linear(64, 64) layers (2 * SMALL parameter tensors:
   64x64 weights with 8-bit state, 64-element biases with fp32 state), every optimizer
   against torch foreach and fused: the per-parameter overhead of a step.

"time / q8" is the other optimizer's time over q8's (> 1: q8 is faster). The targets of
issue 13 are checked on the last lines, one per target.

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/optim.py
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable

import q8
import torch

DIM = 4096
SMALL = 400
WARMUP, STEPS = 2, 7
FP32_STATE = {"min_8bit_size": 1 << 62}  # a q8 optimizer keeping fp32 state: its fp32 reference

# name -> (q8 class, q8 and torch arguments, torch class or None); torch steps foreach and fused
FAMILIES: dict[str, tuple[type, dict, type | None]] = {
    "Adam": (q8.optim.Adam8bit, {"lr": 1e-3}, torch.optim.Adam),
    "AdamW": (q8.optim.AdamW8bit, {"lr": 1e-3}, torch.optim.AdamW),
    "SGD (momentum 0.9)": (q8.optim.SGD8bit, {"lr": 1e-2, "momentum": 0.9}, torch.optim.SGD),
    "RMSprop": (q8.optim.RMSprop8bit, {"lr": 1e-3}, torch.optim.RMSprop),
    "Adagrad": (q8.optim.Adagrad8bit, {"lr": 1e-2}, torch.optim.Adagrad),
    "Lion": (q8.optim.Lion8bit, {"lr": 1e-4}, None),
    "LAMB": (q8.optim.LAMB8bit, {"lr": 1e-3}, None),
    "LARS": (q8.optim.LARS8bit, {"lr": 1e-2, "momentum": 0.9}, None),
}
BNB = {"Lion": "Lion8bit", "LAMB": "LAMB8bit", "LARS": "LARS8bit"}
TARGETS = [  # (family, the anchor q8's time is compared with, the largest allowed time ratio)
    ("AdamW", "torch fused", 1.5),
    ("SGD (momentum 0.9)", "torch foreach", 1.0),
    ("RMSprop", "torch foreach", 1.0),
    ("Adagrad", "torch foreach", 1.0),
    ("Lion", "torch foreach", 1.0),
    ("Lion", "q8 fp32 state", 1.0),
]
"""Issue 13's CPU targets. torch has no Lion: its foreach anchor is `ForeachLion`; q8's own
fused fp32 rule is the stricter second line."""


class ForeachLion(torch.optim.Optimizer):
    """Lion with fp32 state written in torch's foreach ops, as torch writes its foreach
    optimizers (the same rule as q8.optim.Lion8bit: p -= lr * (sign(beta1 m + (1 - beta1) g)
    + weight_decay p); m = beta2 m + (1 - beta2) g)."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            moments = [self.state[p].setdefault("exp_avg", torch.zeros_like(p)) for p in params]
            (beta1, beta2), lr = group["betas"], group["lr"]
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            direction = torch._foreach_mul(moments, beta1)
            torch._foreach_add_(direction, grads, alpha=1 - beta1)
            torch._foreach_sign_(direction)
            torch._foreach_add_(params, direction, alpha=-lr)
            torch._foreach_mul_(moments, beta2)
            torch._foreach_add_(moments, grads, alpha=1 - beta2)


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


def competitors(family: str) -> dict[str, Callable]:
    """The optimizers of table 2 for one family: name -> f(params) -> optimizer."""
    import bitsandbytes as bnb

    cls, kwargs, torch_cls = FAMILIES[family]
    makers = {"q8": lambda p: cls(p, **kwargs)}
    if torch_cls is None:
        makers["q8 fp32 state"] = lambda p: cls(p, **kwargs, **FP32_STATE)
        makers["bitsandbytes"] = lambda p: getattr(bnb.optim, BNB[family])(p, **kwargs)
        if family == "Lion":
            makers["torch foreach"] = lambda p: ForeachLion(p, **kwargs)
    else:
        makers["torch foreach"] = lambda p: torch_cls(p, **kwargs, foreach=True)
        makers["torch fused"] = lambda p: torch_cls(p, **kwargs, fused=True)
    return makers


def time_steps(makers: dict[str, Callable], model: Callable[[], torch.nn.Module]) -> dict[str, tuple]:
    """name -> (median seconds per step, optimizer), or the error a maker or step raised.
    Every optimizer steps on its own copy of `model()` with the same gradients, round by round."""
    torch.manual_seed(0)
    template = model()
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=g) * 1e-3 for p in template.parameters()] for _ in range(3)]
    runs: dict[str, list] = {}
    for name, make in makers.items():
        params = [torch.nn.Parameter(p.detach().clone()) for p in template.parameters()]
        try:
            runs[name] = [params, make(params), []]
        except Exception as err:  # e.g. an anchor without a CPU implementation
            runs[name] = err
    for i in range(WARMUP + STEPS):
        for run in runs.values():
            if isinstance(run, Exception):
                continue
            params, opt, times = run
            for p, grad in zip(params, grads[i % len(grads)], strict=True):
                p.grad = grad.clone()
            t0 = time.perf_counter()
            opt.step()
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
    return {
        name: run if isinstance(run, Exception) else (statistics.median(run[2]), run[1]) for name, run in runs.items()
    }


def table(header: tuple[str, ...], rows: list[tuple]) -> None:
    """Print a markdown table (benchmarks/gpu_check.py prints its tables with it too)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


def cell(result, base: float) -> tuple[str, str]:
    if isinstance(result, Exception):
        return "n/a", f"{type(result).__name__}"
    return f"{1e3 * result[0]:.2f}", f"{result[0] / base:.2f}x"


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}\n")

    def linear() -> torch.nn.Module:
        return torch.nn.Linear(DIM, DIM)

    def small() -> torch.nn.Module:
        return torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(SMALL)))

    import bitsandbytes as bnb
    import torchao.optim

    print(f"## AdamW, one {DIM}x{DIM} nn.Linear ({DIM * DIM + DIM:,} fp32 parameters)\n")
    anchors = {
        "q8 AdamW8bit": lambda p: q8.optim.AdamW8bit(p, lr=1e-3),
        "torch AdamW (foreach)": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
        "torch AdamW (fused)": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "bitsandbytes AdamW8bit": lambda p: bnb.optim.AdamW8bit(p, lr=1e-3),
        "torchao AdamW8bit": lambda p: torchao.optim.AdamW8bit(p, lr=1e-3),
    }
    results = time_steps(anchors, linear)
    base = results["q8 AdamW8bit"][0]
    table(
        ("optimizer", "step ms (median)", "time / q8", "state MiB"),
        [(name, *cell(r, base), f"{state_bytes(r[1]) / 2**20:.1f}") for name, r in results.items()],
    )

    ratios = {}
    for title, model in ((f"one {DIM}x{DIM} nn.Linear", linear), (f"{SMALL} nn.Linear(64, 64)", small)):
        print(f"## Every optimizer, {title} (time / q8: the other's time over q8's)\n")
        rows = []
        for family in FAMILIES:
            results = time_steps(competitors(family), model)
            base = results["q8"][0]
            for name, r in results.items():
                rows.append((family, name, *cell(r, base)))
                if not isinstance(r, Exception):
                    ratios[title, family, name] = base / r[0]  # q8's time over the other's
        table(("optimizer", "implementation", "step ms (median)", "time / q8"), rows)

    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    big = f"one {DIM}x{DIM} nn.Linear"
    for family, anchor, limit in TARGETS:
        ratio = ratios.get((big, family, anchor))
        verdict = "met" if ratio is not None and ratio <= limit else "NOT met"
        shown = "n/a" if ratio is None else f"{ratio:.2f}x"
        print(f"target {FAMILIES[family][0].__name__} <= {limit}x {anchor} ({big}): {shown} -- {verdict}")
    ratio = ratios.get((f"{SMALL} nn.Linear(64, 64)", "AdamW", "torch foreach"))
    verdict = "met" if ratio is not None and ratio <= 1.0 else "NOT met"
    print(f"target {2 * SMALL} small parameters, AdamW8bit <= 1.0x torch foreach: {ratio:.2f}x -- {verdict}")


if __name__ == "__main__":
    main()
