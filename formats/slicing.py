"""`get_slice`: part of a stored tensor, reading only the bytes it needs where the encoding
allows (safetensors' `get_slice`).

A slice is read by whole rows along dim 0 (every row the index touches, then the index is
applied to those rows), which is what loading one shard of a tensor-parallel weight needs:

- raw segments (exact tensors stored uncompressed): only the bytes of those rows are read,
  straight from the memory map;
- 8-bit codes: the codes of whole blocks covering those rows (rows of 8-bit optimizer
  state are whole blocks), and the absmax segment, which is small, in full;
- entropy-coded segments (Huffman or zstd: the exponent plane of a float tensor stored
  losslessly, compressed codes): no random access inside them, so each is decoded in full
  once per slice; the planes stored raw are still read only where needed.

Bytes read this way bypass the segment's checksum, which covers the whole segment:
`get_tensor` and `q8.verify` check it. Values decoding relies on (absmax, bool bytes) are
checked as `get_tensor` checks them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..codec import QTensor
from .checkpoints import safetensors_dtype
from .container import PLANE_WIDTH, Reader, blockwise_problem, bool_problem, dtype_name
from .planes import join

__all__ = ["TensorSlice"]


class TensorSlice:
    """One tensor of an open q8 file, read in parts: `get_shape()`, `get_dtype()` and
    indexing (ints, slices with any step, `...`, as on a tensor).

    Example:
        >>> with q8.safe_open("m.q8", framework="pt") as f:
        ...     rows = f.get_slice("embed.weight")[1000:2000]  # reads about those rows only
    """

    def __init__(self, reader: Reader, name: str) -> None:
        self._reader, self._name = reader, name
        self._rec = reader.record(name)

    def get_shape(self) -> list[int]:
        return list(self._rec["shape"])

    def get_dtype(self) -> str:
        """safetensors' name of the dtype ("F32", "BF16", ...), or q8's for those it lacks."""
        return safetensors_dtype(self._rec["dtype"]) or dtype_name(self._rec["dtype"])

    def __len__(self) -> int:
        shape = self._rec["shape"]
        if not shape:
            raise TypeError("len() of a 0-d tensor")
        return shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        shape = self._rec["shape"]
        index = index if isinstance(index, tuple) else (index,)
        if not shape:
            return self._rows(0, 1)[index]
        if not index or index[0] is Ellipsis:
            return self._rows(0, shape[0])[index]
        first, rest = index[0], index[1:]
        if isinstance(first, int) and not isinstance(first, bool):
            if not -shape[0] <= first < shape[0]:
                raise IndexError(f"index {first} is out of bounds for dimension 0 with size {shape[0]}")
            row = first % shape[0]
            return self._rows(row, row + 1)[(0, *rest)]
        if not isinstance(first, slice):
            raise TypeError(f"get_slice takes ints, slices and ..., got {type(first).__name__}")
        start, stop, step = first.indices(shape[0])
        if step <= 0:
            raise ValueError("get_slice: step must be greater than zero (as in torch indexing)")
        picked = range(start, stop, step)
        if not picked:
            return self._rows(0, 0)[(slice(None), *rest)]
        return self._rows(picked[0], picked[-1] + 1)[(slice(None, None, step), *rest)]

    def _rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) along dim 0, decoded, shaped (r1 - r0, *shape[1:]), on the reader's device."""
        rec, reader, name = self._rec, self._reader, self._name
        shape, dtype = rec["shape"], rec["dtype"]
        row = math.prod(shape[1:]) if shape else 1
        s, e = r0 * row, r1 * row
        segments = rec["segments"]
        if rec["encoding"] == "blockwise":
            out = self._blockwise(s, e)
        elif rec["encoding"] == "planes":
            width = PLANE_WIDTH[dtype]
            n = dtype.itemsize // width  # bytes of each plane per element
            planes = [reader.segment_bytes(seg, s * n, e * n, name).contiguous() for seg in segments]
            out = torch.empty((e - s) * dtype.itemsize, dtype=torch.uint8)
            join(planes, out, width, 0, (e - s) * n)
            out = out.view(dtype)
        else:
            data = reader.segment_bytes(segments[0], s * dtype.itemsize, e * dtype.itemsize, name)
            if dtype == torch.bool and (problem := bool_problem(data)):
                raise reader.error(problem, name)
            out = data.view(dtype)
        out = out.view(r1 - r0, *shape[1:]) if shape else out.view(())
        return out if reader.device.type == "cpu" else out.to(reader.device)

    def _blockwise(self, s: int, e: int) -> torch.Tensor:
        """Elements [s, e) of 8-bit codes: decode whole blocks around them (whole rows of the
        codec's layout, if it has rows), then cut."""
        rec, reader, name = self._rec, self._reader, self._name
        numel, blocksize, row_length = math.prod(rec["shape"]), rec["blocksize"], rec["row_length"]
        if row_length == numel:  # flat layout: blocks of blocksize over the whole tensor
            b0, b1 = s // blocksize, -(-e // blocksize)
            begin, end = b0 * blocksize, min(b1 * blocksize, numel)
        else:  # rows of row_length, each cut into blocks: whole rows
            per_row = -(-row_length // blocksize)
            q0, q1 = s // row_length, -(-e // row_length)
            b0, b1 = q0 * per_row, q1 * per_row
            begin, end = q0 * row_length, q1 * row_length
        codes = reader.segment_bytes(rec["segments"][0], begin, end, name).contiguous()
        absmax = reader._segment(rec["segments"][1], name).view(torch.float32)[b0:b1]
        if problem := blockwise_problem(absmax, rec["code"], rec["dtype"]):
            raise reader.error(problem, name)
        sub_rows = row_length if row_length != numel else end - begin
        qt = QTensor(codes, absmax, rec["code"], blocksize, (end - begin,), rec["dtype"], sub_rows)
        return qt.dequantize()[s - begin : e - begin]
