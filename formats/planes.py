"""Byte planes and their entropy coder: the lossless float path of docs/FORMAT.md.

`byte_plane` / `join`: each float component (w bytes, little-endian) is rotated left
by one bit, so its top byte is exactly the exponent (fp32/bf16/fp64) and the sign lands
in the lowest bit; byte j of every component is gathered into plane j (a writer takes
the planes one at a time: its extra memory is one plane, not a copy of the tensor). Only the exponent
plane compresses, and grouping it lets an entropy coder see it alone.

`crc32`: the format's checksum (zlib's CRC-32), 5x zlib's speed where the CPU has
carry-less multiplies; `_planes.crc32_combine` joins the CRCs of pieces checksummed apart.

`huffman_encode` / `huffman_decode`: compression 2, canonical Huffman per 1 MiB chunk,
within about 1% of the order-0 entropy (zstd's literal coder lands about 10% above it on
exponent planes, and is several times slower). The loops are compiled (`_planes.c`; the
decoder reads up to 4 symbols per table lookup, ~3 GB/s per thread on an exponent plane)
and run on `torch.get_num_threads()` threads.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import Executor, wait

import numpy
import torch

from ..codec.native import _pool
from . import _planes

__all__ = [
    "HUFFMAN_CHUNK",
    "byte_plane",
    "crc32",
    "huffman_decode",
    "huffman_decode_chunk",
    "huffman_encode",
    "huffman_layout",
    "join",
    "map_all",
]

_MIN_PARALLEL = 1 << 20

crc32 = _planes.crc32 if _planes.CRC_CLMUL else zlib.crc32
"""crc32(data, crc=0): zlib.crc32's value (the format's checksum), with PCLMULQDQ on x86-64."""
HUFFMAN_CHUNK = 1 << 20
_HUF_MAX_HEADER = 142
MIN_CHUNK_LOG2, MAX_CHUNK_LOG2 = 12, 24


def _map(fn, items: list, n: int) -> list:
    """fn over items, on several threads when the work (n bytes) is large enough."""
    workers = max(1, min(torch.get_num_threads(), n // _MIN_PARALLEL, len(items)))
    return [fn(i) for i in items] if workers == 1 else map_all(_pool(workers), fn, items)


def map_all(executor: Executor, fn, items: list) -> list:
    """[fn(item) for item in items] on `executor`. Unlike `executor.map`, an exception is
    raised only once every call has ended: none still reads a file or writes a buffer that
    the caller frees or changes as soon as it sees the error."""
    futures = [executor.submit(fn, item) for item in items]
    wait(futures)
    return [f.result() for f in futures]


def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    step = max(1, -(-n // parts))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def byte_plane(x: torch.Tensor, width: int, j: int) -> torch.Tensor:
    """uint8[n]: byte j of each rotated `width`-byte component of the contiguous tensor x."""
    src = x.reshape(-1).view(torch.uint8)
    n = src.numel() // width
    plane = torch.empty(n, dtype=torch.uint8)
    _map(lambda r: _planes.plane(src.data_ptr(), plane.data_ptr(), width, j, *r), _ranges(n, 8), n * width)
    return plane


def join(planes: list[torch.Tensor], out: torch.Tensor, width: int, i0: int, i1: int) -> None:
    """Inverse of `byte_plane` for components [i0, i1): `planes[j]` holds byte j of those
    components (its first i1 - i0 bytes), written into the uint8 tensor `out` that holds the
    whole tensor's bytes. On the calling thread (the loop releases the GIL)."""
    assert all(p.numel() >= i1 - i0 and p.is_contiguous() for p in planes) and out.numel() >= i1 * width
    _planes.join(tuple(p.data_ptr() - i0 for p in planes), out.data_ptr(), width, i0, i1)


def huffman_encode(data: torch.Tensor, min_saving: float = 0.0) -> list | None:
    """Compression 2 of a flat uint8 tensor, as the buffers to write one after another: u32
    chunk size and u32 encoded size per chunk, then the chunks (each Huffman coded, or
    stored as is when coding does not save `min_saving` of it: such chunks are given up
    after counting their bytes). None when the whole would not be smaller than the input."""
    data = data.contiguous()
    n = data.numel()
    chunks = [(i, min(i + HUFFMAN_CHUNK, n)) for i in range(0, n, HUFFMAN_CHUNK)]
    encoded = _map(lambda r: _encode_chunk(data, *r, min_saving), chunks, n)
    sizes = [e.nbytes for e in encoded]
    if 4 + 4 * len(sizes) + sum(sizes) >= n:
        return None
    return [struct.pack(f"<I{len(sizes)}I", HUFFMAN_CHUNK, *sizes), *encoded]


def _encode_chunk(data: torch.Tensor, i0: int, i1: int, min_saving: float) -> numpy.ndarray:
    """One chunk, Huffman coded or (when that does not save enough) a view of the input."""
    dst = torch.empty(i1 - i0 + _HUF_MAX_HEADER + 8, dtype=torch.uint8)  # + 8: the encoder's slack
    limit = math.ceil((i1 - i0) * (1 - min_saving))
    size = _planes.huff_encode(data.data_ptr() + i0, i1 - i0, dst.data_ptr(), limit)
    if size == -2:  # pragma: no cover - an encoder bug, never a data property
        raise RuntimeError("q8 Huffman encoder wrote an unexpected size")
    return (data[i0:i1] if size < 0 else dst[:size]).numpy()


def huffman_layout(read: Callable[[int, int], bytes], stored_length: int, raw_length: int) -> list[tuple] | str:
    """The chunks of a compression-2 segment of `stored_length` bytes that decodes to
    `raw_length` bytes, as (position in the segment, stored size, output offset, output
    size), or a message saying what is malformed. `read(pos, n)` returns bytes of the
    segment (only its header is read). Checks that the stored bytes can hold `raw_length`
    (every chunk is at least 1/8 of its input) before the caller allocates anything."""
    if stored_length < 4:
        return "Huffman segment shorter than its header"
    (chunk,) = struct.unpack("<I", read(0, 4))
    if chunk & (chunk - 1) or not 1 << MIN_CHUNK_LOG2 <= chunk <= 1 << MAX_CHUNK_LOG2:
        return f"Huffman chunk size {chunk} is not a power of two in [2^{MIN_CHUNK_LOG2}, 2^{MAX_CHUNK_LOG2}]"
    nchunks = -(-raw_length // chunk)
    pos = 4 + 4 * nchunks
    if raw_length > 8 * stored_length or pos > stored_length:
        return f"Huffman segment of {stored_length} bytes cannot hold {raw_length} bytes"
    sizes = struct.unpack(f"<{nchunks}I", read(4, 4 * nchunks))
    if pos + sum(sizes) != stored_length:
        return "Huffman chunk sizes do not add up to the segment size"
    chunks = []
    for k, size in enumerate(sizes):
        i0 = k * chunk
        chunks.append((pos, size, i0, min(i0 + chunk, raw_length) - i0))
        pos += size
    return chunks


def huffman_decode_chunk(src: numpy.ndarray, size: int, out: torch.Tensor, n: int) -> bool:
    """Decode one chunk of `size` stored bytes (the start of `src`) into the first `n`
    bytes of the uint8 tensor `out`; False if it is malformed."""
    if size == n:  # stored as is
        out[:n].numpy()[:] = src[:n]
        return True
    return size < n and _planes.huff_decode(src.ctypes.data, size, out.data_ptr(), n) == 0


def huffman_decode(stored: memoryview, raw_length: int) -> torch.Tensor | str:
    """Decode compression 2 into a new uint8 tensor of `raw_length` bytes, or return a
    message saying what is malformed (checked before allocating: `huffman_layout`)."""
    chunks = huffman_layout(lambda pos, n: stored[pos : pos + n], stored.nbytes, raw_length)
    if isinstance(chunks, str):
        return chunks
    out = torch.empty(raw_length, dtype=torch.uint8)
    src = numpy.frombuffer(stored, dtype=numpy.uint8)  # numpy: read-only buffers are fine

    def decode(job: tuple[int, int, int, int]) -> bool:
        pos, size, i0, n = job
        return huffman_decode_chunk(src[pos : pos + size], size, out[i0:], n)

    if not all(_map(decode, chunks, raw_length)):
        return "Huffman chunk is malformed"
    return out
