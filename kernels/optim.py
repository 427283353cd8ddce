"""Fused 8-bit optimizer updates on the GPU, bit-identical to the CPU path (optim/_native.c).

One pass per tile of whole blocks: decode the 8-bit moments, apply the update rule in
fp32, write the parameter, take the new absmax of each block and requantize, without
materialising fp32 state in memory. Built from the codec blocks of `q8.kernels.quant`
under the same exactness rules (`EXACT` launch, `div_rn`, `sqrt_rn`), so the bytes are
those of the CPU path and of the generic path (`q8.optim.fused.generic_update`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..codec import Code, QTensor
from .blockwise import DTYPES, NUM_WARPS, _check, _grid, _launch_context, device_tables
from .quant import (
    EXACT,
    block_absmax,
    block_offsets,
    dequantize_tile,
    quantize_tile,
    quantize_tile_stochastic,
    round_to,
    to_float32,
)


@triton.jit
def adam_rule(p, g, m, v, beta1, c1, beta2, c2, eps, step_size, bc2_sqrt, decay, l2, bound):
    """One Adam/AdamW step on fp32 values, in the operation order of optim/_native.c.

    Hyperparameters are the binary32 per-step constants of `q8.optim.fused.adam_hyper`:
    l2 != 0 adds Adam's L2 term to the gradient, decay != 1 is AdamW's decoupled decay, and
    the m used in the update is clamped to bound * sqrt(v) (docs/OPTIMIZER_STATE.md). Every
    product and sum rounds on its own (launch with `EXACT`). Returns (p, m, v).
    """
    g = tl.where(l2 != 0.0, g + l2 * p, g)
    m = beta1 * m + c1 * g
    v = beta2 * v + c2 * (g * g)
    s = tl.math.sqrt_rn(v)
    b = bound * s
    mu = tl.where(tl.abs(m) > b, tl.where(m < 0.0, -b, b), m)
    p = tl.where(decay != 1.0, p * decay, p)
    p = p - step_size * tl.math.div_rn(mu, tl.math.div_rn(s, bc2_sqrt) + eps)
    return p, m, v


@triton.jit
def _store_state(codes, absmax, codes_ptr, absmax_ptr, offs, rows, mask, nblocks):
    """Write one moment's new codes and per-block absmax."""
    tl.store(absmax_ptr + rows, absmax, mask=rows < nblocks)
    tl.store(codes_ptr + offs, codes, mask=mask)


@triton.jit
def _adam_kernel(
    p_ptr, g_ptr,
    m_codes_ptr, m_absmax_ptr, m_table_ptr, m_values_ptr, m_tree_ptr, m_zero,
    v_codes_ptr, v_absmax_ptr, v_table_ptr, v_values_ptr, v_tree_ptr, v_zero,
    bad_ptr, row_length, per_row, nblocks,
    beta1, c1, beta2, c2, eps, step_size, bc2_sqrt, decay, l2, bound, key, offset,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs, mask = block_offsets(rows, row_length, per_row, nblocks, BLOCKSIZE)
    row_ok = rows < nblocks
    p = to_float32(tl.load(p_ptr + offs, mask=mask, other=0.0))
    g = to_float32(tl.load(g_ptr + offs, mask=mask, other=0.0))
    m_codes = tl.load(m_codes_ptr + offs, mask=mask, other=0)
    v_codes = tl.load(v_codes_ptr + offs, mask=mask, other=0)
    m = dequantize_tile(m_codes, tl.load(m_absmax_ptr + rows, mask=row_ok, other=0.0), m_table_ptr)
    v = dequantize_tile(v_codes, tl.load(v_absmax_ptr + rows, mask=row_ok, other=0.0), v_table_ptr)

    p, m, v = adam_rule(p, g, m, v, beta1, c1, beta2, c2, eps, step_size, bc2_sqrt, decay, l2, bound)

    tl.store(p_ptr + offs, round_to(p, p_ptr.dtype.element_ty), mask=mask)
    m = tl.where(mask, m, 0.0)  # elements past the end never count towards absmax
    v = tl.where(mask, v, 0.0)
    m_absmax, m_ok = block_absmax(m)
    v_absmax, v_ok = block_absmax(v)
    m_new = quantize_tile(m, m_absmax, m_tree_ptr, m_zero)
    v_new = quantize_tile_stochastic(v, v_absmax, v_values_ptr, v_tree_ptr, v_zero, key, offset + offs)
    _store_state(m_new, m_absmax, m_codes_ptr, m_absmax_ptr, offs, rows, mask, nblocks)
    _store_state(v_new, v_absmax, v_codes_ptr, v_absmax_ptr, offs, rows, mask, nblocks)
    first_bad = tl.min(tl.where(m_ok & v_ok, nblocks, rows))
    tl.atomic_min(bad_ptr, first_bad, mask=first_bad < nblocks)


def _state_args(qt: QTensor, code: Code, name: str, n: int, blocksize: int, row_length: int) -> tuple:
    """A moment for the kernel: decoded with its own table, re-encoded in `code`."""
    if (qt.numel(), qt.blocksize, qt.row_length) != (n, blocksize, row_length):
        raise ValueError(
            f"q8.kernels.adam_update: {name} has {qt.numel()} elements in blocks of {qt.blocksize} "
            f"(rows of {qt.row_length}), expected {n} in blocks of {blocksize} (rows of {row_length})"
        )
    _check(qt.codes, f"{name}.codes", (torch.uint8,))
    _check(qt.absmax, f"{name}.absmax", (torch.float32,))
    _, table = device_tables(qt.code, qt.device)
    tree, values = device_tables(code, qt.device)
    return qt.codes, qt.absmax, table, values, tree, code.zero_index


def adam_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    m: QTensor,
    v: QTensor,
    hyper: Sequence[float],
    key: int = 0,
    offset: int = 0,
    codes: tuple[Code, Code] | None = None,
) -> int:
    """One fused Adam/AdamW step, in place on `p` and the 8-bit moments `m` and `v`.

    Args:
        p: contiguous fp32/fp16/bf16 CUDA parameter (updated in fp32, written back
            rounded to nearest even, as `p.copy_(p32)` would).
        grad: gradient, same numel and device, any of those dtypes (widened exactly).
        m, v: first and second moments, QTensors of `p`'s numel on its device, in the same
            block layout (codes and absmax overwritten).
        hyper: the ten binary32 constants of `q8.optim.fused.adam_hyper`.
        key: the 32-bit stochastic rounding key of v (`q8.codec.rounding_key(seed, step)`).
        offset: global index of `p`'s first element (a shard's start).
        codes: the tables m and v are re-encoded in (default: their own); each is decoded
            with its own table.

    Returns:
        -1, or the first block whose new m or v is not finite (fp32 overflow); the state
        is then invalid, as on the CPU path.
    """
    n, blocksize, row_length = p.numel(), m.blocksize, m.row_length
    for name, t in (("p", p), ("grad", grad)):
        if not t.is_contiguous() or t.numel() != n:
            raise ValueError(f"q8.kernels.adam_update: {name} must be contiguous with {n} elements")
        _check(t.view(-1), name, DTYPES)
    if grad.device != p.device or m.device != p.device or v.device != p.device:
        raise ValueError(
            f"q8.kernels.adam_update: p on {p.device}, grad on {grad.device}, state on {m.device}/{v.device}"
        )
    if len(hyper) != 10:
        raise ValueError(f"q8.kernels.adam_update: hyper must hold 10 values, got {len(hyper)}")
    m_code, v_code = codes if codes is not None else (m.code, v.code)
    m_args = _state_args(m, m_code, "m", n, blocksize, row_length)
    v_args = _state_args(v, v_code, "v", n, blocksize, row_length)
    nblocks = m.absmax.numel()
    if n == 0:
        return -1
    bad = torch.full((1,), nblocks, dtype=torch.int64, device=p.device)
    rows, grid = _grid(nblocks, blocksize)
    with _launch_context(p.device):
        _adam_kernel[grid](
            p, grad, *m_args, *v_args, bad, row_length, -(-row_length // blocksize), nblocks,
            *(float(h) for h in hyper), key & 0xFFFFFFFF, offset,
            BLOCKSIZE=blocksize, ROWS=rows, num_warps=NUM_WARPS, **EXACT,
        )  # fmt: skip
    first_bad = int(bad.item())
    return first_bad if first_bad < nblocks else -1
