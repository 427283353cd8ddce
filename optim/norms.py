"""Exact L2 norms whose bits do not depend on summation order, sharding or backend.

LAMB and LARS scale each parameter's step by a ratio of whole-parameter norms. Summing
squares in floating point gives bits that depend on the order of the additions, so a
parameter split over N ranks (partial sums, then an all-reduce) would train differently
from one process. Here the sum is exact, in integers, and integer addition is associative.
The rule (docs/OPTIMIZER_STATE.md, "Exact norms"; a C or Triton version must follow it):

1. M = max |x| over the whole tensor (all ranks: an all-reduce MAX, exact). If M is 0,
   inf or NaN, the norm is M.
2. With M = f * 2**e (0.5 <= f < 1, `frexp`), s = 2**(62 - 2e), so x * x * s < 2**62.
3. Each term t = floor(x * x * s), computed in binary64 (x * x is exact for binary32 x
   and the scaling by a power of two is exact) and truncated to an int64; split
   t = hi * 2**31 + lo (0 <= lo < 2**31) and sum all hi and all lo in int64 (exact for
   fewer than 2**32 elements; all ranks: an all-reduce SUM).
4. norm = binary32(sqrt((binary64(hi_sum) * 2**31 + binary64(lo_sum)) / s)), every
   binary64 operation rounded to nearest even: the conversions, the addition, the square
   root (the scalings are exact).

Each term loses less than 1 of at least 2**60 (the largest), so the relative error of the
sum is below n * 2**-60 for n elements, far finer than fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .fused import f32

__all__ = ["exact_norms"]

_SHIFT = 31
_CHUNK = 1 << 20  # elements per step: bounded binary64/int64 temporaries


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| as an fp32 0-d tensor (0 for no elements), without a copy of |x|."""
    if not x.numel():
        return torch.zeros((), device=x.device)
    lo, hi = torch.aminmax(x.detach())
    return torch.maximum(-lo, hi).float()


def _square_sums(x: torch.Tensor, scale: float) -> torch.Tensor:
    """int64 [hi_sum, lo_sum] of the scaled, truncated squares of `x` (rule steps 2-3), a
    chunk at a time in reused buffers."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    square = torch.empty(min(n, _CHUNK), dtype=torch.float64, device=x.device)
    term, part = (
        torch.empty(square.shape, dtype=torch.int64, device=x.device),
        torch.empty_like(square, dtype=torch.int64),
    )
    sums = torch.zeros(2, dtype=torch.int64, device=x.device)
    for a in range(0, n, _CHUNK):
        m = min(_CHUNK, n - a)
        s = square[:m].copy_(flat[a : a + m])
        t = term[:m].copy_(s.mul_(s).mul_(scale))  # the copy truncates
        sums[1] += torch.bitwise_and(t, (1 << _SHIFT) - 1, out=part[:m]).sum()
        sums[0] += t.bitwise_right_shift_(_SHIFT).sum()
    return sums


def exact_norms(tensors: Sequence[torch.Tensor], group=None) -> list[torch.Tensor]:
    """The L2 norm of each tensor (fp32 0-d tensors), bit for bit the same however the
    elements are ordered or split: with `group` (a process group), each tensor is this
    rank's shard and the norm is the whole tensor's, from one MAX and one SUM all-reduce
    for all the tensors together.

    Example:
        >>> p_norm, g_norm = exact_norms([p, grad])
    """
    import torch.distributed as dist

    device = tensors[0].device
    maxes = torch.stack([_abs_max(x) for x in tensors])
    if group is not None:
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    scales = []
    for m in maxes.tolist():
        scales.append(math.ldexp(1.0, 62 - 2 * math.frexp(m)[1]) if m and math.isfinite(m) else None)
    zero = torch.zeros(2, dtype=torch.int64, device=device)
    sums = torch.stack([_square_sums(x, s) if s else zero for x, s in zip(tensors, scales, strict=True)])
    if group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    norms = []
    for m, s, (hi, lo) in zip(maxes.tolist(), scales, sums.tolist(), strict=True):
        value = m if s is None else f32(math.sqrt((float(hi) * 2.0**_SHIFT + float(lo)) / s))
        norms.append(torch.tensor(value, dtype=torch.float32, device=device))
    return norms
