"""Sharded (DTensor, FSDP2) parameters: which placements q8 optimizers take, and the
DTensor form of their state.

Under FSDP2 (`fully_shard`: placements `(Shard(0),)` on a 1-D mesh) each rank holds whole
rows of every parameter: rows [first, first + ceil(rows / ranks)) on each rank, the last
ranks possibly fewer or none. 8-bit state is quantized in the row layout (docs/CODEC.md):
no block crosses a row, so a shard's blocks are exactly the single process's blocks of
those rows, and every rank computes the bytes one process would (docs/OPTIMIZER_STATE.md).
Its state dict entries are DTensors placed like the parameter: codes shaped like it, absmax
`(rows, K)` split on the same rows, so DCP saves and reshards them as it does any tensor.
Other placements (a 2-D mesh as in HSDP, `Shard(1)`, `Replicate`) are refused when the
parameter joins the optimizer.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "all_finite",
    "check_supported",
    "first_element",
    "is_sharded",
    "like",
    "local",
    "local_rows",
    "shard_group",
]


def is_sharded(p: torch.Tensor) -> bool:
    """Whether `p` is a DTensor. torch.distributed.tensor is never imported here (it takes
    seconds): a program that made a DTensor has imported it already."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(p, module.DTensor)


def local(x: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, `x` itself otherwise."""
    return x.to_local() if is_sharded(x) else x


def shard_group(p: torch.Tensor):
    """The process group over which `p` is sharded; None for a plain tensor."""
    return p.device_mesh.get_group() if is_sharded(p) else None


def all_finite_local(t: torch.Tensor) -> bool:
    """Whether every element of `t` is finite. One vectorised sum (a tenth of the cost of
    torch.isfinite(t).all() on CPU), and the exact test only when the sum is not finite
    (a NaN/inf element, or finite values whose sum overflows)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def all_finite(grad: torch.Tensor) -> bool:
    """Whether every element of `grad` is finite; for a DTensor across all its shards (one
    all-reduce), so that every rank skips the same steps."""
    if not is_sharded(grad):
        return all_finite_local(grad)
    import torch.distributed as dist

    flag = torch.tensor(int(all_finite_local(grad.to_local())), dtype=torch.int32, device=grad.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=shard_group(grad))
    return bool(flag)


def check_supported(owner: str, p: DTensor, where: str) -> None:
    """NotImplementedError naming parameter `where` unless it is sharded by whole rows over
    a 1-D mesh (FSDP2's default), the one placement whose shards never cut a block."""
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.dim() == 0:
        raise NotImplementedError(
            f"{owner}: {where} (shape {tuple(p.shape)}) is placed {tuple(p.placements)} on a "
            f"{p.device_mesh.ndim}-D mesh; q8 optimizers take sharded parameters with placements "
            "(Shard(0),) on a 1-D mesh (FSDP2's default), where every shard holds whole rows"
        )


def like(x: torch.Tensor, p: DTensor, shape: tuple[int, ...] | None = None) -> DTensor:
    """Local tensor `x` as a DTensor sharded like `p`: shaped like `p`, or `shape` (same
    number of rows, split on the same rows, contiguous)."""
    from torch.distributed.tensor import DTensor

    if shape is None:
        return DTensor.from_local(x, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(x, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def _row_range(p: DTensor) -> tuple[int, int]:
    """(first row, rows) of this rank's shard of `p` (Shard(0) on a 1-D mesh, cut as
    torch.chunk cuts)."""
    rows, size = p.shape[0], p.device_mesh.size()
    per = -(-rows // size)
    first = min(p.device_mesh.get_local_rank() * per, rows)
    return first, min(per, rows - first)


def local_rows(x: torch.Tensor, p: DTensor) -> torch.Tensor:
    """This rank's rows of `x`: the local shard of a DTensor, or the rows of the full
    tensor `x` that `p`'s shard holds."""
    if is_sharded(x):
        return x.to_local()
    return x.narrow(0, *_row_range(p))


def first_element(p: DTensor) -> int:
    """Flat index, in the whole parameter, of this rank's first element: stochastic
    rounding is keyed by global indices, so any sharding gives the same bytes."""
    return _row_range(p)[0] * math.prod(p.shape[1:])
