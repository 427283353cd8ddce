"""How q8convert's model error is shared out: the exponent of the shares, measured.

On the models of benchmarks/convert_quality.py (trained, or read from its --cache), the
2-D weights only: each tensor through the target search (`q8.tools.search.search`) with
its share of one model error, E the old default's error of the weights together (the
fixed encoding, measured whole), the shares' relative errors proportional to
rms ** -exponent (0: the same relative error for every tensor; 1: the same squared error
per element, the smallest file for the weights' error), at most 2E, scaled so that the
weights together come to E. Prints ratio (fp32 bytes / stored bytes of these tensors,
tables included), the weights' error together, the worst tensor's and 1 - the cosine of
the last hidden states, mean over 8 x 64 held-out tokens, for the old default and each
exponent.

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/convert_shares.py --cache /tmp/models
"""

from __future__ import annotations

import argparse
import math

import torch
from q8.benchmarks.convert_quality import build, corpus, hidden, trained
from q8.codec import AUTO_CODES, dequantize, quantize_best
from q8.formats import code_nbytes, stored_nbytes
from q8.tools.policy import MAX_SHARE
from q8.tools.search import families, search

EXPONENTS = (0.0, 0.5, 1.0)


def study(kind: str, steps: int, cache: str | None) -> None:
    model = trained(kind, steps, cache)
    probe = corpus(8, seed=3)
    reference = hidden(model, probe).double()
    weights = {k: v.detach().float() for k, v in model.state_dict().items() if v.dim() >= 2 and v.numel() >= 4096}
    weights = {k: v for k, v in weights.items() if "lm_head" not in k and "decoder" not in k}  # tied: once
    norm2 = {k: float(v.double().square().sum()) for k, v in weights.items()}
    ms = {k: norm2[k] / v.numel() for k, v in weights.items()}
    raw = sum(4 * v.numel() for v in weights.values())

    def row(label: str, stored: dict[str, tuple[int, float, torch.Tensor]]) -> None:
        twin = build(kind)
        twin.load_state_dict(model.state_dict())
        twin.load_state_dict({k: d for k, (_, _, d) in stored.items()}, strict=False)
        cos = torch.nn.functional.cosine_similarity(reference, hidden(twin.eval(), probe).double(), dim=-1)
        together = math.sqrt(sum(e**2 * norm2[k] for k, (_, e, _) in stored.items()) / sum(norm2.values()))
        print(f"{kind:5s} {label:42s} ratio {raw / sum(n for n, _, _ in stored.values()):.3f}x  weights "
              f"{together:.3e}  worst {max(e for _, e, _ in stored.values()):.3e}  "
              f"1 - cosine {1 - float(cos.mean()):.3e}", flush=True)  # fmt: skip

    old, tables = {}, set()
    for k, x in weights.items():
        qt, err = quantize_best(x, AUTO_CODES[bool(x.min() < 0)], 2048)
        old[k] = (stored_nbytes(qt), err.rel_l2, dequantize(qt))
        tables.add(qt.code)
    first = next(iter(old))
    old[first] = (old[first][0] + sum(code_nbytes(c) for c in tables), *old[first][1:])
    row("old default (--code auto, blocksize 2048)", old)
    target = math.sqrt(sum(e**2 * norm2[k] for k, (_, e, _) in old.items()) / sum(norm2.values()))
    for exponent in EXPONENTS:
        scale = target * math.sqrt(sum(norm2.values()) / sum(norm2[k] * ms[k] ** -exponent for k in weights))
        stored, held = {}, set()
        for k, x in weights.items():
            share = min(scale * ms[k] ** (-exponent / 2), MAX_SHARE * target)
            found = search(x, share, families(bool(x.min() < 0)), held=held)
            held.add(found.option.code)
            stored[k] = (found.cost, found.error.rel_l2, dequantize(found.qt))
        row(f"shares ~ rms ** -{exponent:g}, model error {target:.3e}", stored)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--models", default="gpt2,bert")
    ap.add_argument("--cache", metavar="DIR", help="benchmarks/convert_quality.py's cache of trained models")
    args = ap.parse_args()
    for kind in args.models.split(","):
        study(kind, args.steps, args.cache)


if __name__ == "__main__":
    main()
