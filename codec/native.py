"""CPU backend of the codec: thin, validated wrapper over the compiled `_native` module.

Every function takes and returns contiguous CPU tensors; large inputs are split into
block ranges that run on `torch.get_num_threads()` threads (`_run_blocks`).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch

from . import _native
from .codes import Code
from .layout import num_blocks

_MIN_PARALLEL_ELEMENTS = 1 << 18


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """Worker threads of q8's compiled loops where they run on Python threads (the codec
    without OpenMP, formats' byte planes); callers submit from outside the pool only."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="q8-cpu")


def _run_blocks(fn, nblocks: int, n: int) -> int:
    """Call fn(b0, b1, threads) over blocks [0, nblocks) on up to `torch.get_num_threads()`
    threads and return the lowest block it reports (-1: none). Builds with OpenMP split the
    range in C, on the OpenMP threads torch itself uses (codec/q8_codec.h); others split it
    here over Python threads (the C code releases the GIL), the calling thread taking the
    first range."""
    workers = max(1, min(torch.get_num_threads(), n // _MIN_PARALLEL_ELEMENTS, nblocks))
    if _native.OPENMP or workers == 1:
        return fn(0, nblocks, workers)
    step = -(-nblocks // workers)
    ranges = [(b, min(b + step, nblocks), 1) for b in range(0, nblocks, step)]
    others = [_pool(len(ranges) - 1).submit(fn, *r) for r in ranges[1:]]
    bad = [b for b in [fn(*ranges[0]), *(f.result() for f in others)] if b >= 0]
    return min(bad) if bad else -1


@functools.cache
def search_lut(code: Code) -> torch.Tensor:
    """uint8[65536]: for each top-16-bit pattern of an fp32 q, the code of the lowest q
    sharing it (a lower bound the C scan starts from)."""
    keys = torch.arange(1 << 16, dtype=torch.int64)
    bits = torch.where(keys >= 1 << 15, (keys << 16) | 0xFFFF, keys << 16)
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    lowest = bits.view(torch.float32)
    lowest = torch.where(torch.isfinite(lowest), lowest, 0.0)
    counts = torch.searchsorted(code.thresholds, lowest, right=True)
    return counts.clamp_(max=255).to(torch.uint8)


def _fresh(n: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised output tensor, backed by huge pages where the OS allows (see
    `_native.advise_hugepages`: first-touch page faults dominate writing a large output)."""
    out = torch.empty(n, dtype=dtype)
    _native.advise_hugepages(out.data_ptr(), out.nbytes)
    return out


def encode(
    x: torch.Tensor,
    code: Code,
    blocksize: int,
    row_length: int | None = None,
    key: int | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Encode a contiguous 1-D fp32 CPU tensor in blocks that never cross a row of
    `row_length` elements (None: one row, the flat layout), to the nearest codes or, given
    a `key`, by stochastic rounding (x's elements numbered from `offset`). Returns (codes,
    absmax, bad_block) where bad_block is -1, or the first block holding a NaN/inf (the
    outputs are then invalid)."""
    n = x.numel()
    row_length = n if row_length is None else row_length
    nblocks = num_blocks(n, blocksize, row_length)
    codes = _fresh(n, torch.uint8)
    absmax = torch.empty(nblocks, dtype=torch.float32)
    if nblocks == 0:
        return codes, absmax, -1
    thresholds, lut = code.thresholds, search_lut(code)

    stochastic = () if key is None else (code.values.data_ptr(), key, offset)

    def run(b0: int, b1: int, threads: int) -> int:
        return _native.encode(
            x.data_ptr(), row_length, blocksize, b0, b1, thresholds.data_ptr(), lut.data_ptr(),
            code.zero_index, codes.data_ptr(), absmax.data_ptr(), threads, *stochastic,
        )  # fmt: skip

    return codes, absmax, _run_blocks(run, nblocks, n)


def decode(
    codes: torch.Tensor, absmax: torch.Tensor, code: Code, blocksize: int, row_length: int | None = None
) -> torch.Tensor:
    """Decode contiguous uint8 codes and fp32 absmax (CPU), laid out as `encode` makes them,
    to a 1-D fp32 tensor."""
    n = codes.numel()
    row_length = n if row_length is None else row_length
    out = _fresh(n, torch.float32)
    if absmax.numel() != num_blocks(n, blocksize, row_length):
        raise ValueError(f"q8 decode: {absmax.numel()} absmax values do not fit {n} codes in blocks of {blocksize}")
    if n == 0:
        return out
    table = code.values

    def run(b0: int, b1: int, threads: int) -> int:
        _native.decode(
            codes.data_ptr(), absmax.data_ptr(), table.data_ptr(), row_length, blocksize, b0, b1,
            out.data_ptr(), threads,
        )  # fmt: skip
        return -1

    _run_blocks(run, absmax.numel(), n)
    return out


def decode_range(
    codes: torch.Tensor, absmax: torch.Tensor, code: Code, blocksize: int, row_length: int, e0: int, out: torch.Tensor
) -> None:
    """Decode elements [e0, e0 + len(codes)) of a tensor laid out as `encode` makes them
    into the fp32 tensor `out` (one value per code), on the calling thread: `codes` holds
    only those elements' codes, `absmax` the whole tensor's. The blocks inside the range go
    through the compiled loop; the parts of the (at most two) blocks it cuts are decoded
    with the same single fp32 product."""
    e1 = e0 + codes.numel()
    per_row = -(-row_length // blocksize)

    def block(e: int) -> int:  # the block holding element e
        return e // row_length * per_row + e % row_length // blocksize

    def start(b: int) -> int:
        return b // per_row * row_length + b % per_row * blocksize

    def by_element(a: int, b: int) -> None:
        idx = torch.arange(a, b)
        blocks = idx // row_length * per_row + idx % row_length // blocksize
        out[a - e0 : b - e0] = code.values[codes[a - e0 : b - e0].long()] * absmax[blocks]

    b0 = block(e0) + (e0 % row_length % blocksize != 0)
    b1 = absmax.numel() if e1 == row_length * (absmax.numel() // per_row) else block(e1)
    if b0 >= b1:
        by_element(e0, e1)
        return
    by_element(e0, start(b0))
    _native.decode(
        codes.data_ptr() - e0, absmax.data_ptr(), code.values.data_ptr(), row_length, blocksize, b0, b1,
        out.data_ptr() - 4 * e0, 1,
    )  # fmt: skip
    by_element(start(b1) if b1 < absmax.numel() else e1, e1)


def block_errors(
    x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code: Code, blocksize: int, row_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of a contiguous 1-D fp32 `x` and its encoding (laid out as `encode` makes
    it): (sum of squared errors, sum of x^2) as float64 and max |error| as float32, one
    pass without a decoded copy."""
    n, nblocks = x.numel(), absmax.numel()
    err2, ref2 = torch.empty(nblocks, dtype=torch.float64), torch.empty(nblocks, dtype=torch.float64)
    max_abs = torch.empty(nblocks, dtype=torch.float32)
    if nblocks == 0:
        return err2, ref2, max_abs
    table = code.values

    def run(b0: int, b1: int, threads: int) -> int:
        _native.block_errors(
            x.data_ptr(), codes.data_ptr(), absmax.data_ptr(), table.data_ptr(), row_length, blocksize, b0, b1,
            err2.data_ptr(), ref2.data_ptr(), max_abs.data_ptr(), threads,
        )  # fmt: skip
        return -1

    _run_blocks(run, nblocks, n)
    return err2, ref2, max_abs
