"""8-bit optimizer state of sharded (DTensor, FSDP2) parameters, and its DCP layout.

Under FSDP2 (`fully_shard`, placements `(Shard(0),)` on a 1-D mesh) each rank holds a
contiguous block of rows of every parameter. q8 optimizers update that local shard only:
its 8-bit state is a `QTensor` over the local rows, cut into blocks of `blocksize`
elements starting at the shard's first element. Whether a parameter's state is 8-bit is
judged on its global size. When each shard starts at a multiple of `blocksize` in the
flattened parameter (always so when a row's length is a multiple of `blocksize`), the
blocks are exactly those of a single-process run, and so are the results, bit for bit.
Otherwise the shard boundary also ends a block: the one block straddling it becomes two,
each with its own absmax, which changes the rounding of those elements only.

`state_dict()` gives each 8-bit entry of a sharded parameter as DTensors that DCP can
save and reshard, and that a different number of ranks can load:

    <name>             uint8 codes, DTensor with the parameter's shape and placements
    <name>.absmax      fp32 DTensor (rows, K), sharded like the parameter: row i holds the
                       absmax of the blocks that row i's elements fall in, in order, zero
                       padded (K = row length / blocksize when that divides, else one more
                       than ceil(row length / blocksize), at most the row length)
    <name>.shard_rows  rows per shard of the mesh that saved it (the block layout)
    <name>.code, <name>.blocksize   as for a plain parameter

Codes reshard element by element. Loading decodes each element with its saved block's
absmax; a block of the new shard that is exactly one saved block keeps its codes and
absmax (so the same mesh reloads bit-exactly); any other block (one cut by a shard
boundary of the saving or the loading mesh) is re-encoded from the decoded values, one
more rounding step for its elements.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import torch

from ..codec import QTensor, get_code, quantize
from .fused import all_finite_local

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "all_finite",
    "check_supported",
    "first_element",
    "is_sharded",
    "like",
    "local",
    "pack_entry",
    "unpack_entry",
]


def is_sharded(p: torch.Tensor) -> bool:
    """Whether `p` is a DTensor. torch.distributed.tensor is never imported here (it takes
    seconds): a program that made a DTensor has imported it already."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(p, module.DTensor)


def local(x: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, `x` itself otherwise."""
    return x.to_local() if is_sharded(x) else x


def all_finite(grad: torch.Tensor) -> bool:
    """Whether every element of `grad` is finite; for a DTensor across all its shards (one
    all-reduce), so that every rank skips the same steps."""
    if not is_sharded(grad):
        return all_finite_local(grad)
    import torch.distributed as dist

    flag = torch.tensor(int(all_finite_local(grad.to_local())), dtype=torch.int32, device=grad.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=grad.device_mesh.get_group())
    return bool(flag)


def check_supported(opt: torch.optim.Optimizer, p: DTensor) -> None:
    """Elementwise optimizers on FSDP2's default sharding (rows over a 1-D mesh)."""
    from torch.distributed.tensor import Shard

    owner = type(opt).__name__
    if not opt.elementwise:
        raise NotImplementedError(
            f"{owner} needs whole-parameter norms; it does not support sharded (DTensor) parameters"
        )
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.dim() == 0:
        raise NotImplementedError(
            f"{owner}: sharded parameters are supported with placements (Shard(0),) on a 1-D mesh "
            f"(FSDP2's default), got {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh"
        )


def like(x: torch.Tensor, p: DTensor) -> DTensor:
    """Local tensor `x` (shaped like `p`'s local shard) as a DTensor sharded like `p`."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(x, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def row_range(rows: int, mesh_size: int, coordinate: int) -> tuple[int, int]:
    """Rows [first, end) of shard `coordinate` when `rows` are cut into `mesh_size` shards
    of ceil(rows / mesh_size) rows (torch.chunk, as DTensor's Shard(0) does)."""
    per = -(-rows // mesh_size)
    first = min(coordinate * per, rows)
    return first, min(first + per, rows)


def _geometry(p: DTensor) -> tuple[int, int, int, int]:
    """(rows, row length, first local row, rows per shard) of sharded parameter `p`."""
    rows = p.shape[0]
    inner = math.prod(p.shape[1:])
    size = p.device_mesh.size()
    first, _ = row_range(rows, size, p.device_mesh.get_local_rank())
    return rows, inner, first, -(-rows // size)


def first_element(p: DTensor) -> int:
    """Flat index, in the whole parameter, of the local shard's first element."""
    _, inner, first, _ = _geometry(p)
    return first * inner


def blocks_per_row(inner: int, blocksize: int) -> int:
    """K: the most blocks one row's elements can fall in, whatever the shard layout."""
    if inner % blocksize == 0:
        return inner // blocksize
    return min(inner, -(-inner // blocksize) + 1)


def _first_block(local_rows: torch.Tensor, inner: int, blocksize: int) -> torch.Tensor:
    """Index (within its shard) of the block holding the first element of each row, for
    rows numbered from their shard's first row."""
    return local_rows * inner // blocksize


def pack_entry(key: str, qt: QTensor, p: DTensor) -> dict:
    """The DCP layout (module docstring) of 8-bit entry `key` of sharded parameter `p`."""
    from torch.distributed.tensor import DTensor

    rows, inner, _, per = _geometry(p)
    k = blocks_per_row(inner, qt.blocksize)
    local_rows = local(p).shape[0]
    r = torch.arange(local_rows, device=qt.absmax.device)
    first = _first_block(r, inner, qt.blocksize)
    last = ((r + 1) * inner - 1) // qt.blocksize
    index = first[:, None] + torch.arange(k, device=r.device)[None, :]
    valid = index <= last[:, None]
    nblocks = qt.absmax.numel()
    absmax = torch.where(valid, qt.absmax[index.clamp(max=max(nblocks - 1, 0))] if nblocks else 0.0, 0.0)
    absmax = absmax.to(torch.float32).reshape(local_rows, k)
    return {
        key: like(qt.codes.view(local(p).shape), p),
        f"{key}.absmax": DTensor.from_local(
            absmax, p.device_mesh, p.placements, run_check=False, shape=(rows, k), stride=(k, 1)
        ),
        f"{key}.shard_rows": per,
        f"{key}.code": qt.code.name,
        f"{key}.blocksize": qt.blocksize,
    }


def unpack_entry(saved: dict, key: str, p: DTensor, blocksize: int, where: str) -> QTensor:
    """Rebuild this rank's 8-bit entry `key` of sharded parameter `p` (blocks of
    `blocksize` from the local shard's start) from the DCP layout, re-encoding only the
    blocks whose extent differs from the saved ones."""
    codes, absmax = saved[key], saved.get(f"{key}.absmax")
    shard_rows, code, saved_blocksize = (saved.get(f"{key}.{f}") for f in ("shard_rows", "code", "blocksize"))
    rows, inner, first_row, _ = _geometry(p)
    shape = local(p).shape
    if not is_sharded(codes) or codes.dtype != torch.uint8 or codes.shape != p.shape:
        raise ValueError(f"{where}: codes must be a uint8 DTensor of shape {tuple(p.shape)}, got {_describe(codes)}")
    if not is_sharded(absmax) or absmax.dtype != torch.float32 or absmax.dim() != 2 or absmax.shape[0] != rows:
        raise ValueError(f"{where}: absmax must be a float32 DTensor with {rows} rows, got {_describe(absmax)}")
    if not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"{where}: shard_rows must be a positive int, got {shard_rows!r}")
    if saved_blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"{where}: bad blocksize {saved_blocksize!r}")
    if absmax.shape[1] != blocks_per_row(inner, saved_blocksize):
        raise ValueError(
            f"{where}: absmax has {absmax.shape[1]} blocks per row, expected "
            f"{blocks_per_row(inner, saved_blocksize)} for rows of {inner} and blocksize {saved_blocksize}"
        )
    table = get_code(code)
    codes, absmax = local(codes), local(absmax)
    if absmax.shape[0] != shape[0]:
        raise ValueError(f"{where}: absmax holds {absmax.shape[0]} local rows, the shard has {shape[0]}")
    if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
        raise ValueError(f"{where}: absmax holds negative or non-finite values")

    def saved_block(e: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """For local flat element indices `e`: local row, saved shard, block within that
        shard, and the block's slot in its row's absmax."""
        row = e // inner
        shard, row_in_shard = (first_row + row).div(shard_rows, rounding_mode="floor"), (first_row + row) % shard_rows
        block = (row_in_shard * inner + e % inner) // saved_blocksize
        return row, shard, block, block - _first_block(row_in_shard, inner, saved_blocksize)

    # A block of this shard is kept as saved iff it is exactly one saved block.
    n = codes.numel()
    starts = torch.arange(0, n, blocksize, device=codes.device)
    last = (starts + blocksize).clamp(max=n) - 1
    row, shard, block, slot = saved_block(starts)
    _, last_shard, last_block, _ = saved_block(last)
    shard_numel = (rows - shard * shard_rows).clamp(max=shard_rows) * inner
    saved_len = (shard_numel - block * saved_blocksize).clamp(max=saved_blocksize)
    kept = (shard == last_shard) & (block == last_block) & (last - starts + 1 == saved_len)
    kept &= saved_blocksize == blocksize
    kept_absmax = absmax[row, slot]
    if bool(kept.all()):  # the same blocks as saved (e.g. the same number of ranks): bit-exact
        return QTensor(codes.reshape(-1), kept_absmax, table, blocksize, shape, torch.float32)

    # Otherwise decode every element with its saved block's absmax and re-encode on this
    # shard's blocks, keeping the saved bytes of the blocks that are unchanged.
    row, _, _, slot = saved_block(torch.arange(n, device=codes.device))
    element_absmax = absmax[row, slot]
    flat_codes = codes.reshape(-1)
    if bool(element_absmax.eq(0).logical_and(flat_codes.ne(table.zero_index)).any()):
        raise ValueError(f"{where}: codes index a block whose absmax is missing (zero padding)")
    values = table.values.to(codes.device)[flat_codes.long()] * element_absmax
    qt = quantize(values.view(shape), table, blocksize)
    keep_element = kept.repeat_interleave(last - starts + 1)
    return QTensor(
        torch.where(keep_element, flat_codes, qt.codes),
        torch.where(kept, kept_absmax, qt.absmax),
        table,
        blocksize,
        shape,
        torch.float32,
    )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{type(x).__name__} {x.dtype} {tuple(x.shape)}"
    return type(x).__name__
