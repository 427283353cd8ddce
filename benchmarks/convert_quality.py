"""q8convert quality: size against error on small language models trained here.

Builds a tiny GPT-2 and a tiny BERT from transformers configs, trains each a few hundred
steps on generated text (topics whose words follow each other as a Markov chain; nothing
is downloaded) until both have learned their task and moved well away from their
initialisation, saves the weights as safetensors and converts them with:

  - q8convert's old default (`--code auto`: one blocksize, 2048, the lower-error table)
    and the same at every blocksize (the old rate-distortion curve);
  - q8convert's new default (`--model-error auto`: the old default's error of the weights
    all together, shared out between the tensors by their scale), sweeps of model errors
    (`--model-error E`) and of per-tensor targets (`--target-error E`);
  - bitsandbytes' blockwise codes (`bitsandbytes.functional.quantize_blockwise` on CPU,
    its dynamic table, fp32 absmax; size = codes + absmax as its state dicts hold them)
    at every blocksize.

For each: ratio (fp32 safetensors bytes / stored bytes), the weights' relative L2 error
(over all quantized weights: sqrt(sum ||w - w'||^2 / sum ||w||^2)), the largest per-tensor
error, and the cosine between the original and the decoded model's last hidden states
(mean over the tokens of a held-out batch). Prints the tables and, with --plot, draws the
curves (ratio against relative L2 and against 1 - cosine).

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/convert_quality.py [--steps 400] [--plot docs/convert_quality.png]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import tempfile
import time
from pathlib import Path

import q8
import torch
import transformers
from q8.tools.convert import main as q8convert
from safetensors.torch import load_file, save_file

VOCAB, SEQ, BATCH = 2048, 64, 16
TOPICS, TOPIC_WORDS = 128, 16
MASK = VOCAB
"""BERT's [MASK] token: one more than the text's vocabulary."""
TARGETS = (0.005, 0.0065, 0.008, 0.01, 0.012, 0.015, 0.02, 0.03)
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def corpus(n: int, seed: int) -> torch.Tensor:
    """n sequences of generated 'text' on `TOPICS` topics: a sequence keeps one topic, whose
    vocabulary is `TOPIC_WORDS` of the `VOCAB` tokens (a token belongs to a few topics or
    to none, as a rare word), and is a Markov chain over it: each word is followed by one of
    its 8 likely successors (80%) or by a Zipf-distributed word of the topic (20%). The
    context tells the topic (what a masked-token model learns first), the previous token
    the successors (what a next-token model learns first)."""
    g = torch.Generator().manual_seed(seed)
    tables = torch.Generator().manual_seed(0)
    words = torch.stack([torch.randperm(VOCAB, generator=tables)[:TOPIC_WORDS] for _ in range(TOPICS)])
    successors = torch.randint(0, TOPIC_WORDS, (TOPICS, TOPIC_WORDS, 8), generator=tables)
    zipf = 1 / torch.arange(1, TOPIC_WORDS + 1, dtype=torch.float)
    topic = torch.randint(0, TOPICS, (n,), generator=g)
    local = torch.multinomial(zipf, n, replacement=True, generator=g)
    out = torch.empty(n, SEQ, dtype=torch.long)
    for t in range(SEQ):
        out[:, t] = words[topic, local]
        follow = successors[topic, local, torch.randint(0, 8, (n,), generator=g)]
        jump = torch.multinomial(zipf, n, replacement=True, generator=g)
        local = torch.where(torch.rand(n, generator=g) < 0.8, follow, jump)
    return out


def build(kind: str) -> torch.nn.Module:
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=256, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB + 1, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=SEQ,
    )  # fmt: skip
    return transformers.BertForMaskedLM(cfg)


def train(kind: str, steps: int) -> torch.nn.Module:
    """The model after `steps` AdamW steps (lr 1e-3, warmed up over 30 steps, then down
    linearly to 1e-4) of next-token (GPT-2) or masked-token (BERT, 15% masked) prediction."""
    torch.manual_seed(0)
    model = build(kind)
    data = corpus(steps * BATCH, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 30, max(0.1, 1 - s / steps)))
    model.train()
    g = torch.Generator().manual_seed(2)
    losses = []
    for step in range(steps):
        x = data[step * BATCH : (step + 1) * BATCH]
        if kind == "gpt2":
            loss = model(input_ids=x, labels=x).loss
        else:
            mask = torch.rand(x.shape, generator=g) < 0.15
            loss = model(input_ids=torch.where(mask, MASK, x), labels=torch.where(mask, x, -100)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"{kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {steps} steps, "
          f"loss {first:.2f} -> {last:.2f} (means of the first and last 20 steps)", flush=True)  # fmt: skip
    return model.eval()


def hidden(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, output_hidden_states=True).hidden_states[-1]


def evaluate(kind, model, weights, decoded, stored_bytes, raw_bytes, probe) -> dict:
    """Ratio, weight errors and hidden-state cosine of `decoded` weights against `weights`."""
    err2 = ref2 = worst = 0.0
    for k, w in weights.items():
        d = decoded[k].float()
        if torch.equal(d, w):
            continue
        e2, r2 = float((d.double() - w.double()).square().sum()), float(w.double().square().sum())
        err2, ref2, worst = err2 + e2, ref2 + r2, max(worst, math.sqrt(e2 / r2))
    twin = build(kind)
    twin.load_state_dict(model.state_dict())
    twin.load_state_dict(decoded, strict=False)  # after: a tied head takes its embedding's decoded values
    cos = torch.nn.functional.cosine_similarity(
        hidden(model, probe).double(), hidden(twin.eval(), probe).double(), dim=-1
    )
    rel = math.sqrt(err2 / ref2) if ref2 else 0.0
    return {"ratio": raw_bytes / stored_bytes, "rel_l2": rel, "max_rel_l2": worst, "cosine": float(cos.mean())}


def run_q8convert(src: Path, dst: Path, argv: list[str]) -> tuple[dict, int, float]:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert q8convert([str(src), "-o", str(dst), "-q", *argv]) == 0
    seconds = time.perf_counter() - t0
    decoded = q8.load_file(dst)
    size = dst.stat().st_size
    dst.unlink()
    return decoded, size, seconds


def bnb_blockwise(weights: dict, blocksize: int) -> tuple[dict, int]:
    """bitsandbytes' blockwise dynamic codes of the tensors q8convert quantizes (2-D, >= 4096
    elements); the others stored as fp32. Returns decoded weights and bytes."""
    import bitsandbytes.functional as bnbf

    out, size = {}, 0
    for k, w in weights.items():
        if w.dim() < 2 or w.numel() < 4096:
            out[k], size = w, size + w.nbytes
            continue
        codes, state = bnbf.quantize_blockwise(w, blocksize=blocksize)
        out[k] = bnbf.dequantize_blockwise(codes, state)
        size += codes.numel() + 4 * state.absmax.numel()
    return out, size


def untied(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The float weights, each stored once (a tied head or bias under its first name only)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v.detach().clone().contiguous()
    return out


def trained(kind: str, steps: int, cache: str | None) -> torch.nn.Module:
    """`train(kind, steps)`, or its weights from the cache folder of an earlier run."""
    path = Path(cache, f"{kind}-{steps}-topics.safetensors") if cache else None
    if path and path.exists():
        model = build(kind)
        model.load_state_dict(load_file(path), strict=False)  # tied heads follow their embedding
        return model.eval()
    model = train(kind, steps)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(untied(model), path)
    return model


def measure(kind: str, steps: int, folder: Path, cache: str | None) -> dict[str, list[tuple[str, dict]]]:
    model = trained(kind, steps, cache)
    weights = untied(model)
    src = folder / f"{kind}.safetensors"
    save_file(weights, src, metadata={"format": "pt"})
    raw = src.stat().st_size
    probe = corpus(8, seed=3)
    curves: dict[str, list[tuple[str, dict]]] = {"old default": [], "new default": [], "bitsandbytes": []}
    curves["q8convert --blocksize B (old)"] = []
    curves["q8convert --model-error E"] = []
    curves["q8convert --target-error E"] = []

    def q8_point(argv: list[str]) -> dict:
        decoded, size, seconds = run_q8convert(src, folder / "out.q8", argv)
        return {**evaluate(kind, model, weights, decoded, size, raw, probe), "seconds": seconds}

    curves["old default"].append(("--code auto (bs 2048)", q8_point(["--code", "auto"])))
    curves["new default"].append(("--model-error auto", q8_point([])))
    for b in BLOCKSIZES:
        curves["q8convert --blocksize B (old)"].append((f"B={b}", q8_point(["--code", "auto", "--blocksize", str(b)])))
    for flag in ("--model-error", "--target-error"):
        for e in TARGETS:
            curves[f"q8convert {flag} E"].append((f"E={e:g}", q8_point([flag, str(e)])))
    try:
        for b in BLOCKSIZES:
            decoded, size = bnb_blockwise(weights, b)
            curves["bitsandbytes"].append((f"B={b}", evaluate(kind, model, weights, decoded, size, raw, probe)))
    except ImportError as e:
        print(f"bitsandbytes not installed, skipped: {e}")
    return curves


def print_table(kind: str, curves: dict) -> None:
    rows = [("method", "setting", "ratio", "weights rel L2", "max tensor rel L2", "1 - hidden cosine", "seconds")]
    for method, points in curves.items():
        for setting, p in points:
            seconds = f"{p['seconds']:.1f}" if "seconds" in p else ""
            rows.append((method, setting, f"{p['ratio']:.3f}x", f"{p['rel_l2']:.3e}", f"{p['max_rel_l2']:.3e}",
                         f"{1 - p['cosine']:.2e}", seconds))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{kind}")
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4.2 * len(results)), squeeze=False)
    styles = {
        "q8convert --model-error E": "D-",
        "q8convert --target-error E": "o-",
        "q8convert --blocksize B (old)": "s--",
        "bitsandbytes": "^:",
    }
    for row, (kind, curves) in zip(axes, results.items(), strict=True):
        for ax, (metric, label) in zip(
            row, [("rel_l2", "weights relative L2"), ("cosine", "1 - hidden-state cosine")], strict=True
        ):
            for method, points in curves.items():
                xs = [p[metric] if metric == "rel_l2" else 1 - p[metric] for _, p in points]
                ys = [p["ratio"] for _, p in points]
                if method in styles:
                    ax.plot(xs, ys, styles[method], label=method, markersize=4)
                else:
                    ax.plot(xs, ys, "*" if method == "new default" else "X", markersize=13, label=method)
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("ratio (fp32 / stored)")
            ax.set_title(f"{kind}: ratio against {label}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="training steps per model (default 400)")
    ap.add_argument("--models", default="gpt2,bert")
    ap.add_argument("--plot", metavar="PNG", help="draw the curves into this file (needs matplotlib)")
    ap.add_argument("--cache", metavar="DIR", help="keep the trained models here and reuse them on the next run")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for kind in args.models.split(","):
            results[kind] = measure(kind, args.steps, Path(d), args.cache)
            print_table(kind, results[kind])
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
