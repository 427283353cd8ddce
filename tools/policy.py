"""What q8convert does to each tensor, and the error it measured doing it.

Large floating tensors are quantized blockwise; small ones, 1-D weights (norms, biases),
integer and bool tensors stay exact. Adam moments get the dynamic tables they were
designed for (signed for exp_avg, unsigned for exp_avg_sq); already-8-bit optimizer state
is stored as it is. `--lossless`, `--keep` and `--max-error` keep tensors exact.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import numpy as np
import q8
import torch
from q8.codec import AUTO_CODES

__all__ = ["MIN_QUANT_NUMEL", "Decision", "Policy", "measure_error"]

MIN_QUANT_NUMEL = 4096
"""Tensors with fewer elements stay exact: their bytes do not matter, their precision might."""

MOMENT_CODES = {"exp_avg": "dynamic", "exp_avg_sq": "udynamic", "max_exp_avg_sq": "udynamic"}
"""Adam state by key: the dynamic table for its sign (Dettmers et al. 2022)."""

QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16)
_ERROR_CHUNK = 1 << 20  # elements per step of the error measurement: bounded temporaries


@dataclass
class Decision:
    """One tensor's fate: kept exact, quantized (with which code) or stored as is."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str  # "exact", "quantized" or "8-bit as is"
    reason: str
    raw_bytes: int
    code: str | None = None
    blocksize: int | None = None
    rel_l2: float = 0.0
    max_abs: float = 0.0
    stored_bytes: int | None = None  # what the file holds for it (after compression, once written)

    def extra(self) -> dict[str, str]:
        """The per-tensor record kept in the file's index (`q8.Writer.add(extra=...)`)."""
        out = {"q8convert": self.reason}
        if self.encoding == "quantized":
            out |= {"rel_l2": f"{self.rel_l2:.3e}", "max_abs": f"{self.max_abs:.3e}"}
        return out


def measure_error(x: torch.Tensor, qt: q8.QTensor) -> tuple[float, float]:
    """(relative L2, max abs) error of `qt` against `x`.

    Decoded a million elements at a time, so a huge tensor never needs a decoded or fp64
    copy of itself; the arithmetic is numpy's, single-threaded, which stays fast on a
    busy machine where small multi-threaded torch ops stall (sums of squares are
    accumulated in fp64 across chunks).
    """
    flat = x.detach().reshape(-1)
    bs = qt.blocksize
    step = max(bs, _ERROR_CHUNK // bs * bs)
    err2 = ref2 = max_abs = 0.0
    for a in range(0, flat.numel(), step):
        b = min(a + step, flat.numel())
        part = q8.QTensor(qt.codes[a:b], qt.absmax[a // bs : -(-b // bs)], qt.code, bs, (b - a,), torch.float32)
        ref = flat[a:b].float().numpy()
        diff = ref - q8.dequantize(part).numpy()
        err2 += float(diff @ diff)
        ref2 += float(ref @ ref)
        max_abs = max(max_abs, float(np.abs(diff, out=diff).max()))
    if err2 == 0.0:
        return 0.0, max_abs
    return (math.sqrt(err2 / ref2) if ref2 else math.inf), max_abs


@dataclass(frozen=True)
class Policy:
    """The command line's choices: see `q8convert --help`."""

    lossless: bool = False
    blocksize: int = 2048
    code: str = "auto"
    keep: tuple[str, ...] = ()
    max_error: float | None = None

    def apply(self, name: str, x: torch.Tensor, key: str = "") -> tuple[torch.Tensor | q8.QTensor, Decision]:
        """Decide for tensor `name` and produce what is stored: `x` itself or a QTensor.

        `key` is the tensor's key in its parent dict: an Adam moment's key ("exp_avg",
        "exp_avg_sq") picks the moment's dynamic table.
        """
        moment = MOMENT_CODES.get(key)
        d = Decision(name, tuple(x.shape), str(x.dtype).removeprefix("torch."), "exact", "", x.numel() * x.itemsize)
        d.reason = self._exact_reason(name, x, moment)
        if d.reason:
            return x, d
        lo, hi = (float(v) for v in torch.aminmax(x))  # one pass: NaN and inf propagate, and the sign
        if not (math.isfinite(lo) and math.isfinite(hi)):
            d.reason = "has NaN/inf"
            return x, d
        signed = lo < 0
        candidates = [moment] if moment else self._candidates(signed)
        best, best_err = None, (math.inf, math.inf)
        for code in candidates:
            qt = q8.quantize(x, code, self.blocksize)
            err = measure_error(x, qt)
            if best is None or err[0] < best_err[0]:
                best, best_err = qt, err
            del qt
        d.rel_l2, d.max_abs = best_err
        if self.max_error is not None and d.rel_l2 > self.max_error:
            d.reason = f"error {d.rel_l2:.2e} > --max-error {self.max_error:g}"
            return x, d
        d.encoding, d.code, d.blocksize = "quantized", best.code.name, self.blocksize
        d.reason = f"Adam {key}" if moment else f"--code {self.code}"
        return best, d

    def _candidates(self, signed: bool) -> tuple[str, ...]:
        return AUTO_CODES[signed] if self.code == "auto" else (self.code,)

    def _exact_reason(self, name: str, x: torch.Tensor, moment: str | None) -> str:
        """Why `x` stays exact, or "" if it is quantized."""
        if not x.is_floating_point():
            return f"{str(x.dtype).removeprefix('torch.')} (not float)"
        if self.lossless:
            return "--lossless"
        if pattern := next((p for p in self.keep if fnmatch.fnmatchcase(name, p)), None):
            return f"--keep {pattern}"
        if x.dtype not in QUANTIZABLE:
            return f"{str(x.dtype).removeprefix('torch.')} (not quantized)"
        if x.numel() < MIN_QUANT_NUMEL:
            return f"small (< {MIN_QUANT_NUMEL} elements)"
        if x.dim() < 2 and moment is None:
            return "1-D (norm/bias)"
        return ""
