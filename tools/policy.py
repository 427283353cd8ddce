"""What q8convert does to each tensor, and the error it measured doing it.

Large floating tensors are quantized blockwise; small ones, 1-D weights (norms, biases),
integer and bool tensors, and the absmax of q8 optimizers' 8-bit state stay exact. Adam
moments get the dynamic tables they were designed for (signed for exp_avg, unsigned for
exp_avg_sq); already-8-bit optimizer state is stored as it is. `--lossless`, `--keep` and
`--max-error` keep tensors exact.

How a tensor is quantized: with a target error (the default, `DEFAULT_TARGET_ERROR`), per
tensor the smallest stored option within it (`search.py`: code table and blocksize;
`--code` and `--blocksize` narrow the options); without one (`--code` or `--blocksize`
given alone), every tensor at one blocksize with the table of lowest error, as q8convert
did before it had targets.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import q8
import torch
from q8.codec import AUTO_CODES, get_code, quantize_best
from q8.codec.blockwise import BLOCKSIZES
from q8.formats import stored_nbytes

from . import search

__all__ = ["DEFAULT_BLOCKSIZE", "DEFAULT_TARGET_ERROR", "MIN_QUANT_NUMEL", "Decision", "Policy"]

MIN_QUANT_NUMEL = 4096
"""Tensors with fewer elements stay exact: their bytes do not matter, their precision might."""

MOMENT_CODES = {"exp_avg": "dynamic", "exp_avg_sq": "udynamic", "max_exp_avg_sq": "udynamic"}
"""Adam state by key: the dynamic table for its sign (Dettmers et al. 2022)."""

QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16)

DEFAULT_TARGET_ERROR = 0.009
"""q8convert's default target (relative L2 per tensor), measured on the models of
benchmarks/convert_quality.py: files 0.6-0.8% smaller than the fixed blocksize-2048
default with every tensor within 0.9%, the overall weight error 3-6% higher (BENCHMARKS.md)."""
DEFAULT_BLOCKSIZE = 2048
"""The blocksize without a target (`--code` alone)."""


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
    rel_l2: float = 0.0  # of what was stored: 0 for an exact tensor
    max_abs: float = 0.0
    refused_rel_l2: float | None = None  # kept exact by --max-error: the error quantizing would have caused
    stored_bytes: int | None = None  # what the file holds for it (after compression, once written)
    target_error: float | None = None
    tried: int = 0  # options the target search measured (0: no search)

    def extra(self) -> dict[str, str]:
        """The per-tensor record kept in the file's index (`q8.Writer.add(extra=...)`)."""
        out = {"q8convert": self.reason}
        if self.encoding == "quantized":
            out |= {"rel_l2": f"{self.rel_l2:.3e}", "max_abs": f"{self.max_abs:.3e}"}
        if self.refused_rel_l2 is not None:
            out["refused_rel_l2"] = f"{self.refused_rel_l2:.3e}"
        if self.tried:
            out |= {"target_error": f"{self.target_error:g}", "options_tried": str(self.tried)}
        return out


def _exact_is_smaller(x: torch.Tensor, nbytes: int) -> bool:
    """Whether `x` stored exactly takes at most `nbytes`: predicted on the search's sample,
    measured on the whole tensor only when the prediction comes within 2%."""
    part = search.sample(x)
    if part is not x and stored_nbytes(part) * x.numel() / part.numel() > 1.02 * nbytes:
        return False
    return stored_nbytes(x) <= nbytes


@dataclass(frozen=True)
class Policy:
    """The command line's choices: see `q8convert --help`.

    `target_error` None: every tensor at `blocksize` (default 2048) with the `code` of
    lowest error. Otherwise the target search over `code`'s tables (all when None or
    "auto") and `blocksize` (all when None); for Adam moments over their dynamic table's
    blocksizes, unless `moments_by_target` is False.
    """

    lossless: bool = False
    blocksize: int | None = None
    code: str | None = None
    keep: tuple[str, ...] = ()
    max_error: float | None = None
    target_error: float | None = DEFAULT_TARGET_ERROR
    moments_by_target: bool = True
    """False: Adam moments keep their dynamic table at `DEFAULT_BLOCKSIZE` whatever the
    target (q8convert's default target is chosen for weights)."""
    lossless_reason: str = "--lossless"
    """Why `lossless` keeps every tensor exact, for the report."""

    def apply(
        self, name: str, x: torch.Tensor, key: str = "", held: set[q8.Code] | None = None
    ) -> tuple[torch.Tensor | q8.QTensor, Decision]:
        """Decide for tensor `name` and produce what is stored: `x` itself or a QTensor.

        `key` is the tensor's key in its parent dict: an Adam moment's key ("exp_avg",
        "exp_avg_sq") picks the moment's dynamic table. `held`: the code tables the
        destination file holds so far (the target search counts a new one's bytes); the
        table chosen is added to it.
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
        why = f"Adam {key}" if moment else f"--code {self.code or 'auto'}"
        if self.target_error is None or (moment and not self.moments_by_target):
            blocksize = self.blocksize or DEFAULT_BLOCKSIZE
            best, err = quantize_best(
                x, [moment] if moment else AUTO_CODES[signed] if self._auto else (self.code,), blocksize
            )
        else:
            tables = [[get_code(moment)]] if moment else search.families(signed, self.code or "auto")
            blocksizes = [self.blocksize] if self.blocksize else BLOCKSIZES
            found = search.search(x, self.target_error, tables, blocksizes, held if held is not None else ())
            best, err = found.qt, found.error
            d.target_error, d.tried = self.target_error, found.tried
            target = f"--target-error {self.target_error:g}"
            if _exact_is_smaller(x, found.cost):  # exact storage is an option too, of error 0
                if found.met:
                    d.reason = f"exact: smaller than any 8-bit option within {target}"
                else:
                    d.reason, d.refused_rel_l2 = f"{target} out of reach, exact is smaller", err.rel_l2
                return x, d
            prefix = f"Adam {key}: " if moment else ""
            why = f"{prefix}smallest within {target}" if found.met else f"{prefix}{target} out of reach: lowest error"
        if self.max_error is not None and err.rel_l2 > self.max_error:  # stored exact: its error is 0
            d.reason, d.refused_rel_l2 = f"8-bit error > --max-error {self.max_error:g}", err.rel_l2
            return x, d
        d.rel_l2, d.max_abs = err.rel_l2, err.max_abs
        d.encoding, d.code, d.blocksize = "quantized", best.code.name, best.blocksize
        d.reason = why
        if d.tried:
            d.stored_bytes = found.nbytes  # measured compressed (a dry run reports it)
        if held is not None:
            held.add(best.code)
        return best, d

    @property
    def _auto(self) -> bool:
        return self.code in (None, "auto")

    def _exact_reason(self, name: str, x: torch.Tensor, moment: str | None) -> str:
        """Why `x` stays exact, or "" if it is quantized."""
        if not x.is_floating_point():
            return f"{str(x.dtype).removeprefix('torch.')} (not float)"
        if self.lossless:
            return self.lossless_reason
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
