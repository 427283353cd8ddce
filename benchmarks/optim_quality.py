"""Training quality of the 8-bit optimizers over several seeds: every q8 optimizer against
its fp32 counterpart, with bitsandbytes' and torchao's 8-bit optimizers in the same run.

Two tasks, each run with the same initial weights and the same batches for every
optimizer at a given seed (the seed sets both):
  gpt2  a 2-layer byte-level GPT-2 (width 128, vocabulary 256, no dropout) on text from a
        small generated grammar (agreement, relative clauses, numbers), batches of 16x64;
  clf   a 3-layer MLP classifying generated 12x12 "images" (10 noisy, shifted templates).
Per optimizer: the final eval loss (held-out data) as mean, std, min and max over the
seeds; its mean relative to the fp32 counterpart's; and the largest single-step update
of any parameter element, max |delta p| / lr over all steps and seeds. Every state entry
of a parameter with >= 4096 elements is 8-bit (no 32-bit embedding override: a new user's
setup). fp32 counterparts: torch.optim where it exists; Lion, LAMB and LARS are the plain
fp32 rules written below (the algorithms of q8's docstrings).

Run:  PYTHONSAFEPATH=1 .venv/bin/python benchmarks/optim_quality.py [--seeds 5] [--steps N]
      [--tasks gpt2,clf] [--only Adam,AdamW] [--jobs 2] [--plot optim_quality.png]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import q8
import torch

# --- tasks --------------------------------------------------------------------------------

NOUNS = ["dog", "cat", "bird", "pig", "cow"]
VERBS = ["see", "like", "help", "catch"]
ADJECTIVES = ["big", "old", "red"]
NUMBERS = ["two", "three", "four"]


def _noun_phrase(r: random.Random, plural: bool) -> str:
    words = [r.choice(["the", "a"]) if not plural else r.choice(["the", "some", r.choice(NUMBERS)])]
    words += r.sample(ADJECTIVES, r.choice([0, 0, 1]))
    words.append(r.choice(NOUNS) + ("s" if plural else ""))
    return " ".join(words)


def _verb(r: random.Random, plural: bool) -> str:
    verb = r.choice(VERBS)
    return verb if plural else verb + ("es" if verb.endswith("ch") else "s")


def _sentence(r: random.Random, depth: int = 0) -> str:
    plural = r.random() < 0.4
    subject = _noun_phrase(r, plural)
    if depth < 1 and r.random() < 0.3:  # a relative clause agreeing with the subject
        subject += " that " + _verb(r, plural) + " " + _noun_phrase(r, r.random() < 0.4)
    return f"{subject} {_verb(r, plural)} {_noun_phrase(r, r.random() < 0.4)}"


def grammar_text(chars: int, seed: int) -> torch.Tensor:
    """Byte tokens of sentences from the grammar above, e.g. 'the two old dogs that help a
    cat watch some birds.'; fixed by `seed`."""
    r = random.Random(seed)
    parts, n = [], 0
    while n < chars:
        s = _sentence(r) + (". " if r.random() < 0.8 else ", and ")
        parts.append(s)
        n += len(s)
    return torch.tensor(list("".join(parts)[:chars].encode()), dtype=torch.long)


class GPT2Task:
    name, batch, seq = "gpt2", 16, 48
    default_steps, eval_every = 300, 25
    tied = False  # untied by default: tied, fp32 AdamW itself leaves an early plateau at a random step

    def __init__(self):
        self.train_text = grammar_text(200_000, seed=1234)
        self.eval_tokens = grammar_text(128 * (self.seq + 1), seed=99).view(128, -1)  # held-out windows

    def model(self) -> torch.nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            n_layer=2, n_embd=128, n_head=4, vocab_size=256, n_positions=self.seq + 1,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
            tie_word_embeddings=self.tied,
        )  # fmt: skip
        return GPT2LMHeadModel(cfg)

    def batch_loss(self, model, g: torch.Generator) -> torch.Tensor:
        start = torch.randint(0, self.train_text.numel() - self.seq - 1, (self.batch,), generator=g)
        tokens = torch.stack([self.train_text[i : i + self.seq + 1] for i in start.tolist()])
        return model(tokens, labels=tokens).loss

    @torch.no_grad()
    def eval_loss(self, model) -> float:
        return statistics.fmean(model(t, labels=t).loss.item() for t in self.eval_tokens.split(32))


class ClassifierTask:
    name, batch, side, classes = "clf", 128, 12, 10
    default_steps, eval_every = 600, 50

    def __init__(self):
        g = torch.Generator().manual_seed(4321)
        blobs = torch.randn(self.classes, 1, self.side, self.side, generator=g)
        kernel = torch.ones(1, 1, 3, 3) / 9
        templates = torch.nn.functional.conv2d(blobs, kernel, padding=1).squeeze(1) * 2
        shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        self.shifted = torch.stack([torch.roll(templates, s, dims=(1, 2)) for s in shifts], dim=1)
        self.eval_x, self.eval_y = self.sample(4096, torch.Generator().manual_seed(77))

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Templates with random contrast, a shift of up to one pixel and pixel noise."""
        y = torch.randint(0, self.classes, (n,), generator=g)
        shift = torch.randint(0, self.shifted.shape[1], (n,), generator=g)
        x = self.shifted[y, shift] * (0.5 + torch.rand(n, 1, 1, generator=g))
        x = x + torch.randn(n, self.side, self.side, generator=g) * 1.1
        return x.flatten(1), y

    def model(self) -> torch.nn.Module:
        d = self.side * self.side
        return torch.nn.Sequential(
            torch.nn.Linear(d, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
            torch.nn.Linear(256, self.classes),
        )  # fmt: skip

    def batch_loss(self, model, g: torch.Generator) -> torch.Tensor:
        x, y = self.sample(self.batch, g)
        return torch.nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def eval_loss(self, model) -> float:
        return torch.nn.functional.cross_entropy(model(self.eval_x), self.eval_y).item()


TASKS = {t.name: t for t in (GPT2Task, ClassifierTask)}

# --- fp32 references for the optimizers torch does not have ---------------------------------


class _Reference(torch.optim.Optimizer):
    """A plain fp32 optimizer: `rule(p, grad, state, group, step)` per parameter."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["step"] = state.get("step", 0) + 1
                    self.rule(p, p.grad, state, group, state["step"])


class Lion(_Reference):
    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    def rule(self, p, grad, state, group, step):
        beta1, beta2 = group["betas"]
        m = state.setdefault("exp_avg", torch.zeros_like(p))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(torch.sign(beta1 * m + (1 - beta1) * grad), alpha=-group["lr"])
        m.mul_(beta2).add_(grad, alpha=1 - beta2)


class LAMB(_Reference):
    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def rule(self, p, grad, state, group, step):
        beta1, beta2 = group["betas"]
        m = state.setdefault("exp_avg", torch.zeros_like(p)).mul_(beta1).add_(grad, alpha=1 - beta1)
        v = state.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        r = m / (1 - beta1**step) / ((v / (1 - beta2**step)).sqrt() + group["eps"]) + group["weight_decay"] * p
        p_norm, r_norm = p.norm(), r.norm()
        trust = (p_norm / r_norm).item() if p_norm > 0 and r_norm > 0 else 1.0
        p.add_(r, alpha=-group["lr"] * trust)


class LARS(_Reference):
    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3, eps=1e-8):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults | {"trust_coefficient": trust_coefficient, "eps": eps})

    def rule(self, p, grad, state, group, step):
        wd = group["weight_decay"]
        p_norm, g_norm = p.norm(), grad.norm()
        trust = 1.0
        if p_norm > 0 and g_norm > 0:
            trust = (group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"])).item()
        d = (grad + wd * p) * trust
        buf = state.get("momentum_buffer")
        state["momentum_buffer"] = buf = d.clone() if buf is None else buf.mul_(group["momentum"]).add_(d)
        p.add_(buf, alpha=-group["lr"])


# --- the optimizers compared ---------------------------------------------------------------

# family -> (hyperparameters per task, the fp32 counterpart's class); every variant of a
# family gets the same hyperparameters.
FAMILIES: dict[str, tuple[dict[str, dict], Callable]] = {
    "Adam": ({"gpt2": {"lr": 3e-3}, "clf": {"lr": 1e-3}}, torch.optim.Adam),
    "AdamW": (
        {"gpt2": {"lr": 3e-3, "weight_decay": 0.01}, "clf": {"lr": 1e-3, "weight_decay": 0.01}},
        torch.optim.AdamW,
    ),
    "SGD": (
        {"gpt2": {"lr": 0.1, "momentum": 0.9}, "clf": {"lr": 0.03, "momentum": 0.9}},
        torch.optim.SGD,
    ),
    "Lion": ({"gpt2": {"lr": 1e-3, "weight_decay": 0.1}, "clf": {"lr": 1e-4, "weight_decay": 0.1}}, Lion),
    "RMSprop": ({"gpt2": {"lr": 5e-4}, "clf": {"lr": 2e-4}}, torch.optim.RMSprop),
    "Adagrad": ({"gpt2": {"lr": 2e-2}, "clf": {"lr": 1e-2}}, torch.optim.Adagrad),
    "LAMB": ({"gpt2": {"lr": 1e-2, "weight_decay": 0.01}, "clf": {"lr": 5e-3, "weight_decay": 0.01}}, LAMB),
    "LARS": ({"gpt2": {"lr": 20.0, "momentum": 0.9}, "clf": {"lr": 5.0, "momentum": 0.9}}, LARS),
}


def make_optimizer(family: str, variant: str, task: str, params) -> torch.optim.Optimizer:
    kwargs, fp32 = FAMILIES[family]
    kwargs = kwargs[task]
    if variant == "fp32":
        return fp32(params, **kwargs)
    if variant == "q8":
        return getattr(q8.optim, f"{family}8bit")(params, **kwargs)
    if variant == "bitsandbytes":
        import bitsandbytes as bnb

        return getattr(bnb.optim, f"{family}8bit")(params, **kwargs)
    if variant == "torchao":
        import torchao.optim

        return getattr(torchao.optim, f"{family}8bit")(params, **kwargs)
    raise ValueError(f"unknown variant {variant!r}")


SELECTED = ["fp32", "q8", "bitsandbytes", "torchao"]  # --variants


def variants(family: str) -> list[str]:
    """Which implementations of `family` run: fp32 and q8, the anchors where they exist."""
    exists = ["fp32", "q8", "bitsandbytes", *(["torchao"] if family in ("Adam", "AdamW") else [])]
    return [v for v in exists if v in SELECTED]


# --- one run ---------------------------------------------------------------------------------


def schedule(i: int, steps: int) -> float:
    """lr factor after i steps: linear warm-up over the first 5% of steps, then a cosine
    decay to 10% (the usual recipe; it also keeps the final loss from being one noisy batch)."""
    warmup = max(1, steps // 20)
    if i < warmup:
        return (i + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))


_TASKS: dict[str, object] = {}


def run(task_name: str, family: str, variant: str, seed: int, steps: int) -> dict:
    """Train one model; returns its eval curve, final eval loss and largest step / lr, or
    the error that stopped it (an anchor library may not support a setting on CPU)."""
    try:
        return _train(task_name, family, variant, seed, steps)
    except Exception as err:  # reported in the table, the other runs go on
        return {"error": f"{type(err).__name__}: {err}"[:120]}


def _train(task_name: str, family: str, variant: str, seed: int, steps: int) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    task = _TASKS.setdefault(task_name, TASKS[task_name]())
    torch.manual_seed(seed)
    model = task.model()
    opt = make_optimizer(family, variant, task_name, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: schedule(i, steps))
    g = torch.Generator().manual_seed(10_000 + seed)
    curve, max_step = [(0, task.eval_loss(model))], 0.0
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss = task.batch_loss(model, g)
        opt.zero_grad()
        loss.backward()
        before = [(p, p.detach().clone(), float(group["lr"])) for group in opt.param_groups for p in group["params"]]
        opt.step()
        sched.step()
        with torch.no_grad():
            for p, b, lr in before:
                max_step = max(max_step, (p - b).abs().max().item() / lr)
        if step % task.eval_every == 0 or step == steps:
            curve.append((step, task.eval_loss(model)))
    final = curve[-1][1]
    return {"curve": curve, "final": final, "max_step": max_step, "seconds": time.perf_counter() - t0}


# --- the state study: 8-bit shadows of an fp32 run ---------------------------------------

STATE_VARIANTS = {
    # name: (table of the non-negative state, stochastic rounding)
    "udynamic, nearest (q8 before)": ("udynamic", False),
    "udynamic, stochastic": ("udynamic", True),
    "udynamic_sq, nearest": ("udynamic_sq", False),
    "udynamic_sq, stochastic (q8 now)": ("udynamic_sq", True),
}


def _encode(x: torch.Tensor, variant: str, key: int) -> torch.Tensor:
    """x through one 8-bit round trip of `variant` (blocks of 256)."""
    code, stochastic = STATE_VARIANTS[variant]
    if stochastic:
        return q8.codec.quantize_stochastic(x, code, 256, key).dequantize()
    return q8.quantize(x, code, 256).dequantize()


def state_study(steps: int) -> None:
    """Train the GPT-2 task in fp32 (AdamW, then Adagrad) and carry, beside the exact state,
    8-bit shadows of it fed the same gradients, one per storage variant: how far each
    shadow's update is from the exact one, isolated from any change of trajectory."""
    warnings.filterwarnings("ignore")
    task = GPT2Task()
    for family in ("AdamW", "Adagrad"):
        torch.manual_seed(0)
        model = task.model()
        opt = make_optimizer(family, "fp32", "gpt2", model.parameters())
        big = [p for p in model.parameters() if p.numel() >= 4096]
        shadow = {v: [dict.fromkeys(("m", "v"), torch.zeros_like(p)) for p in big] for v in STATE_VARIANTS}
        g = torch.Generator().manual_seed(10_000)
        rows = []
        for step in range(1, steps + 1):
            loss = task.batch_loss(model, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            for variant, states in shadow.items():
                err = ref = zero_v = 0.0
                largest = 0.0
                for i, (p, st) in enumerate(zip(big, states, strict=True)):
                    exact, grad, key = opt.state[p], p.grad, q8.codec.rounding_key(i, step)
                    if family == "AdamW":
                        m = st["m"].mul(0.9).add_(grad, alpha=0.1)
                        v = st["v"].mul(0.999).addcmul_(grad, grad, value=0.001)
                        u8 = m / (1 - 0.9**step) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
                        u32 = (
                            exact["exp_avg"]
                            / (1 - 0.9**step)
                            / ((exact["exp_avg_sq"] / (1 - 0.999**step)).sqrt() + 1e-8)
                        )
                        st["m"] = q8.quantize(m, "dynamic", 256).dequantize()
                        st["v"] = _encode(v, variant, key)
                        zero_v += ((st["v"] == 0) & (st["m"] != 0)).sum().item()
                    else:
                        total = st["v"] + grad * grad
                        u8, u32 = grad / (total.sqrt() + 1e-10), grad / (exact["sum"].sqrt() + 1e-10)
                        st["v"] = _encode(total, variant, key)
                        zero_v += ((st["v"] == 0) & (exact["sum"] > 0)).sum().item()
                    err += (u8 - u32).abs().sum().item()
                    ref += u32.abs().sum().item()
                    largest = max(largest, u8.abs().max().item())
                if step in (10, steps // 3, steps):
                    rows.append((step, variant, f"{100 * err / ref:.1f}%", f"{largest:.3g}", f"{zero_v:.0f}"))
        print(f"\n{family} fp32 on gpt2 (seed 0), 8-bit shadows of its state (first moment: dynamic, nearest)")
        zeros = "v = 0, m != 0" if family == "AdamW" else "sum = 0, exact > 0"
        print(f"| step | non-negative state | update error (mean abs, rel.) | max abs update (lr) | {zeros} |")
        print("| ---: | --- | ---: | ---: | ---: |")
        for r in sorted(rows, key=lambda r: (r[0], list(STATE_VARIANTS).index(r[1]))):
            print("| " + " | ".join(map(str, r)) + " |")


# --- report --------------------------------------------------------------------------------


def summarize(results: dict, task: str, families: list[str], seeds: list[int]) -> list[tuple]:
    rows = []
    for family in families:
        ref = statistics.fmean(results[task, family, "fp32", s]["final"] for s in seeds)
        ref_std = statistics.stdev(results[task, family, "fp32", s]["final"] for s in seeds) if len(seeds) > 1 else 0
        for variant in variants(family):
            errors = [results[task, family, variant, s].get("error") for s in seeds]
            if any(errors):
                rows.append((f"{family} {variant}", "failed:", next(e for e in errors if e), "", "", "", "", ""))
                continue
            finals = [results[task, family, variant, s]["final"] for s in seeds]
            if diverged := sum(not math.isfinite(f) for f in finals):
                name, why = f"{family} {variant}", f"{diverged} of {len(seeds)} seeds"
                rows.append((name, "diverged:", why, "", "", "", "NO", ""))
                continue
            mean = statistics.fmean(finals)
            std = statistics.stdev(finals) if len(seeds) > 1 else 0.0
            max_step = max(results[task, family, variant, s]["max_step"] for s in seeds)
            rel = 100 * (mean - ref) / ref
            ok = "" if variant == "fp32" else ("yes" if abs(mean - ref) <= max(0.01 * ref, ref_std) else "NO")
            rows.append(
                (
                    f"{family} {variant}",
                    f"{mean:.4f}",
                    f"{std:.4f}",
                    f"{min(finals):.4f}",
                    f"{max(finals):.4f}",
                    f"{rel:+.2f}%",
                    ok,
                    f"{max_step:.3g}",
                )
            )
    return rows


def print_table(rows: list[tuple]) -> None:
    header = ("optimizer", "eval loss mean", "std", "min", "max", "vs fp32", "parity", "max |dp|/lr")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * (w - 1) + (":" if i else "-") for i, w in enumerate(widths)) + " |")
    for r in rows:
        print(
            "| "
            + " | ".join((c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            + " |"
        )


def plot(results: dict, tasks: list[str], families: list[str], seeds: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), len(families), figsize=(3.2 * len(families), 2.8 * len(tasks)), squeeze=False)
    colors = {"fp32": "black", "q8": "tab:red", "bitsandbytes": "tab:blue", "torchao": "tab:green"}
    for row, task in enumerate(tasks):
        for col, family in enumerate(families):
            ax = axes[row][col]
            for variant in variants(family):
                if any("error" in results[task, family, variant, s] for s in seeds):
                    continue
                curves = [results[task, family, variant, s]["curve"] for s in seeds]
                xs = [x for x, _ in curves[0]]
                ys = [statistics.fmean(c[i][1] for c in curves) for i in range(len(xs))]
                lo = [min(c[i][1] for c in curves) for i in range(len(xs))]
                hi = [max(c[i][1] for c in curves) for i in range(len(xs))]
                ax.plot(xs[1:], ys[1:], color=colors[variant], label=variant, lw=1.2)
                ax.fill_between(xs[1:], lo[1:], hi[1:], color=colors[variant], alpha=0.15)
            ax.set_title(f"{task}: {family}", fontsize=9)
            ax.tick_params(labelsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.supxlabel("step")
    fig.supylabel(f"eval loss (mean and min-max over {len(seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds per optimizer (init and batch order)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: per task, 300)")
    ap.add_argument("--tasks", default="gpt2,clf")
    ap.add_argument("--only", default=",".join(FAMILIES), help="optimizer families, comma-separated")
    ap.add_argument("--variants", default="fp32,q8,bitsandbytes,torchao", help="implementations, comma-separated")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    ap.add_argument("--plot", default="benchmarks/optim_quality.png", help="PNG of the loss curves ('' for none)")
    ap.add_argument("--study", action="store_true", help="run the state study (8-bit shadows of fp32 runs) instead")
    ap.add_argument("--tied", action="store_true", help="GPT-2 with tied input/output embeddings (GPT-2's default)")
    args = ap.parse_args()
    GPT2Task.tied = args.tied
    if args.study:
        state_study(args.steps or GPT2Task.default_steps)
        return
    tasks, families = args.tasks.split(","), args.only.split(",")
    SELECTED[:] = args.variants.split(",")
    if not {"fp32", "q8"} <= set(SELECTED):
        raise SystemExit("--variants must include fp32 and q8 (the table compares q8 with fp32)")
    for name in families:
        if name not in FAMILIES:
            raise SystemExit(f"unknown optimizer family {name!r}; choose from {', '.join(FAMILIES)}")
    seeds = list(range(args.seeds))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.jobs} jobs, load average {os.getloadavg()[0]:.1f}")
    jobs = [
        (task, family, variant, seed, args.steps or TASKS[task].default_steps)
        for task in tasks
        for family in families
        for variant in variants(family)
        for seed in seeds
    ]
    t0 = time.perf_counter()
    results = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for job, result in zip(jobs, pool.map(run, *zip(*jobs, strict=True)), strict=True):
            results[job[:4]] = result
            done = result.get("error") or f"final eval loss {result['final']:.4f}, {result['seconds']:.0f} s"
            print(f"[{len(results)}/{len(jobs)}] {' '.join(map(str, job[:4]))}: {done}", file=sys.stderr, flush=True)
    for task in tasks:
        steps = args.steps or TASKS[task].default_steps
        print(
            f"\n{task}: final eval loss over seeds {seeds} after {steps} steps; parity: |mean - fp32 mean| <= "
            f"max(1% of it, fp32 std)"
        )
        print_table(summarize(results, task, families, seeds))
    if args.plot:
        plot(results, tasks, families, seeds, args.plot)
        print(f"\nplot: {args.plot}")
    print(f"{len(jobs)} runs in {time.perf_counter() - t0:.0f} s, load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
