"""Fused 8-bit optimizer steps on the GPU, bit-identical to the CPU path (optim/_native.c).

One kernel, `_step_kernel`, is the skeleton every optimizer shares: per tile of whole
blocks it loads the parameter and the gradient, decodes the state slots, applies the
optimizer's rule, writes the parameter, takes each slot's new absmax and encodes it, without
materialising fp32 state in memory. An optimizer contributes only its rule, a `@triton.jit`
function `<name>_rule` passed to the kernel (the same name as its C form in optim/_native.c;
the torch reference is its class's `update`), built from the codec blocks of
`q8.kernels.quant` under the same exactness rules (`EXACT` launch, `div_rn`, `sqrt_rn`).

Nothing is read back to the host. The kernel reads from device memory whether the
parameter's gradient is finite (else it writes nothing and counts a skipped parameter in
`report`) and the step count t (the update is step t + 1; the caller increments the count
afterwards). Rules derive their step-dependent constants (bias corrections, the update
bound) from t in binary64 with the operations of the Python `hyper` (`powi`,
`moment_bound`), so replaying a captured CUDA graph step after step stays exact; their
other constants h (binary32) and d = (lr, beta1, beta2, lr_decay) (binary64, passed as bits)
are kernel arguments. A state that overflows fp32 is counted in `report` too.
"""

from __future__ import annotations

import struct
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
    mix32,
    quantize_tile,
    quantize_tile_stochastic,
    round_to,
    to_float32,
)

FLT_MAX = tl.constexpr(3.4028234663852886e38)
SLOT_KINDS = {"absent": 0, "fp32": 1, "nearest": 2, "stochastic": 3}
REPORT = ("skipped", "overflowed blocks", "last overflowed parameter")
"""The int64 counters of a report tensor, in order."""


# ---- step-dependent constants, in binary64 (the operations of q8.optim.fused) -----------------


@triton.jit
def powi(x, n):
    """x**n by binary exponentiation (q8.optim.fused.powi): fp64 x, int64 n >= 0."""
    result = x * 0.0 + 1.0
    while n > 0:
        result = tl.where((n & 1) != 0, result * x, result)
        x = x * x
        n = n >> 1
    return result


@triton.jit
def moment_bound(beta1, beta2, t):
    """q8.optim.fused.moment_bound(betas, t) in binary64, before the cast to binary32."""
    r = beta1 * beta1 / tl.where(beta2 == 0.0, 1.0, beta2)
    series = tl.where(r == 1.0, t.to(tl.float64), (powi(r, t) - 1.0) / tl.where(r == 1.0, 2.0, r - 1.0))
    first = (beta1 == 0.0) | (t == 1)
    terms = tl.where(beta2 == 0.0, tl.where(first, 1.0, float("inf")), series)
    return tl.minimum((1.0 - beta1) * tl.sqrt(terms / (1.0 - beta2)) * 1.001, FLT_MAX)


# ---- the rules: fp32 tiles p, g and the slots a, b, c -> new p, a, b, c -------------------------
# h: the rule's binary32 constants (its class's `hyper`); t: the step number (int64); d: lr,
# beta1, beta2, lr_decay in binary64; trust: LAMB's / LARS's trust ratio (1 otherwise).


@triton.jit
def adam_rule(p, g, a, b, c, h, t, d, trust):
    """Adam / AdamW (optim/_native.c, adam_rule). Slots: m, v."""
    step_size = (d[0] / (1.0 - powi(d[1], t))).to(tl.float32)
    bc2_sqrt = tl.sqrt(1.0 - powi(d[2], t)).to(tl.float32)
    bound = moment_bound(d[1], d[2], t).to(tl.float32)
    g = tl.where(h[8] != 0.0, g + h[8] * p, g)
    m = h[0] * a + h[1] * g
    v = h[2] * b + h[3] * (g * g)
    s = tl.math.sqrt_rn(v)
    k = bound * s
    mu = tl.where(tl.abs(m) > k, tl.where(m < 0.0, -k, k), m)
    p = tl.where(h[7] != 1.0, p * h[7], p)
    p = p - step_size * tl.math.div_rn(mu, tl.math.div_rn(s, bc2_sqrt) + h[4])
    return p, m, v, c


@triton.jit
def sgd_rule(p, g, a, b, c, h, t, d, trust):
    """SGD, and LARS with its trust ratio (optim/_native.c, sgd_rule). Slot: the momentum buffer."""
    x = tl.where(h[0] != 0.0, g + p * h[0], g)
    x = x * trust
    buf = tl.where(t == 1, x, a * h[1] + x * h[2])
    x = tl.where(h[1] != 0.0, tl.where(h[5] != 0.0, x + buf * h[1], buf), x)
    return p - x * h[3], buf, b, c


@triton.jit
def lion_rule(p, g, a, b, c, h, t, d, trust):
    """Lion (optim/_native.c, lion_rule). Slot: m."""
    u = a * h[0] + g * h[1]
    direction = tl.where(u > 0.0, 1.0, tl.where(u < 0.0, -1.0, 0.0))
    p = tl.where(h[5] != 1.0, p * h[5], p)
    return p - direction * h[4], a * h[2] + g * h[3], b, c


@triton.jit
def rmsprop_rule(p, g, a, b, c, h, t, d, trust):
    """RMSprop (optim/_native.c, rmsprop_rule). Slots: square_avg, momentum_buffer, grad_avg."""
    g = tl.where(h[3] != 0.0, g + p * h[3], g)
    sq = a * h[0] + (g * g) * h[1]
    ga = c * h[0] + g * h[1]
    var = sq - ga * ga
    var = tl.where(h[6] != 0.0, tl.where(var < 0.0, 0.0, var), sq)
    step = tl.math.div_rn(g, tl.math.sqrt_rn(var) + h[2])
    buf = b * h[5] + step
    return p - tl.where(h[5] > 0.0, buf, step) * h[4], sq, buf, ga


@triton.jit
def adagrad_rule(p, g, a, b, c, h, t, d, trust):
    """Adagrad (optim/_native.c, adagrad_rule). Slot: sum."""
    clr = (d[0] / (1.0 + (t - 1).to(tl.float64) * d[3])).to(tl.float32)
    g = tl.where(h[0] != 0.0, g + p * h[0], g)
    s = a + g * g
    return p - tl.math.div_rn(g, tl.math.sqrt_rn(s) + h[2]) * clr, s, b, c


@triton.jit
def lamb_direction(p, g, a, b, h, t, d):
    """LAMB's bounded, bias-corrected direction r and new moments (optim/_native.c)."""
    bc1 = (1.0 - powi(d[1], t)).to(tl.float32)
    bc2 = (1.0 - powi(d[2], t)).to(tl.float32)
    bound = moment_bound(d[1], d[2], t).to(tl.float32)
    m = a * h[0] + g * h[1]
    v = b * h[2] + (g * g) * h[3]
    k = tl.math.sqrt_rn(v) * bound
    mu = tl.where(tl.abs(m) > k, tl.where(m < 0.0, -k, k), m)
    r = tl.math.div_rn(tl.math.div_rn(mu, bc1), tl.math.sqrt_rn(tl.math.div_rn(v, bc2)) + h[4])
    return tl.where(h[5] != 0.0, r + p * h[5], r), m, v


@triton.jit
def lamb_rule(p, g, a, b, c, h, t, d, trust):
    """LAMB (optim/_native.c, lamb_rule). Slots: m, v."""
    r, m, v = lamb_direction(p, g, a, b, h, t, d)
    return p - r * (trust * h[9]), m, v, c


@triton.jit
def lamb_terms(p, g, a, b, c, h, t, d):
    """The norm input besides p (optim/_native.c, lamb_terms): the direction r."""
    r, _, _ = lamb_direction(p, g, a, b, h, t, d)
    return r


RULES = {
    "adam": adam_rule,
    "sgd": sgd_rule,
    "lars": sgd_rule,
    "lion": lion_rule,
    "rmsprop": rmsprop_rule,
    "adagrad": adagrad_rule,
    "lamb": lamb_rule,
}
"""Each fused rule by the name its optimizer gives (`Optimizer8bit.rule`)."""
TERMS = {"lamb": lamb_terms}
"""Rules whose trust ratio needs the norm of a tensor computed from the state: that tensor.
(LARS's is the gradient itself.)"""


# ---- the shared skeleton ---------------------------------------------------------------------


@triton.jit
def _load_slot(KIND: tl.constexpr, data_ptr, absmax_ptr, table_ptr, offs, rows, mask, row_ok):
    """A slot's fp32 tile: fp32 state, 8-bit state decoded with its own table, or zeros."""
    if KIND == 1:
        return tl.load(data_ptr + offs, mask=mask, other=0.0)
    elif KIND >= 2:
        codes = tl.load(data_ptr + offs, mask=mask, other=0)
        return dequantize_tile(codes, tl.load(absmax_ptr + rows, mask=row_ok, other=0.0), table_ptr)
    else:
        return tl.zeros(offs.shape, tl.float32)


@triton.jit
def _store_slot(
    KIND: tl.constexpr, x, data_ptr, absmax_ptr, tree_ptr, values_ptr, zero, offs, rows, mask, row_ok, key, index
):
    """Write a slot's new values (8-bit: absmax and codes); returns the number of blocks that
    are not finite (8-bit state only: fp32 overflow)."""
    if KIND == 1:
        tl.store(data_ptr + offs, x, mask=mask)
        return tl.full([], 0, tl.int32)
    elif KIND >= 2:
        x = tl.where(mask, x, 0.0)  # elements past the end never count towards absmax
        absmax, finite = block_absmax(x)
        if KIND == 2:
            codes = quantize_tile(x, absmax, tree_ptr, zero)
        else:
            codes = quantize_tile_stochastic(x, absmax, values_ptr, tree_ptr, zero, key, index)
        tl.store(absmax_ptr + rows, absmax, mask=row_ok)
        tl.store(data_ptr + offs, codes, mask=mask)
        return tl.sum((row_ok & ~finite).to(tl.int32))
    else:
        return tl.full([], 0, tl.int32)


@triton.jit(do_not_specialize=["lr_bits", "beta1_bits", "beta2_bits", "lr_decay_bits", "seed", "offset", "param"])
def _step_kernel(
    p_ptr, g_ptr, ok_ptr, step_ptr, report_ptr,
    a_ptr, a_absmax, a_table, a_tree, a_values, a_zero,
    b_ptr, b_absmax, b_table, b_tree, b_values, b_zero,
    c_ptr, c_absmax, c_table, c_tree, c_values, c_zero,
    row_length, per_row, nblocks, offset, seed, param,
    h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11,
    lr_bits, beta1_bits, beta2_bits, lr_decay_bits, trust_ptr, out_ptr,
    RULE: tl.constexpr, KIND_A: tl.constexpr, KIND_B: tl.constexpr, KIND_C: tl.constexpr,
    NEGATE: tl.constexpr, TERMS: tl.constexpr, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """The step of RULE on one parameter; with TERMS, RULE is a norm-input function and the
    kernel only writes its values to out_ptr (fp32), changing nothing."""
    pid = tl.program_id(0)
    if TERMS or tl.load(ok_ptr) != 0:
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs, mask = block_offsets(rows, row_length, per_row, nblocks, BLOCKSIZE)
        row_ok = rows < nblocks
        t = tl.load(step_ptr) + 1
        key = mix32(seed.to(tl.uint32) ^ mix32((t & 0xFFFFFFFF).to(tl.uint32)))
        p = to_float32(tl.load(p_ptr + offs, mask=mask, other=0.0))
        g = to_float32(tl.load(g_ptr + offs, mask=mask, other=0.0))
        if NEGATE:
            g = -g
        a = _load_slot(KIND_A, a_ptr, a_absmax, a_table, offs, rows, mask, row_ok)
        b = _load_slot(KIND_B, b_ptr, b_absmax, b_table, offs, rows, mask, row_ok)
        c = _load_slot(KIND_C, c_ptr, c_absmax, c_table, offs, rows, mask, row_ok)
        h = (h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11)
        d = (
            lr_bits.to(tl.int64).to(tl.float64, bitcast=True),
            beta1_bits.to(tl.int64).to(tl.float64, bitcast=True),
            beta2_bits.to(tl.int64).to(tl.float64, bitcast=True),
            lr_decay_bits.to(tl.int64).to(tl.float64, bitcast=True),
        )
        if TERMS:
            tl.store(out_ptr + offs, RULE(p, g, a, b, c, h, t, d), mask=mask)
        else:
            p, a, b, c = RULE(p, g, a, b, c, h, t, d, tl.load(trust_ptr))
            tl.store(p_ptr + offs, round_to(p, p_ptr.dtype.element_ty), mask=mask)
            index = offset + offs
            bad = _store_slot(
                KIND_A, a, a_ptr, a_absmax, a_tree, a_values, a_zero, offs, rows, mask, row_ok, key, index
            )
            bad += _store_slot(
                KIND_B, b, b_ptr, b_absmax, b_tree, b_values, b_zero, offs, rows, mask, row_ok, key, index
            )
            bad += _store_slot(
                KIND_C, c, c_ptr, c_absmax, c_tree, c_values, c_zero, offs, rows, mask, row_ok, key, index
            )
            tl.atomic_add(report_ptr + 1, bad.to(tl.int64), mask=bad > 0)
            tl.atomic_max(report_ptr + 2, param.to(tl.int64), mask=bad > 0)
    else:
        tl.atomic_add(report_ptr, 1, mask=pid == 0)


# ---- the host side ---------------------------------------------------------------------------


def double_bits(x: float) -> int:
    """A binary64 value as the signed int64 of its bits (how the kernel receives d)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _slot_args(entry, target: Code | None, like: torch.Tensor) -> tuple[int, tuple]:
    """(kind, the six kernel arguments) of one slot: absent, fp32 state, or 8-bit state decoded
    with its own table and encoded in `target` (nearest if signed, else stochastic)."""
    if entry is None:
        return SLOT_KINDS["absent"], (like, like, like, like, like, 0)
    if not isinstance(entry, QTensor):
        return SLOT_KINDS["fp32"], (entry, like, like, like, like, 0)
    _, table = device_tables(entry.code, entry.device)
    tree, values = device_tables(target, entry.device)
    kind = SLOT_KINDS["nearest" if target.signed else "stochastic"]
    return kind, (entry.codes, entry.absmax, table, tree, values, target.zero_index)


def step(
    rule: str,
    p: torch.Tensor,
    grad: torch.Tensor,
    slots: Sequence,
    codes: Sequence[Code | None],
    hyper: Sequence[float],
    doubles: Sequence[float],
    *,
    ok: torch.Tensor,
    step_count: torch.Tensor,
    report: torch.Tensor,
    seed: int,
    offset: int = 0,
    param: int = 0,
    trust: torch.Tensor,
    negate: bool = False,
    layout: tuple[int, int],
    terms: torch.Tensor | None = None,
) -> None:
    """One fused step of `rule` on parameter `p` and its state slots, in place, one launch and
    no host-device synchronization.

    Args:
        rule: a name in `RULES`.
        p: contiguous fp32/fp16/bf16 parameter (updated in fp32, written back rounded to
            nearest even); grad: its gradient, same numel and device, any of those dtypes.
        slots: three state entries in the rule's order: None, an fp32 tensor like `p`, or a
            QTensor of `p`'s numel in the block layout `layout`.
        codes: the table each 8-bit slot is encoded in (None for the others).
        hyper: the rule's binary32 constants (at most 12); doubles: (lr, beta1, beta2,
            lr_decay) in binary64, from which the rule derives its step-dependent constants.
        ok: int64 0-d tensor on the device, 0 to skip the parameter (a non-finite gradient).
        step_count: int64 0-d tensor on the device: the steps taken (this is step + 1; the
            caller increments it).
        report: int64 [3] tensor on the device (`REPORT`): skips and overflows are counted there.
        seed, offset: the stochastic rounding's seed and the global index of p's first element.
        param: the parameter's index, recorded in the report if its state overflows.
        trust: fp32 0-d tensor on the device: LAMB's / LARS's trust ratio (1 for the others).
        negate: maximize (the gradient negated).
        layout: (row_length, blocksize) of the 8-bit slots (of blocks of the fp32 state).
        terms: an fp32 tensor like `p`: instead of a step, write the rule's norm input
            (`TERMS`) there, changing nothing else.
    """
    n = p.numel()
    for name, t in (("p", p), ("grad", grad)):
        if not t.is_contiguous() or t.numel() != n:
            raise ValueError(f"q8.kernels.step: {name} must be contiguous with {n} elements")
        _check(t.view(-1), name, DTYPES)
    if grad.device != p.device:
        raise ValueError(f"q8.kernels.step: p on {p.device}, grad on {grad.device}")
    if len(slots) != 3 or len(hyper) > 12 or len(doubles) != 4:
        raise ValueError("q8.kernels.step: three slots, at most 12 constants and 4 doubles")
    if n == 0:  # an empty parameter (an FSDP2 rank's empty shard): nothing to update
        return
    row_length, blocksize = layout
    args = []
    kinds = []
    for i, (entry, code) in enumerate(zip(slots, codes, strict=True)):
        if isinstance(entry, QTensor) and (entry.numel(), entry.blocksize, entry.row_length) != (n, *layout[::-1]):
            raise ValueError(
                f"q8.kernels.step: slot {i} has {entry.numel()} elements in blocks of {entry.blocksize} "
                f"(rows of {entry.row_length}), expected {n} in blocks of {blocksize} (rows of {row_length})"
            )
        kind, slot = _slot_args(entry, code, p)
        kinds.append(kind)
        args += slot
    nblocks = n // row_length * -(-row_length // blocksize)
    rows, grid = _grid(nblocks, blocksize)
    h = [float(x) for x in hyper] + [0.0] * (12 - len(hyper))
    with _launch_context(p.device):
        _step_kernel[grid](
            p, grad, ok, step_count, report, *args,
            row_length, -(-row_length // blocksize), nblocks, offset, seed & 0xFFFFFFFF, param,
            *h, *map(double_bits, doubles), trust, p if terms is None else terms,
            RULE=RULES[rule] if terms is None else TERMS[rule], KIND_A=kinds[0], KIND_B=kinds[1], KIND_C=kinds[2],
            NEGATE=bool(negate), TERMS=terms is not None, BLOCKSIZE=blocksize, ROWS=rows, num_warps=NUM_WARPS,
            **EXACT,
        )  # fmt: skip
