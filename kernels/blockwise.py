"""GPU backend of the codec: blockwise encode / decode kernels and their host wrappers.

Same contract as the CPU path (`q8.codec.native`), same bytes: `q8.quantize` and
`q8.dequantize` send CUDA tensors here. A program handles a tile of whole blocks (at
least `TILE` elements) of the flat or the row layout (`block_offsets`); every index is
int64, so tensors beyond 2**31 elements work.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..codec.codes import Code
from ..codec.layout import num_blocks
from .quant import EXACT, block_absmax, block_offsets, dequantize_tile, quantize_tile, round_to, to_float32

TILE = 4096
"""Elements per program (a tile of TILE // blocksize blocks, or one larger block)."""
NUM_WARPS = 8
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _encode_kernel(
    x_ptr, tree_ptr, codes_ptr, absmax_ptr, bad_ptr, row_length, per_row, nblocks, zero_code,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs, mask = block_offsets(rows, row_length, per_row, nblocks, BLOCKSIZE)
    x = to_float32(tl.load(x_ptr + offs, mask=mask, other=0.0))
    absmax, finite = block_absmax(x)
    tl.store(absmax_ptr + rows, absmax, mask=rows < nblocks)
    tl.store(codes_ptr + offs, quantize_tile(x, absmax, tree_ptr, zero_code), mask=mask)
    first_bad = tl.min(tl.where(finite, nblocks, rows))
    tl.atomic_min(bad_ptr, first_bad, mask=first_bad < nblocks)


@triton.jit
def _decode_kernel(
    codes_ptr, absmax_ptr, values_ptr, out_ptr, row_length, per_row, nblocks,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs, mask = block_offsets(rows, row_length, per_row, nblocks, BLOCKSIZE)
    codes = tl.load(codes_ptr + offs, mask=mask, other=0)
    absmax = tl.load(absmax_ptr + rows, mask=rows < nblocks, other=0.0)
    y = dequantize_tile(codes, absmax, values_ptr)
    tl.store(out_ptr + offs, round_to(y, out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=64)
def device_tables(code: Code, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tree, values) of `code` on `device`, copied once per (code, device).

    tree: fp32[255], the thresholds in the breadth-first order `code_of` descends
    (`q8.codec.codes.search_tree`); values: fp32[256], the table itself.
    """
    return code.search_trees[0, :255].to(device), code.values.to(device)


def _interpreted() -> bool:
    return not isinstance(_encode_kernel, triton.runtime.JITFunction)


def _check(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes or t.dim() != 1 or not t.is_contiguous():
        raise ValueError(
            f"q8.kernels: {name} must be a contiguous 1-D tensor of {', '.join(map(str, dtypes))}, "
            f"got {t.dtype} {tuple(t.shape)}"
        )
    if t.device.type != "cuda" and not (t.device.type == "cpu" and _interpreted()):
        raise ValueError(
            f"q8.kernels: {name} is on {t.device}; the kernels run on CUDA tensors "
            "(CPU tensors only under TRITON_INTERPRET=1); q8.quantize sends CPU tensors to the CPU path"
        )


def _launch_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grid(nblocks: int, blocksize: int) -> tuple[int, tuple[int]]:
    rows = max(1, TILE // blocksize)
    return rows, (triton.cdiv(nblocks, rows),)


def encode(
    x: torch.Tensor, code: Code, blocksize: int, row_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Encode a contiguous 1-D fp32/fp16/bf16 CUDA tensor (half precision is widened exactly)
    in blocks that never cross a row of `row_length` elements (None: the flat layout).

    Returns (codes uint8[n], absmax fp32[nblocks], bad_block) on x's device, bad_block
    being -1 or the first block holding a NaN/inf (the outputs are then invalid).
    """
    _check(x, "x", DTYPES)
    n = x.numel()
    row_length = n if row_length is None else row_length
    nblocks = num_blocks(n, blocksize, row_length)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, absmax, -1
    tree, _ = device_tables(code, x.device)
    bad = torch.full((1,), nblocks, dtype=torch.int64, device=x.device)
    rows, grid = _grid(nblocks, blocksize)
    with _launch_context(x.device):
        _encode_kernel[grid](
            x, tree, codes, absmax, bad, row_length, -(-row_length // blocksize), nblocks, code.zero_index,
            BLOCKSIZE=blocksize, ROWS=rows, num_warps=NUM_WARPS, **EXACT,
        )  # fmt: skip
    first_bad = int(bad.item())
    return codes, absmax, (first_bad if first_bad < nblocks else -1)


def decode(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: Code,
    blocksize: int,
    dtype: torch.dtype = torch.float32,
    row_length: int | None = None,
) -> torch.Tensor:
    """Decode uint8 codes and fp32 absmax (CUDA), laid out as `encode` makes them, to a 1-D
    tensor of `dtype`.

    fp16/bf16 outputs are written directly, rounded to nearest even: the same bytes as
    decoding to fp32 and casting.
    """
    _check(codes, "codes", (torch.uint8,))
    _check(absmax, "absmax", (torch.float32,))
    if dtype not in DTYPES:
        raise ValueError(f"q8.kernels.decode: dtype must be one of {DTYPES}, got {dtype}")
    n = codes.numel()
    row_length = n if row_length is None else row_length
    nblocks = num_blocks(n, blocksize, row_length)
    if absmax.numel() != nblocks or absmax.device != codes.device:
        raise ValueError(
            f"q8.kernels.decode: {n} codes in blocks of {blocksize} need {nblocks} absmax values on "
            f"{codes.device}, got {absmax.numel()} on {absmax.device}"
        )
    out = torch.empty(n, dtype=dtype, device=codes.device)
    if n == 0:
        return out
    _, values = device_tables(code, codes.device)
    rows, grid = _grid(nblocks, blocksize)
    with _launch_context(codes.device):
        _decode_kernel[grid](
            codes, absmax, values, out, row_length, -(-row_length // blocksize), nblocks,
            BLOCKSIZE=blocksize, ROWS=rows, num_warps=NUM_WARPS, **EXACT,
        )  # fmt: skip
    return out
