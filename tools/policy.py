"""What q8convert does to each tensor, and the error it measured doing it.

Large floating tensors are quantized blockwise; small ones, 1-D weights (norms, biases),
integer and bool tensors, and the absmax of q8 optimizers' 8-bit state stay exact. Adam
moments get the dynamic tables they were designed for (signed for exp_avg, unsigned for
exp_avg_sq); already-8-bit optimizer state is stored as it is. `--lossless`, `--keep` and
`--max-error` keep tensors exact.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import q8
import torch
from q8.codec import AUTO_CODES, quantize_best

__all__ = ["MIN_QUANT_NUMEL", "Decision", "Policy"]

MIN_QUANT_NUMEL = 4096
"""Tensors with fewer elements stay exact: their bytes do not matter, their precision might."""

MOMENT_CODES = {"exp_avg": "dynamic", "exp_avg_sq": "udynamic", "max_exp_avg_sq": "udynamic"}
"""Adam state by key: the dynamic table for its sign (Dettmers et al. 2022)."""

QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16)


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
        best, err = quantize_best(x, candidates, self.blocksize)
        d.rel_l2, d.max_abs = err.rel_l2, err.max_abs
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
        if name.endswith(".absmax"):
            return "absmax of 8-bit state"  # a q8 optimizer's scales: quantizing them would round its state again
        return ""
