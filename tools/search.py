"""The per-tensor search behind `q8convert --target-error`: the smallest stored encoding
whose relative L2 error is within a target.

An option is a code table and a blocksize. Its size is what the container stores for it:
the codes after the container's entropy coding (Huffman where it pays) plus the absmax
(`q8.formats.stored_nbytes`, the writer's own rule). Coarser linear tables
(`q8.linear_code(levels=...)`) trade error for codes that entropy-code smaller, smaller
blocks trade absmax bytes for error; the search finds the cheapest mix for each tensor.

Cost: options are first measured on a sample (`SAMPLE_SLICES` slices of 4096 elements
spread over the tensor, aligned so that they hold whole blocks of every blocksize; a
tensor of up to twice that size is its own sample, and then every figure is exact). At
each blocksize the coarsest table of a family within the target is found by bisection
(about 50 sample measurements per tensor). The candidates are then quantized whole in
the order of their predicted size, until one is within the target and the next is
predicted more than `SIZE_SLACK` larger (1-2 whole quantizations as a rule). The error
of what is stored is always measured on the whole tensor.

Monotone: a larger target admits every option a smaller one admitted, so it never picks
a larger one where the figures are exact (small tensors); on a sample it relies on the
predicted sizes ranking options right (tests/test_convert*.py check whole models).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from q8.codec import Code, QTensor, QuantError, dynamic_code, linear_code, quant_error, quantize
from q8.codec.blockwise import BLOCKSIZES
from q8.formats import code_nbytes, stored_nbytes
from q8.formats.container import blockwise_problem

__all__ = ["Found", "Option", "families", "sample", "sample_starts", "search"]

MIN_LEVELS = 8
"""The coarsest linear table tried: 8 levels each side of zero (16 unsigned)."""
LADDER = 8
"""Linear tables per halving of the levels: 127, 117, 107, 98, ... (errors about 9% apart;
the blocksizes fill in between). Few tables: each costs 1 KiB per file that uses it."""
SLICE, SAMPLE_SLICES = 4096, 16
REFINE_STEPS = 2
"""How many finer tables a candidate may step to when the whole tensor misses the target."""
SIZE_SLACK = 1.003
"""Options predicted within 0.3% of the smallest confirmed one are tried too."""
MAX_CONFIRMED = 2
"""Whole-tensor measurements once one option is within the target..."""
MAX_WHOLE = 8
"""...and at most, before falling back to the lowest-error option."""


@dataclass(frozen=True)
class Option:
    """One way to store a tensor: its code table and blocksize."""

    code: Code
    blocksize: int


@dataclass
class Found:
    """The option chosen for a tensor, what it stores and why."""

    option: Option
    qt: QTensor
    error: QuantError
    nbytes: int
    """Bytes of codes and absmax in the file, after the container's compression."""
    cost: int
    """`nbytes` plus the bytes of its table if the file does not hold it yet."""
    met: bool
    """Whether the error is within the target (else: the lowest-error option)."""
    tried: int
    """How many options were measured (on the sample, and on the whole tensor)..."""
    whole: int
    """...of which on the whole tensor."""


def families(signed: bool, code: str = "auto") -> list[list[Code]]:
    """The tables the search considers, in families ordered from fine to coarse: the
    dynamic table alone, and the linear tables from 127 levels (255 unsigned) down to
    `MIN_LEVELS` (`q8.linear_code(levels=...)`, `LADDER` per halving), for code "auto",
    "dynamic" or "linear"."""
    if code not in ("auto", "dynamic", "linear"):
        raise ValueError(f"code must be 'auto', 'dynamic' or 'linear', got {code!r}")
    out = [[dynamic_code(signed)]] if code in ("auto", "dynamic") else []
    if code in ("auto", "linear"):
        top, low = (127, MIN_LEVELS) if signed else (255, 2 * MIN_LEVELS)
        steps = math.ceil(LADDER * math.log2(top / low))
        levels = sorted({round(top * 2 ** (-k / LADDER)) for k in range(steps + 1)}, reverse=True)
        out.append([linear_code(signed, None if n == top else n) for n in levels])
    return out


@dataclass
class _Measured:
    option: Option
    qt: QTensor | None
    error: QuantError
    nbytes: int
    """Stored bytes: codes and absmax after the container's compression."""
    numel: int


def _measure(x: torch.Tensor, option: Option, keep: bool = True) -> _Measured:
    qt = quantize(x, option.code, option.blocksize)
    if blockwise_problem(qt.absmax, qt.code, qt.dtype):  # a coarse table's far entries x absmax overflow fp16
        return _Measured(option, None, QuantError(math.inf, math.inf, -math.inf), stored_nbytes(qt), x.numel())
    # fp16/bf16 tensors decode to their own dtype: their error includes that rounding
    err = quant_error(x, qt if x.dtype == torch.float32 else qt.dequantize())
    return _Measured(option, qt if keep else None, err, stored_nbytes(qt), x.numel())


def sample_starts(numel: int) -> list[int] | None:
    """Where `sample` takes its slices of `SLICE` elements in a flat tensor of `numel`
    elements (aligned to every blocksize), or None when the sample is the whole tensor."""
    slices = numel // SLICE
    if slices < 2 * SAMPLE_SLICES:
        return None
    return [(i * slices // SAMPLE_SLICES) * SLICE for i in range(SAMPLE_SLICES)]


def sample(x: torch.Tensor) -> torch.Tensor:
    """What the search measures first: `SAMPLE_SLICES` slices of 4096 elements spread over
    the flat tensor (`sample_starts`), or the tensor itself if it is small."""
    starts = sample_starts(x.numel())
    if starts is None:
        return x
    flat = x.detach().reshape(-1)
    return torch.cat([flat[s : s + SLICE] for s in starts])


def search(
    x: torch.Tensor,
    target: float,
    tables: Sequence[Sequence[Code]],
    blocksizes: Sequence[int] = BLOCKSIZES,
    held: Collection[Code] = (),
) -> Found:
    """The option of smallest stored size whose relative L2 error on `x` is <= `target`,
    or, when none reaches it, the one of lowest error.

    For each family of `tables` (fine to coarse, see `families`) and blocksize, the
    coarsest table the sample puts within the target is found by bisection (and the
    coarsest within it of the tables in `held`, those the file already holds: a new table
    costs `q8.formats.code_nbytes` once per file); these candidates are ranked by their
    size predicted from the sample and confirmed on the whole tensor. `x` is a finite
    CPU float tensor.
    """
    if not target > 0 or math.isinf(target):
        raise ValueError(f"search: target must be a positive relative L2 error, got {target!r}")
    if not tables or not all(tables) or not blocksizes:
        raise ValueError("search: no table or no blocksize to choose from")
    part = sample(x)
    exact = part is x  # a small tensor is its own sample: every figure is exact
    tried = whole = 0

    def measure(t: torch.Tensor, option: Option) -> _Measured:
        nonlocal tried, whole
        tried += 1
        whole += t is x
        return _measure(t, option, keep=t is x)

    def cost(m: _Measured) -> float:
        """Predicted bytes in the file: the data scaled to the whole tensor, and the table if new."""
        table = 0 if m.option.code in held else code_nbytes(m.option.code)
        return m.nbytes * x.numel() / max(1, m.numel) + table

    candidates, finest = [], []  # candidates: (measured on the sample, family, index in it)
    for family in tables:
        for bs in blocksizes:
            best = measure(part, Option(family[0], bs))
            finest.append(best)
            if best.error.rel_l2 > target:
                continue
            lo, hi = 0, len(family) - 1  # bisect for the coarsest table within the target
            while lo < hi:
                mid = (lo + hi + 1) // 2
                m = measure(part, Option(family[mid], bs))
                if m.error.rel_l2 <= target:
                    lo, best = mid, m
                else:
                    hi = mid - 1
            candidates.append((best, family, lo))
            mine = [i for i in range(lo) if family[i] in held]  # a held table costs no index bytes
            if mine and (m := measure(part, Option(family[mine[-1]], bs))).error.rel_l2 <= target:
                candidates.append((m, family, mine[-1]))
    candidates.sort(key=lambda c: cost(c[0]))  # stable: ties keep the order of families and blocksizes
    lowest_error = min(finest, key=lambda m: (m.error.rel_l2, cost(m)))
    if exact:
        chosen = candidates[0][0] if candidates else lowest_error
    else:
        chosen, predicted = None, math.inf
        for c, family, index in candidates:
            if chosen is not None and (cost(c) > predicted * SIZE_SLACK or whole >= MAX_CONFIRMED):
                break
            if whole >= MAX_WHOLE:
                break
            for i in range(index, max(-1, index - 1 - REFINE_STEPS), -1):  # finer tables if the sample was optimistic
                m = measure(x, Option(family[i], c.option.blocksize))
                if m.error.rel_l2 <= target:
                    break
            if m.error.rel_l2 <= target and (chosen is None or cost(m) < cost(chosen)):
                chosen, predicted = m, min(predicted, cost(c))
        if chosen is None:  # none within the target: the lowest-error option
            chosen = measure(x, lowest_error.option)
    met = chosen.error.rel_l2 <= target
    return Found(chosen.option, chosen.qt, chosen.error, chosen.nbytes, round(cost(chosen)), met, tried, whole)
