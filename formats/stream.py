"""Decoding a tensor straight into its output, range by range, on several threads.

A tensor stored as byte planes, 8-bit codes or compressed raw bytes is read in ranges of
at least 1 MiB of each segment (a whole number of Huffman chunks and quantization blocks):
each range's bytes are read from the file with `pread` (no memory map grows the resident
set) and decoded into small buffers, then combined into the output (planes joined, codes
dequantized). The extra memory is a few buffers per thread, not a copy of the tensor.
Ranges run on `torch.get_num_threads()` threads; zstd frames, which only decode in order,
are decoded by the calling thread ahead of each batch of ranges.

The checks are those of reading a segment whole (`Reader._segment`): every stored byte is
checksummed where it is read and the pieces are combined into the segment's CRC-32, Huffman
chunks and zstd frames are validated as they decode, and a mismatch raises once the ranges
are done (the output is then dropped).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

import torch
import zstandard

from . import _planes
from .planes import _map, crc32, huffman_decode_chunk, huffman_layout

__all__ = ["HuffmanSource", "RawSource", "ZstdSource", "ZstdStream", "decode_ranges", "pread"]

MIN_RANGE = 1 << 20  # bytes of each segment per range (a power of two)
POOL_BYTES = 64 << 20
"""Decode buffers kept for the next load: without them every tensor's buffers come and go,
and glibc, whose mmap threshold rises once such a buffer is freed, serves the next ones from
its heap and keeps what they leave there (a 128 MB load peaked 8% higher)."""

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16
Error = Callable[[str], Exception]
Read = Callable[[torch.Tensor, int], None]
"""read(out, offset): fill the uint8 tensor `out` with the file's bytes at `offset`."""


def pread(fd: int, outs: list[torch.Tensor], offset: int, error: Error) -> None:
    """Fill the uint8 tensors `outs`, one after another, with the file's bytes from
    `offset` on (one `preadv` for all of them, where the file system allows)."""
    views, i = [memoryview(out.numpy()) for out in outs if out.numel()], 0
    while i < len(views):
        got = os.preadv(fd, views[i : i + _IOV_MAX], offset)
        if got <= 0:
            raise error(f"file ends at {offset} while reading it (truncated meanwhile?)")
        offset += got
        while i < len(views) and got >= views[i].nbytes:
            got -= views[i].nbytes
            i += 1
        if got:
            views[i] = views[i][got:]


class _Pool:
    """uint8 buffers by size, kept up to `POOL_BYTES` in all, shared by the loading threads."""

    def __init__(self, limit: int) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._held, self._limit, self._lock = 0, limit, threading.Lock()

    def take(self, size: int) -> torch.Tensor:
        with self._lock:
            if free := self._free.get(size):
                self._held -= size
                return free.pop()
        return torch.empty(size, dtype=torch.uint8)

    def give(self, bufs: list[torch.Tensor]) -> None:
        with self._lock:
            for buf in bufs:
                if self._held + buf.numel() <= self._limit:
                    self._free.setdefault(buf.numel(), []).append(buf)
                    self._held += buf.numel()


_POOL = _Pool(POOL_BYTES)


class _Checksummed:
    """CRC-32 pieces of a segment, checksummed on any thread, combined in file order."""

    def __init__(self, crc: int, error: Error) -> None:
        self._crc, self._error = crc, error
        self._pieces: dict[int, tuple[int, int]] = {}  # position -> (crc, length)

    def add(self, pos: int, data: torch.Tensor) -> None:
        self._pieces[pos] = (crc32(data.numpy()), data.numel())

    def check(self, offset: int) -> None:
        crc, end = 0, 0
        for pos in sorted(self._pieces):
            piece, length = self._pieces[pos]
            assert pos == end  # the ranges cover the segment
            crc, end = _planes.crc32_combine(crc, piece, length), end + length
        if crc != self._crc:
            raise self._error(f"checksum mismatch in segment at {offset} (file corrupt)")


class RawSource:
    """An uncompressed segment, read range by range."""

    sequential = False
    granule = 1

    def __init__(self, read: Read, seg: tuple[int, int, int, int, int], error: Error) -> None:
        self.read, self.offset, self.error = read, seg[0], error
        self.crc = _Checksummed(seg[4], error)

    def fill(self, b0: int, b1: int, buf: torch.Tensor) -> None:
        self.read(buf[: b1 - b0], self.offset + b0)
        self.crc.add(b0, buf[: b1 - b0])

    def check(self) -> None:
        self.crc.check(self.offset)


class HuffmanSource(RawSource):
    """A Huffman (compression 2) segment: a range's chunks are read in one piece and decoded."""

    def __init__(self, read: Read, seg: tuple[int, int, int, int, int], error: Error) -> None:
        super().__init__(read, seg, error)

        def header(pos: int, n: int) -> bytes:
            data = torch.empty(n, dtype=torch.uint8)
            read(data, self.offset + pos)
            self.crc.add(pos, data)
            return data.numpy().tobytes()

        chunks = huffman_layout(header, seg[1], seg[2])
        if isinstance(chunks, str):
            raise error(chunks)
        self.chunks = chunks
        # ranges hold whole chunks: a multiple of the chunk size (a single chunk: all of it)
        self.granule = chunks[0][3] if len(chunks) > 1 else 1 << (seg[2] - 1).bit_length()

    def fill(self, b0: int, b1: int, buf: torch.Tensor) -> None:
        k0, k1 = b0 // self.granule, min(len(self.chunks), -(-b1 // self.granule))
        first, last = self.chunks[k0], self.chunks[k1 - 1]
        n = last[0] + last[1] - first[0]
        whole = _POOL.take(1 << (n - 1).bit_length())  # powers of two: buffers fit other ranges
        try:
            stored = whole[:n]
            self.read(stored, self.offset + first[0])
            self.crc.add(first[0], stored)
            src = stored.numpy()
            for pos, size, i0, count in self.chunks[k0:k1]:
                if not huffman_decode_chunk(src[pos - first[0] :], size, buf[i0 - b0 :], count):
                    raise self.error("Huffman chunk is malformed")
        finally:
            _POOL.give([whole])


class ZstdStream:
    """One zstd frame decoded in order into buffers, to exactly `raw` bytes: a frame whose
    header or output disagrees with `raw` is refused as soon as it does (the output never
    grows, and decoding stops one byte past `raw`)."""

    def __init__(self, view: memoryview, raw: int, max_ratio: int, max_window: int, error: Error) -> None:
        self.raw, self.pos, self.error = raw, 0, error
        try:
            params = zstandard.get_frame_parameters(view)
        except zstandard.ZstdError as e:
            raise error(f"bad zstd segment: {e}") from None
        if params.content_size != raw:
            raise error(f"zstd frame holds {params.content_size} bytes, index says {raw}")
        if raw > max_ratio * view.nbytes:
            raise error(f"zstd segment of {view.nbytes} bytes cannot hold {raw} bytes")
        decompressor = zstandard.ZstdDecompressor(max_window_size=max_window)
        self._reader = decompressor.stream_reader(view, read_across_frames=False)

    def readinto(self, out: torch.Tensor) -> None:
        """Decode the next `out.numel()` bytes into `out`."""
        dst, pos = memoryview(out.numpy()), 0
        try:
            while pos < dst.nbytes and (n := self._reader.readinto(dst[pos:])):
                pos += n
        except zstandard.ZstdError as e:
            raise self.error(f"bad zstd segment: {e}") from None
        self.pos += pos
        if pos != dst.nbytes:
            raise self.error(f"zstd segment decodes to {self.pos} bytes, expected {self.raw}")

    def finish(self) -> None:
        """Raise unless the frame ended exactly at `raw` bytes."""
        try:
            trailing = self._reader.read(1)
        except zstandard.ZstdError as e:
            raise self.error(f"bad zstd segment: {e}") from None
        if trailing:
            raise self.error(f"zstd segment decodes to more than {self.raw} bytes")


class ZstdSource:
    """A zstd segment (checksummed whole first: it is small), decoded in order."""

    sequential = True
    granule = 1

    def __init__(self, stream: ZstdStream) -> None:
        self.stream = stream

    def fill(self, b0: int, b1: int, buf: torch.Tensor) -> None:
        self.stream.readinto(buf[: b1 - b0])

    def check(self) -> None:
        self.stream.finish()


Source = RawSource | ZstdSource


def decode_ranges(sources: list[Source], n: int, combine: Callable[[int, int, list[torch.Tensor]], None]) -> None:
    """Decode bytes [0, n) of every source (segments of n bytes each) range by range into
    per-range buffers and call `combine(b0, b1, buffers)` for each range, on several
    threads; then check every source (checksums, zstd ends).

    Without zstd sources the ranges flow through the threads with no barrier, each thread
    taking a free set of buffers; a zstd frame only decodes in order, so then the calling
    thread decodes it for a batch of ranges (one per thread) before the batch runs."""
    step = max(MIN_RANGE, *(s.granule for s in sources))  # powers of two: a multiple of each
    ranges = [(b, min(b + step, n)) for b in range(0, n, step)]
    workers = max(1, min(torch.get_num_threads(), len(ranges)))
    size = min(step, n)
    owned = [_POOL.take(1 << (size - 1).bit_length()) for _ in range(workers * len(sources))]
    free: queue.SimpleQueue = queue.SimpleQueue()
    for w in range(workers):  # at most `workers` ranges run at once: a set never waits
        free.put([buf[:size] for buf in owned[w * len(sources) : (w + 1) * len(sources)]])

    def work(r: tuple[int, int], bufs: list[torch.Tensor] | None = None) -> None:
        b0, b1 = r
        mine = bufs or free.get()
        try:
            for source, buf in zip(sources, mine, strict=True):
                if not source.sequential:
                    source.fill(b0, b1, buf)
            combine(b0, b1, mine)
        finally:
            if bufs is None:
                free.put(mine)

    try:
        sequential = [j for j, s in enumerate(sources) if s.sequential]
        if not sequential:
            _map(work, ranges, n * len(sources))
        else:
            sets = [free.get() for _ in range(workers)]
            for start in range(0, len(ranges), workers):
                batch = ranges[start : start + workers]
                for j in sequential:
                    for (b0, b1), bufs in zip(batch, sets, strict=False):
                        sources[j].fill(b0, b1, bufs[j])
                _map(lambda k, batch=batch: work(batch[k], sets[k]), list(range(len(batch))), len(batch) * step)
        for source in sources:
            source.check()
    finally:
        _POOL.give(owned)
