"""Blockwise 8-bit quantization: `QTensor`, `quantize`, `dequantize` and error measures.

A tensor is flattened (row-major) and cut into blocks of `blocksize` elements; the last
block may be shorter. With `row_length`, blocks restart at every row of that many elements
(the row layout of `q8.codec.layout`, which 8-bit optimizer state uses). Each block stores
absmax = max |x| (fp32) and one uint8 code per element: the exact nearest table entry to
x / absmax, ties to the lower entry. Decoding is table[code] * absmax in fp32, then a cast
to the requested dtype. The rule is
specified in docs/CODEC.md; CPU tensors use the compiled path in `native`, CUDA tensors
the Triton kernels in `q8.kernels`, and both give identical bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .codes import Code, get_code
from .layout import canonical_row_length, check_row_length, num_blocks

__all__ = [
    "AUTO_CODES",
    "QTensor",
    "QuantError",
    "dequantize",
    "mix32",
    "quant_error",
    "quantize",
    "quantize_best",
    "quantize_stochastic",
    "rounding_key",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 64, 4096
BLOCKSIZES = tuple(1 << k for k in range(6, 13))
"""Every valid blocksize: the powers of two from MIN_BLOCKSIZE to MAX_BLOCKSIZE."""

AUTO_CODES = {True: ("dynamic", "linear"), False: ("udynamic", "ulinear")}
"""Candidates of code="auto", by whether the tensor has negative values, in tie order."""
_ERROR_CHUNK = 1 << 20  # elements per step of `quant_error`: bounded temporaries


@dataclass(frozen=True, eq=False)
class QTensor:
    """A blockwise-quantized tensor.

    Attributes:
        codes: uint8, one per element, flat (numel,).
        absmax: float32, one per block, flat: (ceil(numel / blocksize),), or in the row
            layout (numel / row_length * ceil(row_length / blocksize),), row by row.
        code: the `Code` table the codes index.
        blocksize: elements per block (power of two, 64..4096).
        shape: the original shape.
        dtype: the original dtype (fp32, fp16 or bf16), restored by `dequantize`.
        row_length: blocks never cross a row of this many elements (docs/CODEC.md). None or
            numel: the flat layout. Normalised to numel wherever both layouts are the same
            blocks (a row of whole blocks, or a single row), so `row_length != numel()`
            exactly when rows cut blocks.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    code: Code
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    row_length: int | None = None

    def __post_init__(self) -> None:
        _check_blocksize(self.blocksize)
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 1:
            raise ValueError(
                f"QTensor.codes must be a 1-D uint8 tensor, got {self.codes.dtype} {tuple(self.codes.shape)}"
            )
        if self.absmax.dtype != torch.float32 or self.absmax.dim() != 1:
            raise ValueError(
                f"QTensor.absmax must be a 1-D float32 tensor, got {self.absmax.dtype} {tuple(self.absmax.shape)}"
            )
        numel = math.prod(self.shape)
        if self.codes.numel() != numel:
            raise ValueError(f"QTensor: {self.codes.numel()} codes for shape {tuple(self.shape)} ({numel} elements)")
        row_length = numel if self.row_length is None else self.row_length
        check_row_length(numel, row_length)
        row_length = canonical_row_length(numel, self.blocksize, row_length)
        object.__setattr__(self, "row_length", row_length)
        nblocks = num_blocks(numel, self.blocksize, row_length)
        if self.absmax.numel() != nblocks:
            rows = "" if row_length == numel else f" in rows of {row_length}"
            raise ValueError(
                f"QTensor: {self.absmax.numel()} absmax values, expected {nblocks} blocks of {self.blocksize}{rows}"
            )
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"QTensor.dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        if self.codes.device != self.absmax.device:
            raise ValueError(f"QTensor: codes on {self.codes.device} but absmax on {self.absmax.device}")
        object.__setattr__(self, "shape", torch.Size(self.shape))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def numel(self) -> int:
        return self.codes.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus absmax (the table is shared and not counted)."""
        return self.codes.numel() + 4 * self.absmax.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Decode; see `q8.dequantize`."""
        return dequantize(self, dtype)

    def to(self, device: torch.device | str) -> QTensor:
        """The same QTensor with codes and absmax on `device`."""
        return QTensor(
            self.codes.to(device), self.absmax.to(device), self.code, self.blocksize, self.shape, self.dtype,
            self.row_length,
        )  # fmt: skip

    def __repr__(self) -> str:
        rows = "" if self.row_length == self.numel() else f", row_length={self.row_length}"
        return (
            f"QTensor(shape={tuple(self.shape)}, dtype={self.dtype}, code={self.code.name!r}, "
            f"blocksize={self.blocksize}{rows}, device={self.device})"
        )


def _check_blocksize(blocksize: int) -> None:
    if (
        not isinstance(blocksize, int)
        or isinstance(blocksize, bool)
        or not MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE
        or blocksize & (blocksize - 1)
    ):
        raise ValueError(f"blocksize must be a power of two in [{MIN_BLOCKSIZE}, {MAX_BLOCKSIZE}], got {blocksize!r}")


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize supports {', '.join(map(str, FLOAT_DTYPES))} tensors, got {x.dtype}")


def _flat_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).to(torch.float32).contiguous()


def _flat_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """x as a (nblocks, blocksize) fp32 tensor, the last block zero-padded; and numel."""
    flat = _flat_fp32(x)
    n = flat.numel()
    pad = -n % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize), n


def _backend(device: torch.device):
    if device.type == "cpu":
        from . import native

        return native
    if device.type == "cuda":
        from .. import kernels

        return kernels
    raise NotImplementedError(f"q8 has no codec backend for device {device}")


def _checked_layout(x: torch.Tensor, blocksize: int, row_length: int | None) -> int:
    """Check a tensor to quantize and its layout; its canonical row length."""
    _check_input(x)
    _check_blocksize(blocksize)
    numel = x.numel()
    if row_length is not None:
        check_row_length(numel, row_length)
    return canonical_row_length(numel, blocksize, numel if row_length is None else row_length)


def quantize(
    x: torch.Tensor, code: str | Code = "dynamic", blocksize: int = 2048, *, row_length: int | None = None
) -> QTensor:
    """Quantize `x` blockwise to 8-bit codes plus one fp32 absmax per block.

    Args:
        x: fp32, fp16 or bf16 tensor of any shape (also empty, 0-d, non-contiguous), on
            CPU or CUDA; the result stays on that device.
        code: "dynamic" (signed), "udynamic" (non-negative data), "linear", "ulinear",
            "auto" (per tensor, the candidate of `AUTO_CODES` with the lowest relative L2
            error) or a `q8.Code`.
        blocksize: elements per block, a power of two in [64, 4096].
        row_length: blocks restart at every row of this many (row-major) elements, so none
            crosses a row; it must divide numel. `x[0].numel()` makes every slice along
            dim 0 its own run of blocks. None: the flat layout (blocks over the whole tensor).

    Returns:
        A `QTensor`. Encoding is exact nearest rounding, identical on every device.

    Raises:
        ValueError: bad blocksize, code or row_length, or `x` holds NaN/inf (named by block).
        TypeError: `x` is not a floating tensor of a supported dtype.

    Example:
        >>> qt = q8.quantize(torch.randn(1000, 300), code="dynamic", blocksize=256)
        >>> x2 = q8.dequantize(qt)
    """
    row_length = _checked_layout(x, blocksize, row_length)
    if isinstance(code, str) and code == "auto":
        return quantize_best(x, AUTO_CODES[bool((x < 0).any())], blocksize, row_length=row_length)[0]
    table = get_code(code)
    # The GPU kernels read fp16/bf16 directly (fewer bytes moved); the CPU path takes fp32.
    flat = x.detach().reshape(-1).contiguous() if x.device.type == "cuda" else _flat_fp32(x)
    codes, absmax, bad = _backend(flat.device).encode(flat, table, blocksize, row_length)
    if bad >= 0:
        per_row = -(-row_length // blocksize)
        first = bad // per_row * row_length + bad % per_row * blocksize
        last = min(first + blocksize, (bad // per_row + 1) * row_length) - 1
        raise ValueError(
            f"quantize: input has NaN or inf in block {bad} (flat elements {first}..{last}); "
            "8-bit codes cannot represent non-finite values"
        )
    return QTensor(codes, absmax, table, blocksize, x.shape, x.dtype, row_length)


_U32 = 0xFFFFFFFF


def mix32(x: int | torch.Tensor) -> int | torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32): uint32 values as Python ints or int64
    tensors. The products are taken in 16-bit halves so no int64 product overflows."""

    def mul(a, c):
        return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _U32

    x = x ^ (x >> 16)
    x = mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul(x, 0x846CA68B)
    return x ^ (x >> 16)


def rounding_key(seed: int, step: int) -> int:
    """The per-step key of `quantize_stochastic`: mix32(seed ^ mix32(step)), both 32-bit."""
    return mix32((seed & _U32) ^ mix32(step & _U32))


def quantize_stochastic(
    x: torch.Tensor, code: str | Code, blocksize: int, key: int, offset: int = 0, *, row_length: int | None = None
) -> QTensor:
    """Quantize with deterministic stochastic rounding (docs/CODEC.md): each value goes to
    one of the two table entries around it, the upper with probability equal to its
    position between them, drawn from a hash of (`key`, the element's index `offset + i`).
    Unbiased, so an EMA whose increments are below half a step still moves on average; a
    positive value never takes the code of 0.0. The rule the optimizers use for
    non-negative state (docs/OPTIMIZER_STATE.md); the fused optimizer kernels implement it too.

    Args:
        x: fp32/fp16/bf16 tensor (CPU: the compiled path; CUDA: torch ops).
        code, blocksize, row_length: as for `quantize`.
        key: 32-bit key, `rounding_key(seed, step)` for optimizer state.
        offset: index of x's first element in the whole tensor it is part of (a shard's
            start), so that the bytes do not depend on how a tensor is sharded.
    """
    row_length = _checked_layout(x, blocksize, row_length)
    table, key, flat = get_code(code), key & _U32, _flat_fp32(x)
    if x.device.type == "cpu":
        from . import native

        codes, absmax, bad = native.encode(flat, table, blocksize, row_length, key, offset)
    else:
        codes, absmax, bad = _encode_stochastic_torch(flat, table, blocksize, row_length, key, offset)
    if bad >= 0:
        raise ValueError(f"quantize_stochastic: input has NaN or inf in block {bad}")
    return QTensor(codes, absmax, table, blocksize, x.shape, x.dtype, row_length)


def _encode_stochastic_torch(
    flat: torch.Tensor, table: Code, blocksize: int, row_length: int, key: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The stochastic rounding rule in torch ops (any device) on a flat fp32 tensor in the
    row layout: codes, absmax, bad block (-1 if none)."""
    if flat.numel() == 0:
        return flat.new_empty(0, dtype=torch.uint8), flat.new_empty(0), -1
    width = -(-row_length // blocksize) * blocksize  # a row's blocks, the last zero-padded
    rows = torch.nn.functional.pad(flat.view(-1, row_length), (0, width - row_length))
    blocks = rows.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    bad = torch.nonzero(~torch.isfinite(absmax))
    if bad.numel():
        return flat.new_empty(0, dtype=torch.uint8), absmax, int(bad[0, 0])
    q = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    values = table.values.to(flat.device)
    floor = (torch.searchsorted(values, q, right=True) - 1).clamp_(0, 255)
    below = floor.clamp(max=254)
    lo, hi = values[below], values[below + 1]
    frac = (q - lo) / (hi - lo)
    row = torch.arange(rows.shape[0], device=flat.device)[:, None] * row_length
    index = (offset + row + torch.arange(width, device=flat.device)[None, :]).view_as(blocks)
    u = mix32(mix32((index & _U32) ^ key) ^ (index >> 32))
    codes = floor + (((u >> 8).float() * 2.0**-24 < frac) & (floor < 255))
    z = table.zero_index
    if z < 255:
        codes = torch.where((blocks > 0) & (codes == z), z + 1, codes)
    return codes.to(torch.uint8).view(-1, width)[:, :row_length].reshape(-1), absmax, -1


def quantize_best(
    x: torch.Tensor, candidates: Sequence[str | Code], blocksize: int = 2048, *, row_length: int | None = None
) -> tuple[QTensor, QuantError]:
    """`x` quantized with the candidate code of lowest relative L2 error (the first on ties),
    and that error: what code="auto" does over `AUTO_CODES`, for callers that also report
    the error (measured once per candidate, never again).

    Example:
        >>> qt, err = q8.codec.quantize_best(w, q8.codec.AUTO_CODES[True], 2048)
    """
    if not candidates:
        raise ValueError("quantize_best: no candidate code")
    best = None
    for code in candidates:
        qt = quantize(x, code, blocksize, row_length=row_length)
        err = quant_error(x, qt)
        if best is None or err.rel_l2 < best[1].rel_l2:
            best = qt, err
        del qt
    return best


def dequantize(qt: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode a `QTensor`: table[code] * absmax in fp32, cast to `dtype` (default: the
    original dtype), reshaped to the original shape, on the QTensor's device."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"dequantize expects a q8.QTensor, got {type(qt).__name__}")
    dtype = qt.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize can produce {FLOAT_DTYPES}, got {dtype}")
    backend = _backend(qt.device)
    if qt.device.type == "cuda":  # the kernels write fp16/bf16 directly, rounded as .to(dtype) rounds
        out = backend.decode(qt.codes, qt.absmax, qt.code, qt.blocksize, dtype, qt.row_length)
    else:
        out = backend.decode(qt.codes, qt.absmax, qt.code, qt.blocksize, qt.row_length).to(dtype)
    return out.view(qt.shape)


class QuantError(NamedTuple):
    """How far a reconstruction is from the original."""

    rel_l2: float
    """||x - x_hat||_2 / ||x||_2 (0.0 when both are zero, inf when only x is)."""
    max_abs: float
    """max |x - x_hat|."""
    snr_db: float
    """20 log10(||x|| / ||x - x_hat||); inf for an exact reconstruction."""


def quant_error(x: torch.Tensor, approx: torch.Tensor | QTensor) -> QuantError:
    """Error of `approx` (a tensor, or a QTensor decoded here) against `x`, summed in fp64.

    A CPU QTensor is measured in one compiled pass per block, without a decoded copy;
    otherwise a million elements at a time, so a large tensor never has a decoded or fp64
    copy of itself in memory (`code="auto"` and q8convert measure every candidate)."""
    if tuple(approx.shape) != tuple(x.shape):
        raise ValueError(f"quant_error: shapes differ, {tuple(x.shape)} vs {tuple(approx.shape)}")
    if isinstance(approx, QTensor) and approx.device.type == "cpu" and x.device.type == "cpu":
        from . import native

        err2, ref2, max_abs = native.block_errors(
            _flat_fp32(x), approx.codes, approx.absmax, approx.code, approx.blocksize, approx.row_length
        )
        return _error(float(err2.sum()), float(ref2.sum()), float(max_abs.max()) if max_abs.numel() else 0.0)
    flat, n = x.detach().reshape(-1), x.numel()
    if isinstance(approx, QTensor):
        # Chunks of whole blocks (flat layout) or whole rows (row layout).
        bs, row = approx.blocksize, approx.row_length
        unit, unit_blocks = (bs, 1) if row == n else (row, -(-row // bs))
        step = max(unit, _ERROR_CHUNK // unit * unit)

        def part(a: int, b: int) -> torch.Tensor:
            blocks = approx.absmax[a // unit * unit_blocks : -(-b // unit) * unit_blocks]
            rows = None if row == n else row
            return dequantize(QTensor(approx.codes[a:b], blocks, approx.code, bs, (b - a,), torch.float32, rows))
    else:
        other, step = approx.detach().reshape(-1), _ERROR_CHUNK

        def part(a: int, b: int) -> torch.Tensor:
            return other[a:b]

    err2 = ref2 = max_abs = 0.0
    ref_buf = torch.empty(min(step, n), dtype=torch.float64, device=x.device)  # reused: no page faults per chunk
    diff_buf = torch.empty_like(ref_buf)
    for a in range(0, n, step):
        b = min(a + step, n)
        ref, diff = ref_buf[: b - a].copy_(flat[a:b]), diff_buf[: b - a].copy_(part(a, b))
        ref2 += float(ref.dot(ref))
        diff.sub_(ref)
        err2 += float(diff.dot(diff))
        max_abs = max(max_abs, float(diff.abs_().max()))
    return _error(err2, ref2, max_abs)


def _error(err2: float, ref2: float, max_abs: float) -> QuantError:
    """QuantError from the sums of squared errors and of squared reference values."""
    if err2 == 0.0:
        return QuantError(0.0, max_abs, math.inf)
    err, norm = math.sqrt(err2), math.sqrt(ref2)
    rel = err / norm if norm else math.inf
    snr = 20 * math.log10(norm / err) if norm else -math.inf
    return QuantError(rel, max_abs, snr)
