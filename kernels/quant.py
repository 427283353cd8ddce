"""Reusable `@triton.jit` building blocks of the q8 codec (docs/CODEC.md), exact on GPU.

Each helper works on a tile `[ROWS, BLOCKSIZE]`: one row per quantization block. A kernel
built from them gives the bytes of the CPU path (codec/_native.c) when it follows three
rules, which the encode/decode kernels here and the fused optimizer kernels share:

1. Launch with `**EXACT` (`enable_fp_fusion=False`): Triton contracts `a * b + c` into
   one fused multiply-add by default, which rounds once instead of twice.
2. Divide with `tl.math.div_rn` (PTX `div.rn.f32`) and take square roots with
   `tl.math.sqrt_rn`: a plain `/` compiles to an approximate division on NVIDIA GPUs.
3. Nothing flushes subnormals: `div_rn`, `*`, `+` and comparisons compile to IEEE PTX
   without `.ftz` (tests/test_kernels.py checks the PTX of every kernel).

Tables live in device memory, loaded by the helpers: the 256 `values` of a code (fp32) and
its 255 thresholds as a search tree (`q8.codec.codes.search_tree`); `q8.kernels.device_tables` gives both,
copied once per device.
"""

from __future__ import annotations

import triton
import triton.language as tl

EXACT = {"enable_fp_fusion": False}
"""Launch options every q8 kernel uses: no multiply-add contraction."""


@triton.jit
def block_offsets(blocks, row_length, per_row, nblocks, BLOCKSIZE: tl.constexpr):
    """Element offsets `[ROWS, BLOCKSIZE]` of blocks `blocks` (int64 `[ROWS]`) in the row
    layout of docs/CODEC.md (rows of `row_length` elements, `per_row` blocks each; the flat
    layout is `row_length = numel`), and the mask of those that exist."""
    row = blocks // per_row
    first = (blocks - row * per_row) * BLOCKSIZE
    cols = tl.arange(0, BLOCKSIZE)
    mask = (first[:, None] + cols[None, :] < row_length) & (blocks < nblocks)[:, None]
    return (row * row_length + first)[:, None] + cols[None, :], mask


@triton.jit
def block_absmax(x):
    """Per-row max |x| of an fp32 tile `[ROWS, BLOCKSIZE]`, and whether each row is finite.

    Taken on the bit patterns (for |x|, the int32 bits order like the floats, NaN above
    inf above every finite value), so it is exact whatever the hardware's float max does
    with NaN or subnormals. Returns (absmax fp32 [ROWS], finite bool [ROWS]); absmax is
    meaningless where finite is False.
    """
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    top = tl.max(bits, axis=1)
    return top.to(tl.float32, bitcast=True), top <= 0x7F7FFFFF


@triton.jit
def code_of(q, tree_ptr):
    """The 8-bit code of normalised values `q` (fp32, any shape): #{j : thresholds[j] <= q}.

    A branchless descent of a perfect binary search tree: `tree_ptr` holds the 255
    thresholds in breadth-first (Eytzinger) order (`search_tree`), node i has children
    2i+1 and 2i+2, and after eight steps the node index minus 255 is the count. Level k
    reads 2**k neighbouring entries, so a warp touches few cache lines (sorted order would
    scatter the first levels over the whole 1 KiB table). Exact for every fp32 q, ties to
    the lower code (the thresholds encode the tie rule), -0.0 like 0.0. Returns int32.
    """
    node = tl.zeros(q.shape, tl.int32)
    for _ in tl.static_range(8):
        t = tl.load(tree_ptr + node)
        node = 2 * node + 1 + (t <= q).to(tl.int32)
    return node - 255


@triton.jit
def quantize_tile(x, absmax, tree_ptr, zero_code):
    """Codes (uint8) of an fp32 tile `[ROWS, BLOCKSIZE]` given its per-row `absmax`.

    code = code_of(x / absmax) with one correctly rounded division; rows with absmax 0
    get `zero_code` (the index of the table's 0.0).
    """
    scale = tl.where(absmax == 0.0, 1.0, absmax)[:, None]
    codes = code_of(tl.math.div_rn(x, scale), tree_ptr)
    return tl.where(absmax[:, None] == 0.0, zero_code, codes).to(tl.uint8)


@triton.jit
def mix32(x):
    """Wellons' lowbias32 hash of uint32 values (q8.codec.mix32)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def quantize_tile_stochastic(x, absmax, values_ptr, tree_ptr, zero_code, key, index):
    """Codes (uint8) of an fp32 tile by deterministic stochastic rounding (docs/CODEC.md;
    reference `q8.codec.quantize_stochastic`): `index` holds each element's global index
    (int64), `key` the 32-bit rounding key. The nearest code finds the entry below q."""
    scale = tl.where(absmax == 0.0, 1.0, absmax)[:, None]
    q = tl.math.div_rn(x, scale)
    c = code_of(q, tree_ptr)
    f = tl.where((tl.load(values_ptr + c) <= q) | (c == 0), c, c - 1)
    below = tl.minimum(f, 254)
    lo = tl.load(values_ptr + below)
    frac = tl.math.div_rn(q - lo, tl.load(values_ptr + below + 1) - lo)
    low = (index & 0xFFFFFFFF).to(tl.uint32)
    u = mix32(mix32(low ^ key.to(tl.uint32)) ^ (index >> 32).to(tl.uint32))
    up = ((u >> 8).to(tl.float32) * 5.9604644775390625e-08 < frac) & (f < 255)
    f = f + up.to(tl.int32)
    f = tl.where((f == zero_code) & (zero_code < 255) & (x > 0.0), zero_code + 1, f)
    return tl.where(absmax[:, None] == 0.0, zero_code, f).to(tl.uint8)


@triton.jit
def dequantize_tile(codes, absmax, values_ptr):
    """fp32 values of a code tile `[ROWS, BLOCKSIZE]`: values[code] * absmax (one rounding)."""
    return tl.load(values_ptr + codes.to(tl.int32)) * absmax[:, None]


@triton.jit
def round_to(y, dtype: tl.constexpr):
    """fp32 values `y` as `dtype` (fp32, fp16 or bf16), rounded to nearest even: the bytes
    of torch's `.to(dtype)`."""
    if dtype == tl.bfloat16:
        return to_bfloat16(y)
    else:
        return y.to(dtype, fp_downcast_rounding="rtne")


@triton.jit
def to_bfloat16(y):
    """fp32 -> bf16 rounded to nearest even (NaN -> 0x7FC0), computed on the bits.

    Gives the bytes of torch's `.to(torch.bfloat16)` on every backend: the Triton
    interpreter's own bf16 cast does not round to nearest even.
    """
    bits = y.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(y != y, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_float32(x):
    """Widen fp32/fp16/bf16 values to fp32 exactly (bf16 on the bits: the Triton
    interpreter's bf16 cast gets subnormals wrong)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)
