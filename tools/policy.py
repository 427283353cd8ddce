"""What q8convert does to each tensor, and the error it measured doing it.

Large floating tensors are quantized blockwise; small ones, 1-D weights (norms, biases),
integer and bool tensors, and the absmax of q8 optimizers' 8-bit state stay exact. Adam
moments get the dynamic tables they were designed for (signed for exp_avg, unsigned for
exp_avg_sq); already-8-bit optimizer state is stored as it is. `--lossless`, `--keep` and
`--max-error` keep tensors exact.

How a tensor is quantized: per tensor the smallest stored option within a target error
(`search.py`: code table and blocksize; `--code` and `--blocksize` narrow the options).
The target is `--target-error E` for every tensor alike, or the tensor's share of a model
error (`--model-error E`): the relative L2 error of all the weights together,
sqrt(sum ||w - w'||^2 / sum ||w||^2). The default, `--model-error auto`, is the model
error that the fixed encoding of q8convert before targets (one blocksize, 2048, the table
of lower error: `--code auto`) gives this model: a file as accurate as that one overall,
its error spent where it buys the most bytes. Without a target (`--code` or `--blocksize`
given alone), that fixed encoding.

The shares. An entropy-coded quantizer's size falls by half a bit per element each time
its mean squared error per element doubles, whatever the tensor; so the smallest file for
a model error gives every element the same squared error (reverse water-filling): a
tensor of root mean square `rms` the relative error E * rms_model / rms. What the model
computes does not follow the weights' norm that closely (benchmarks/convert_quality.py:
the output projections, of small weights, move the hidden states more per unit of weight
error than the others), so the shares go halfway: relative errors proportional to
1 / sqrt(rms) (`SHARE_EXPONENT`), scaled so that the model error is E, none above
`MAX_SHARE` * E. The model's figures (each tensor's size and rms, for auto its error
under the fixed encoding) come from the search's sample of each tensor, read before the
conversion: it still streams tensor by tensor.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import q8
import torch
from q8.codec import AUTO_CODES, get_code, quantize_best
from q8.codec.blockwise import BLOCKSIZES
from q8.formats import stored_nbytes

from . import search

__all__ = ["DEFAULT_BLOCKSIZE", "MAX_SHARE", "MIN_QUANT_NUMEL", "SHARE_EXPONENT", "Decision", "Policy"]

MIN_QUANT_NUMEL = 4096
"""Tensors with fewer elements stay exact: their bytes do not matter, their precision might."""

MOMENT_CODES = {"exp_avg": "dynamic", "exp_avg_sq": "udynamic", "max_exp_avg_sq": "udynamic"}
"""Adam state by key: the dynamic table for its sign (Dettmers et al. 2022)."""

QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16)

MAX_SHARE = 2.0
"""The largest relative error a tensor's share of a model error may be, in units of it."""
SHARE_EXPONENT = 0.5
"""A tensor's share of a model error is proportional to rms ** -SHARE_EXPONENT: 0 would be
the same relative error for every tensor, 1 the same squared error per element."""
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
    target_error: float | None = None  # the tensor's target: --target-error, or its share of --model-error
    model_error: float | None = None  # the model error (auto: as measured) whose share the target is
    norm: float = 0.0  # L2 norm of the tensor, where a model error covers it (the report sums them)
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
        if self.model_error is not None:
            out["model_error"] = f"{self.model_error:g}"
        return out


def _norm(x: torch.Tensor, chunk: int = 1 << 16) -> float:
    """||x||, summed over the fp32 norms of chunks: a relative error about 1e-7, at 1/15 of
    the cost of float64; fp16/bf16 widened a chunk at a time (q8convert's memory bound)."""
    flat = x.detach().reshape(-1)
    parts = (torch.linalg.vector_norm(flat[i : i + chunk].float()) for i in range(0, flat.numel(), chunk))
    return math.sqrt(sum(float(n) ** 2 for n in parts))


def _fixed_error(x: torch.Tensor) -> float:
    """The relative L2 error of `x` under the fixed encoding (`--code auto`, blocksize 2048)."""
    return quantize_best(x, AUTO_CODES[bool(x.min() < 0)], DEFAULT_BLOCKSIZE)[1].rel_l2


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

    A target (`target_error` for every tensor, or its share of `model_error`): the target
    search over `code`'s tables (all when None or "auto") and `blocksize` (all when None);
    Adam moments over their dynamic table's blocksizes with `target_error`, at
    `DEFAULT_BLOCKSIZE` otherwise. No target: every tensor at `blocksize` (default 2048)
    with the `code` of lowest error. A model error needs `for_model` to know the model.
    """

    lossless: bool = False
    blocksize: int | None = None
    code: str | None = None
    keep: tuple[str, ...] = ()
    max_error: float | None = None
    target_error: float | None = None
    model_error: float | str | None = "auto"
    """The weights' error all together, or "auto": the one the fixed encoding gives them."""
    lossless_reason: str = "--lossless"
    """Why `lossless` keeps every tensor exact, for the report."""
    share_scale: float | None = None
    model_target: float | None = None
    """Set by `for_model`: a tensor's share is `share_scale` * rms ** -SHARE_EXPONENT, and
    `model_target` the model error (auto: measured). None: each tensor is a model of its own."""

    def for_model(self, samples: Iterable[tuple[int, torch.Tensor]]) -> Policy:
        """This policy with the shares of its model error fitted to the tensors of one
        model: for each tensor it quantizes by a model error (`covers`), its number of
        elements and its sample (`search.sample`). Without a model error, the policy itself."""
        if self.model_error is None or self.target_error is not None:
            return self
        numel, square, weighted, error = 0, 0.0, 0.0, 0.0
        for n, part in samples:
            mean_square = float(part.detach().double().square().mean()) if part.numel() else 0.0
            if not (math.isfinite(mean_square) and mean_square > 0):  # NaN/inf: stays exact; zeros: no error
                continue
            numel, square = numel + n, square + n * mean_square
            weighted += n * mean_square ** (1 - SHARE_EXPONENT)  # sum of ||w||^2 * share^2 / scale^2
            if self.model_error == "auto":
                error += n * mean_square * _fixed_error(part) ** 2
        if not numel:
            return self
        target = math.sqrt(error / square) if self.model_error == "auto" else self.model_error
        return replace(self, share_scale=target * math.sqrt(square / weighted), model_target=target)

    def covers(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], key: str = "") -> bool:
        """Whether a model error covers this tensor: one the search quantizes, not an Adam moment."""
        return key not in MOMENT_CODES and not self._exact_reason(name, dtype, shape, None)

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
        d.reason = self._exact_reason(name, x.dtype, tuple(x.shape), moment)
        if d.reason:
            return x, d
        lo, hi = (float(v) for v in torch.aminmax(x))  # one pass: NaN and inf propagate, and the sign
        if not (math.isfinite(lo) and math.isfinite(hi)):
            d.reason = "has NaN/inf"
            return x, d
        signed = lo < 0
        why = f"Adam {key}" if moment else f"--code {self.code or 'auto'}"
        target = self.target_error if self.target_error is not None or moment else self._share(x, d)
        if target is None:
            blocksize = self.blocksize or DEFAULT_BLOCKSIZE
            best, err = quantize_best(
                x, [moment] if moment else AUTO_CODES[signed] if self._auto else (self.code,), blocksize
            )
        else:
            tables = [[get_code(moment)]] if moment else search.families(signed, self.code or "auto")
            blocksizes = [self.blocksize] if self.blocksize else BLOCKSIZES
            found = search.search(x, target, tables, blocksizes, held if held is not None else ())
            best, err = found.qt, found.error
            d.target_error, d.tried = target, found.tried
            label = f"--target-error {target:g}"
            if d.model_error is not None:
                label = f"its share of --model-error {self.model_label}"
            if _exact_is_smaller(x, found.cost):  # exact storage is an option too, of error 0
                if found.met:
                    d.reason = f"exact: smaller than any 8-bit option within {label}"
                else:
                    d.reason, d.refused_rel_l2 = f"{label} out of reach, exact is smaller", err.rel_l2
                return x, d
            prefix = f"Adam {key}: " if moment else ""
            why = f"{prefix}smallest within {label}" if found.met else f"{prefix}{label} out of reach: lowest error"
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

    def _share(self, x: torch.Tensor, d: Decision) -> float | None:
        """The relative error of `x`'s share of the model error (recorded in `d`), or None
        without a model error."""
        if self.model_error is None:
            return None
        d.norm = _norm(x)
        if self.share_scale is None:  # no model fitted: the tensor is a model of its own
            d.model_error = _fixed_error(x) if self.model_error == "auto" else self.model_error
            return d.model_error
        d.model_error = self.model_target
        rms = d.norm / math.sqrt(x.numel())
        share = self.share_scale * rms**-SHARE_EXPONENT if rms else self.model_target
        return min(share, MAX_SHARE * self.model_target)

    @property
    def model_label(self) -> str:
        """`--model-error` as given: "auto" or the number."""
        return self.model_error if isinstance(self.model_error, str) else f"{self.model_error:g}"

    @property
    def _auto(self) -> bool:
        return self.code in (None, "auto")

    def _exact_reason(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], moment: str | None) -> str:
        """Why a tensor stays exact, or "" if it is quantized."""
        if not dtype.is_floating_point:
            return f"{str(dtype).removeprefix('torch.')} (not float)"
        if self.lossless:
            return self.lossless_reason
        if pattern := next((p for p in self.keep if fnmatch.fnmatchcase(name, p)), None):
            return f"--keep {pattern}"
        if dtype not in QUANTIZABLE:
            return f"{str(dtype).removeprefix('torch.')} (not quantized)"
        if math.prod(shape) < MIN_QUANT_NUMEL:
            return f"small (< {MIN_QUANT_NUMEL} elements)"
        if len(shape) < 2 and moment is None:
            return "1-D (norm/bias)"
        if name.endswith(".absmax"):
            return "absmax of 8-bit state"  # a q8 optimizer's scales: quantizing them would round its state again
        return ""
