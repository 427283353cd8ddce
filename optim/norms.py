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

import struct
from collections.abc import Sequence

import torch

__all__ = ["exact_norms", "norm_scales", "norms_from_sums"]

_SHIFT = 31
_CHUNK = 1 << 20  # elements per step: bounded binary64/int64 temporaries


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| as an fp32 0-d tensor (0 for no elements), without a copy of |x|."""
    if not x.numel():
        return torch.zeros((), device=x.device)
    lo, hi = torch.aminmax(x.detach())
    return torch.maximum(-lo, hi).float()


def _square_sums(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int64 [hi_sum, lo_sum] of the scaled, truncated squares of `x` (rule steps 2-3; a
    0-d binary64 `scale`, 0 gives 0), a chunk at a time in reused buffers."""
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


def f32(x: float) -> float:
    """`x` rounded to the nearest binary32 value (kept as a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def norm_scales(maxes: torch.Tensor) -> torch.Tensor:
    """Step 2 for each max |x| (fp32): the binary64 power of two s, built from its bits
    (exact); 0 where the max is 0, inf or NaN (the norm is then the max itself)."""
    m = maxes.double()
    ok = torch.isfinite(m) & (m != 0)
    exponent = torch.frexp(torch.where(ok, m, 1.0)).exponent.long()
    return torch.where(ok, ((1023 + 62 - 2 * exponent) << 52).view(torch.float64), 0.0)


def norms_from_sums(maxes: torch.Tensor, scales: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Step 4: the norms (fp32) from the maxes, the scales and the int64 sums (..., 2)."""
    total = sums[..., 0].double() * 2.0**_SHIFT + sums[..., 1].double()
    value = (total / torch.where(scales == 0, 1.0, scales)).sqrt().float()
    return torch.where(scales == 0, maxes.float(), value)


def exact_norms(tensors: Sequence[torch.Tensor], group=None) -> list[torch.Tensor]:
    """The L2 norm of each tensor (fp32 0-d tensors), bit for bit the same however the
    elements are ordered or split: with `group` (a process group), each tensor is this
    rank's shard and the norm is the whole tensor's, from one MAX and one SUM all-reduce
    for all the tensors together. Tensor operations only: no host-device synchronization.

    Example:
        >>> p_norm, g_norm = exact_norms([p, grad])
    """
    import torch.distributed as dist

    maxes = torch.stack([_abs_max(x) for x in tensors])
    if group is not None:
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    scales = norm_scales(maxes)
    sums = torch.stack([_square_sums(x, s) for x, s in zip(tensors, scales, strict=True)])
    if group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return list(norms_from_sums(maxes, scales, sums).unbind())
