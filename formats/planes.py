"""Byte planes: the lossless float transform of the "planes" encoding (docs/FORMAT.md).

Each float component (w bytes, little-endian) is rotated left by one bit, so its top byte
is exactly the exponent (fp32/bf16/fp64's high byte) and the sign lands in the lowest
bit; then byte j of every component is gathered into plane j. Only the exponent plane
compresses well, and grouping it lets zstd see it alone. The loops are compiled
(`_planes.c`) and run on `torch.get_num_threads()` threads.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch

from . import _planes

__all__ = ["from_planes", "to_planes"]

_MIN_PARALLEL = 1 << 20


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="q8-planes")


def _parallel(fn, src: torch.Tensor, dst: torch.Tensor, width: int, n: int) -> None:
    workers = max(1, min(torch.get_num_threads(), n // _MIN_PARALLEL))
    step = -(-n // workers) if n else 0
    ranges = [(i, min(i + step, n)) for i in range(0, n, step)] if n else []
    args = [(src.data_ptr(), dst.data_ptr(), width, n, i0, i1) for i0, i1 in ranges]
    if len(args) <= 1:
        for a in args:
            fn(*a)
        return
    list(_pool(workers).map(lambda a: fn(*a), args))


def to_planes(x: torch.Tensor, width: int) -> torch.Tensor:
    """(width, n) uint8: plane j holds byte j of each rotated `width`-byte component of x."""
    src = x.detach().contiguous().reshape(-1).view(torch.uint8)
    n = src.numel() // width
    planes = torch.empty(width, n, dtype=torch.uint8)
    _parallel(_planes.split, src, planes, width, n)
    return planes


def from_planes(planes: torch.Tensor, width: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """Inverse of `to_planes` for a (width, n) uint8 tensor: a new tensor of `dtype`, `shape`."""
    planes = planes.contiguous()
    n = planes.shape[1]
    out = torch.empty(n * width, dtype=torch.uint8)
    _parallel(_planes.join, planes, out, width, n)
    return out.view(dtype).view(shape)
