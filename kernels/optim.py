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

Two launches share the skeleton (`_step_tile`): `step`, one parameter whose tensors are kernel
arguments, and `batched_step`, many small parameters in one launch: their addresses, block
layouts and seeds are int64 rows of a table in device memory (`FIELDS`), cast to typed
pointers in the kernel, and each program finds its parameter and its tile in a second table.
Members of one launch share what is compiled in (parameter and gradient dtypes, slot
storage, blocksize; rule and constants are their group's). The tables are copied to the
device only when the members' tensors change (`BatchTables`), so steady steps copy nothing
and a CUDA graph captured then replays them.
"""

from __future__ import annotations

import dataclasses
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


@triton.jit
def _step_tile(
    p_ptr, g_ptr, ok_ptr, step_ptr, report_ptr,
    a_ptr, a_absmax, a_table, a_tree, a_values, a_zero,
    b_ptr, b_absmax, b_table, b_tree, b_values, b_zero,
    c_ptr, c_absmax, c_table, c_tree, c_values, c_zero,
    rows, first_tile, row_length, per_row, nblocks, offset, seed, param,
    h, d, trust_ptr, out_ptr,
    RULE: tl.constexpr, KIND_A: tl.constexpr, KIND_B: tl.constexpr, KIND_C: tl.constexpr,
    NEGATE: tl.constexpr, TERMS: tl.constexpr, BLOCKSIZE: tl.constexpr,
):  # fmt: skip
    """The step of RULE on blocks `rows` of one parameter (the body every launch shares);
    with TERMS, RULE is a norm-input function and its values go to out_ptr (fp32), nothing
    else changes. A skipped parameter is counted once, by its `first_tile`."""
    if TERMS or tl.load(ok_ptr) != 0:
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
        tl.atomic_add(report_ptr, 1, mask=first_tile)


@triton.jit
def _doubles(lr_bits, beta1_bits, beta2_bits, lr_decay_bits):
    """d = (lr, beta1, beta2, lr_decay) in binary64, from their bits."""
    return (
        lr_bits.to(tl.int64).to(tl.float64, bitcast=True),
        beta1_bits.to(tl.int64).to(tl.float64, bitcast=True),
        beta2_bits.to(tl.int64).to(tl.float64, bitcast=True),
        lr_decay_bits.to(tl.int64).to(tl.float64, bitcast=True),
    )


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
    """The step of RULE on one parameter: program i takes blocks i * ROWS ..."""
    pid = tl.program_id(0)
    _step_tile(
        p_ptr, g_ptr, ok_ptr, step_ptr, report_ptr,
        a_ptr, a_absmax, a_table, a_tree, a_values, a_zero,
        b_ptr, b_absmax, b_table, b_tree, b_values, b_zero,
        c_ptr, c_absmax, c_table, c_tree, c_values, c_zero,
        pid.to(tl.int64) * ROWS + tl.arange(0, ROWS), pid == 0, row_length, per_row, nblocks, offset, seed, param,
        (h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11),
        _doubles(lr_bits, beta1_bits, beta2_bits, lr_decay_bits), trust_ptr, out_ptr,
        RULE, KIND_A, KIND_B, KIND_C, NEGATE, TERMS, BLOCKSIZE,
    )  # fmt: skip


FIELDS = (
    "p", "grad", "ok", "step", "a", "a_absmax", "a_table", "b", "b_absmax", "b_table", "c", "c_absmax", "c_table",
    "row_length", "per_row", "nblocks", "offset", "seed", "param",
)  # fmt: skip
"""A batched launch's int64 row per parameter: addresses (ok: an index into the flags), then
the block layout, the global index of the first element, the rounding seed, the report's id."""
_COLUMN = {name: i for i, name in enumerate(FIELDS)}
_WIDTH = tl.constexpr(len(FIELDS))


@triton.constexpr_function
def _column(name):
    return _COLUMN[name]


@triton.jit
def _field(row_ptr, name: tl.constexpr):
    return tl.load(row_ptr + _column(name))


@triton.jit
def _slot_data(row_ptr, name: tl.constexpr, KIND: tl.constexpr):
    """A slot's data address as a typed pointer: fp32 state or uint8 codes."""
    if KIND == 1:
        return _field(row_ptr, name).to(tl.pointer_type(tl.float32))
    else:
        return _field(row_ptr, name).to(tl.pointer_type(tl.uint8))


@triton.jit(do_not_specialize=["lr_bits", "beta1_bits", "beta2_bits", "lr_decay_bits"])
def _batched_step_kernel(
    params_ptr, tiles_ptr, ok_ptr, report_ptr,
    a_tree, a_values, a_zero, b_tree, b_values, b_zero, c_tree, c_values, c_zero,
    h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11,
    lr_bits, beta1_bits, beta2_bits, lr_decay_bits, trust_ptr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    RULE: tl.constexpr, KIND_A: tl.constexpr, KIND_B: tl.constexpr, KIND_C: tl.constexpr,
    NEGATE: tl.constexpr, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """The step of RULE on many parameters in one launch: program i takes tile
    tiles[i] = (j, k), blocks k * ROWS ... of parameter j, whose addresses, layout and seed
    are row j of params (`FIELDS`)."""
    pid = tl.program_id(0)
    j = tl.load(tiles_ptr + 2 * pid)
    k = tl.load(tiles_ptr + 2 * pid + 1)
    row = params_ptr + j * _WIDTH
    _step_tile(
        _field(row, "p").to(tl.pointer_type(P_DTYPE)), _field(row, "grad").to(tl.pointer_type(G_DTYPE)),
        ok_ptr + _field(row, "ok"), _field(row, "step").to(tl.pointer_type(tl.int64)), report_ptr,
        _slot_data(row, "a", KIND_A), _field(row, "a_absmax").to(tl.pointer_type(tl.float32)),
        _field(row, "a_table").to(tl.pointer_type(tl.float32)), a_tree, a_values, a_zero,
        _slot_data(row, "b", KIND_B), _field(row, "b_absmax").to(tl.pointer_type(tl.float32)),
        _field(row, "b_table").to(tl.pointer_type(tl.float32)), b_tree, b_values, b_zero,
        _slot_data(row, "c", KIND_C), _field(row, "c_absmax").to(tl.pointer_type(tl.float32)),
        _field(row, "c_table").to(tl.pointer_type(tl.float32)), c_tree, c_values, c_zero,
        k * ROWS + tl.arange(0, ROWS), k == 0, _field(row, "row_length"), _field(row, "per_row"),
        _field(row, "nblocks"), _field(row, "offset"), _field(row, "seed"), _field(row, "param"),
        (h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11),
        _doubles(lr_bits, beta1_bits, beta2_bits, lr_decay_bits), trust_ptr, trust_ptr,
        RULE, KIND_A, KIND_B, KIND_C, NEGATE, False, BLOCKSIZE,
    )  # fmt: skip


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


def _check_parameter(where: str, p: torch.Tensor, grad: torch.Tensor, slots: Sequence, layout: tuple[int, int]) -> int:
    """Validate one parameter's tensors for a step; returns its numel."""
    n = p.numel()
    for name, t in (("p", p), ("grad", grad)):
        if not t.is_contiguous() or t.numel() != n:
            raise ValueError(f"{where}: {name} must be contiguous with {n} elements")
        _check(t.view(-1), name, DTYPES)
    if grad.device != p.device:
        raise ValueError(f"{where}: p on {p.device}, grad on {grad.device}")
    if len(slots) != 3:
        raise ValueError(f"{where}: three slots, got {len(slots)}")
    if n == 0:  # an empty parameter (an FSDP2 rank's empty shard): nothing to check further
        return 0
    row_length, blocksize = layout
    for i, entry in enumerate(slots):
        if isinstance(entry, QTensor) and (entry.numel(), entry.blocksize, entry.row_length) != (n, *layout[::-1]):
            raise ValueError(
                f"{where}: slot {i} has {entry.numel()} elements in blocks of {entry.blocksize} "
                f"(rows of {entry.row_length}), expected {n} in blocks of {blocksize} (rows of {row_length})"
            )
    return n


def _check_constants(where: str, hyper: Sequence[float], doubles: Sequence[float]) -> list[float]:
    """The rule's binary32 constants padded to the kernels' twelve."""
    if len(hyper) > 12 or len(doubles) != 4:
        raise ValueError(f"{where}: at most 12 constants and 4 doubles")
    return [float(x) for x in hyper] + [0.0] * (12 - len(hyper))


def _num_blocks(n: int, layout: tuple[int, int]) -> int:
    row_length, blocksize = layout
    return n // row_length * -(-row_length // blocksize)


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
    n = _check_parameter("q8.kernels.step", p, grad, slots, layout)
    h = _check_constants("q8.kernels.step", hyper, doubles)
    if n == 0:  # an empty parameter (an FSDP2 rank's empty shard): nothing to update
        return
    row_length, blocksize = layout
    args = []
    kinds = []
    for entry, code in zip(slots, codes, strict=True):
        kind, slot = _slot_args(entry, code, p)
        kinds.append(kind)
        args += slot
    nblocks = _num_blocks(n, layout)
    rows, grid = _grid(nblocks, blocksize)
    with _launch_context(p.device):
        _step_kernel[grid](
            p, grad, ok, step_count, report, *args,
            row_length, -(-row_length // blocksize), nblocks, offset, seed & 0xFFFFFFFF, param,
            *h, *map(double_bits, doubles), trust, p if terms is None else terms,
            RULE=RULES[rule] if terms is None else TERMS[rule], KIND_A=kinds[0], KIND_B=kinds[1], KIND_C=kinds[2],
            NEGATE=bool(negate), TERMS=terms is not None, BLOCKSIZE=blocksize, ROWS=rows, num_warps=NUM_WARPS,
            **EXACT,
        )  # fmt: skip


# ---- many small parameters in one launch -------------------------------------------------------

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@dataclasses.dataclass
class Member:
    """One parameter of a batched step: what `step` takes per parameter (`ok_index`: its
    flag's index in the launch's `ok`)."""

    p: torch.Tensor
    grad: torch.Tensor
    slots: Sequence
    step_count: torch.Tensor
    ok_index: int
    seed: int
    layout: tuple[int, int]
    offset: int = 0
    param: int = 0

    def signature(self) -> tuple:
        """What a launch compiles in: the parameter and gradient dtypes, each slot's storage
        (absent, fp32, 8-bit) and the blocksize. Members of one launch share it."""
        storage = tuple(None if e is None else isinstance(e, QTensor) for e in self.slots)
        return self.p.dtype, self.grad.dtype, storage, self.layout[1]

    def check(self) -> None:
        """Validate the member's tensors as `step` does (an empty parameter cannot batch)."""
        if _check_parameter("q8.kernels.batched_step", self.p, self.grad, self.slots, self.layout) == 0:
            raise ValueError("q8.kernels.batched_step: an empty parameter has no blocks to batch")


class BatchTables:
    """The device tables of a batched launch, made again only when its members change.

    `params` holds a row per member (`FIELDS`: its addresses, layout, seed), `tiles` a
    (member, tile) pair per program. Both are keyed by the rows themselves, so a step whose
    tensors are those of the last one copies nothing to the device (and validates nothing
    again), and a CUDA graph captured then finds them in place; a new tensor (a reallocated
    gradient, a loaded state) means new rows and one asynchronous copy from pinned memory.
    Tables a captured graph read stay alive with this object (the graph replays their
    addresses), as do the decode tables the rows point to."""

    def __init__(self) -> None:
        self.rows: list[list[int]] | None = None
        self.params = self.tiles = None
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.decode_tables: dict[Code, torch.Tensor] = {}

    def _row(self, m: Member) -> list[int]:
        """Member m's row (`FIELDS`)."""
        slots = []
        for entry in m.slots:
            if entry is None:
                slots += [0, 0, 0]
            elif isinstance(entry, QTensor):
                table = self.decode_tables.get(entry.code)
                if table is None or table.device != entry.device:
                    table = self.decode_tables[entry.code] = device_tables(entry.code, entry.device)[1]
                slots += [entry.codes.data_ptr(), entry.absmax.data_ptr(), table.data_ptr()]
            else:
                slots += [entry.data_ptr(), 0, 0]
        row_length, blocksize = m.layout
        return [
            m.p.data_ptr(), m.grad.data_ptr(), m.ok_index, m.step_count.data_ptr(), *slots,
            row_length, -(-row_length // blocksize), _num_blocks(m.p.numel(), m.layout), m.offset,
            m.seed & 0xFFFFFFFF, m.param,
        ]  # fmt: skip

    def get(self, members: Sequence[Member], tile_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(params, tiles) on the members' device; None when they changed while a CUDA graph is
        being captured (a copy to the device cannot be captured safely: launch one by one)."""
        rows = [self._row(m) for m in members]
        device = members[0].p.device
        capturing = _capturing(device)
        if rows != self.rows:
            for m in members:
                m.check()
            if capturing:
                return None
            tiles = [(j, k) for j, row in enumerate(rows) for k in range(-(-row[_COLUMN["nblocks"]] // tile_rows))]
            self.params, self.tiles = _to_device(rows, device), _to_device(tiles, device)
            self.rows = rows
        if capturing and not any(t[0] is self.params for t in self.captured):
            self.captured.append((self.params, self.tiles))
        return self.params, self.tiles


def _capturing(device: torch.device) -> bool:
    """Whether `device`'s current stream is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _to_device(values: list, device: torch.device) -> torch.Tensor:
    """An int64 tensor of `values` on `device`, copied without waiting (from pinned memory)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def batched_step(
    rule: str,
    members: Sequence[Member],
    codes: Sequence[Code | None],
    hyper: Sequence[float],
    doubles: Sequence[float],
    *,
    ok: torch.Tensor,
    report: torch.Tensor,
    trust: torch.Tensor,
    tables: BatchTables,
    negate: bool = False,
) -> None:
    """`step` on every member in ONE launch (members share their `Member.signature` and
    device; the rule, constants, trust and negate are the group's): a grid over all their
    blocks, each program reading its member's addresses from device tables (`BatchTables`).
    Same bytes as a `step` per member, no host-device synchronization.

    Args: as `step`, per member in `members`; ok: int64 flags on the device, member m's at
    `m.ok_index`; tables: this batch's `BatchTables`, kept from step to step.

    While a CUDA graph is captured, members whose tables would have to be copied to the
    device (they changed since the last step) take a `step` each instead: a copy to the device
    cannot be captured safely, launches can.
    """
    where = "q8.kernels.batched_step"
    h = _check_constants(where, hyper, doubles)
    if not members:
        return
    signatures = {m.signature() for m in members}
    devices = {m.p.device for m in members}
    if len(signatures) > 1 or len(devices) > 1:
        raise ValueError(f"{where}: members of one launch share dtypes, slot storage, blocksize and device")
    first = members[0]
    kinds, args = [], []
    for entry, code in zip(first.slots, codes, strict=True):
        kind, slot = _slot_args(entry, code, first.p)
        kinds.append(kind)
        args += slot[3:]  # the target table's tree, values and zero code: the group's
    blocksize = first.layout[1]
    tile_rows = _grid(1, blocksize)[0]
    found = tables.get(members, tile_rows)
    if found is None:
        for m in members:
            step(
                rule, m.p, m.grad, m.slots, codes, hyper, doubles, ok=ok[m.ok_index], step_count=m.step_count,
                report=report, seed=m.seed, offset=m.offset, param=m.param, trust=trust, negate=negate,
                layout=m.layout,
            )  # fmt: skip
        return
    params, tiles = found
    with _launch_context(first.p.device):
        _batched_step_kernel[(tiles.shape[0],)](
            params, tiles, ok, report, *args, *h, *map(double_bits, doubles), trust,
            P_DTYPE=TL_DTYPES[first.p.dtype], G_DTYPE=TL_DTYPES[first.grad.dtype], RULE=RULES[rule],
            KIND_A=kinds[0], KIND_B=kinds[1], KIND_C=kinds[2], NEGATE=bool(negate), BLOCKSIZE=blocksize,
            ROWS=tile_rows, num_warps=NUM_WARPS, **EXACT,
        )  # fmt: skip
