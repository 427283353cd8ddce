"""The block layout of the codec (docs/CODEC.md): which elements form block b.

A tensor of `numel` elements is seen, in row-major order, as `numel / row_length` rows of
`row_length` elements. Each row is cut into `ceil(row_length / blocksize)` blocks, the last
one of a row possibly shorter, so no block ever crosses a row. With one row (`row_length ==
numel`) this is the flat layout: `ceil(numel / blocksize)` blocks over the whole tensor. q8's
8-bit optimizer state uses one row per slice along dim 0, so that no split of a parameter
into whole rows (FSDP2's `Shard(0)`) ever cuts a block.
"""

from __future__ import annotations

__all__ = ["canonical_row_length", "check_row_length", "num_blocks"]


def num_blocks(numel: int, blocksize: int, row_length: int) -> int:
    """Blocks of the layout: rows times blocks per row (0 for an empty tensor)."""
    return 0 if numel == 0 else numel // row_length * -(-row_length // blocksize)


def check_row_length(numel: int, row_length: int) -> None:
    """ValueError unless `row_length` is `numel` (one row) or a positive int dividing it."""
    if not isinstance(row_length, int) or isinstance(row_length, bool):
        raise ValueError(f"row_length must be an int, got {row_length!r}")
    if row_length != numel and (row_length < 1 or numel % row_length):
        raise ValueError(f"row_length must be a positive int dividing the {numel} elements, got {row_length!r}")


def canonical_row_length(numel: int, blocksize: int, row_length: int) -> int:
    """`row_length` where rows really cut blocks, else `numel`: when a row is a whole number
    of blocks (or the only row) the row layout and the flat layout are the same blocks."""
    return row_length if numel > row_length and row_length % blocksize else numel
