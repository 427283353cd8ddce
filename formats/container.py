"""The q8 container: streaming `Writer` and random-access `Reader` of one file (docs/FORMAT.md).

Layout: a 16-byte header, 64-byte aligned data segments written one tensor at a time, a
msgpack index, and a 32-byte footer that points at the index. Every segment and the index
carry a CRC-32 that the reader checks; every offset, length and size read from a file is
validated before use, and anything wrong raises `FormatError` naming the file and tensor.
"""

from __future__ import annotations

import array
import io
import math
import mmap
import os
import struct
import sys
import threading
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import numpy
import torch
import zstandard

from ..codec import Code, QTensor, get_code, quantize
from ..codec.blockwise import FLOAT_DTYPES, _check_blocksize
from ..codec.layout import num_blocks
from ..codec.native import decode_range
from .atomic import TempFile, fsync_dir, start_writeback
from .dtypes import DTYPES, PLANE_WIDTH, dtype_name
from .planes import byte_plane, crc32, huffman_decode, huffman_encode, join, map_all
from .stream import HuffmanSource, RawSource, ZstdSource, ZstdStream, decode_ranges, pread

__all__ = ["FORMAT_VERSION", "MAGIC", "BytesWriter", "FormatError", "Reader", "Writer", "code_nbytes", "stored_nbytes"]

MAGIC = b"\x89Q8F\r\n\x1a\n"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sII")  # magic, version, reserved (0)
FOOTER = struct.Struct("<QQII8s")  # index offset, index length, index crc32, version, magic
ALIGN = 64
ROW_BLOCKWISE = "blockwise_rows"
"""Encoding of 8-bit codes whose blocks restart at every row (docs/FORMAT.md): a name that
readers before it reject, since they would decode such a record with flat blocks."""
RAW, ZSTD, HUFFMAN = 0, 1, 2  # segment compression
MAX_NDIM = 64
MAX_BYTES = 1 << 62
MAX_INDEX_BYTES = 1 << 30
MAX_NAME_BYTES = 1 << 16
MAX_ZSTD_RATIO = 1 << 15  # a zstd block regenerates at most 128 KiB and takes at least 4 bytes (RLE)
MAX_ZSTD_WINDOW = 1 << 27  # zstd's default limit: the decoder's history buffer
# Keep a compressed segment only if it saves at least 3%. Bytes are what q8 is for: a segment
# that Huffman shrinks by 3-10% (young 8-bit optimizer codes) costs more time to load than a raw
# one (about 2x for such codes). Exponent planes save ~70% and all-zero state 99%. Optimizer
# files, written and read on the training path, store 8-bit state raw instead
# (`compress_codes=False`, `q8.save_optimizer`'s default).
_MIN_SAVING = 0.03
_MIN_COMPRESS_BYTES = 16 << 10
"""Smaller segments are stored as they are: coding one saves at most a few hundred bytes
and costs its reader a decode (150-250 us each for the small tensors of an optimizer file)."""
_PARALLEL_CRC_BYTES = 16 << 20
"""Smaller segments are checksummed on the writing thread: handing a few MiB to another
thread cost more than the checksum (an optimizer file of 1-4 MiB segments saved 12-15%
faster, at a load average of 4), larger ones beside their writes."""
_ZSTD_PROBE = 1 << 16  # bytes per probe slice when deciding whether zstd pays
_BATCH_BYTES = 8 << 20  # Reader.read_stored reads neighbouring segments together up to this size
_WRITEBACK_BYTES = 8 << 20  # a Writer starts writing back to disk every this many bytes
_PLANES_MIN_NUMEL = 4096  # smaller float tensors: raw bytes (their planes would not be compressed)
_UNPACK = {"raw": False, "strict_map_key": True, "use_list": True}

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("q8.formats assumes a little-endian host (the file format is little-endian)")


class FormatError(ValueError):
    """A q8 file (or index json) is malformed, corrupt or from a newer format version."""


# -- writing -----------------------------------------------------------------------------


def _check_str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError(f"{what} must be a dict of str to str, got {value!r:.200}")
    return dict(value)


class Writer:
    """Write a q8 file tensor by tensor, with bounded memory; atomic on success.

    The file is built in a temporary file next to `path` and renamed over it only when
    the `with` block exits without an exception (after flush and fsync); on an exception
    the temporary file is removed and any previous file at `path` is untouched.

    Args:
        path: destination file.
        metadata: user str -> str metadata, kept in the index.
        code, blocksize: what `add(..., lossless=False)` quantizes with.
        level: zstd level of compressed segments.
        compress_codes: entropy-code the segments of 8-bit tensors (codes and absmax) where
            that saves 3% or more; False stores them as they are (young optimizer state's codes
            shrink by 3-10%, and coding them costs more time than writing them).

    Example:
        >>> with q8.Writer("m.q8", metadata={"step": "100"}) as w:
        ...     w.add("weight", torch.randn(1024, 1024))
        ...     w.add("state", q8.quantize(torch.randn(4096)), extra={"note": "8-bit"})
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: Mapping[str, str] | None = None,
        *,
        code: str | Code = "auto",
        blocksize: int = 2048,
        level: int = 1,
        compress_codes: bool = True,
    ) -> None:
        self.path = Path(path)
        self._metadata = _check_str_map(metadata, "metadata")
        if not (isinstance(code, str) and code == "auto"):
            get_code(code)
        _check_blocksize(blocksize)
        self._code, self._blocksize = code, blocksize
        self._level = level
        self._compress_codes = compress_codes
        self._threads = max(1, torch.get_num_threads())
        self._file = None
        self._tmp: str | None = None
        self._pos = self._written_back = 0
        self._records: list[dict] = []
        self._names: set[str] = set()
        self._codes: dict[Code, int] = {}
        self._q8_meta: dict[str, str] = {}
        self._tree: bytes | None = None

    def __enter__(self) -> Writer:
        self._open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> None:
        if self._file is not None:
            raise RuntimeError(f"Writer for {self.path} is already open")
        temp = TempFile(self.path)
        self._file, self._tmp = temp.file, temp.path
        self._discard = weakref.finalize(self, temp.discard)  # also on garbage collection and at exit
        self._write(HEADER.pack(MAGIC, FORMAT_VERSION, 0))

    def _write(self, data) -> None:
        self._file.write(data)
        self._pos += memoryview(data).nbytes
        if self._pos - self._written_back >= _WRITEBACK_BYTES:
            self._file.flush()
            start_writeback(self._file.fileno(), self._written_back, self._pos - self._written_back)
            self._written_back = self._pos

    def add(
        self,
        name: str,
        tensor: torch.Tensor | QTensor,
        *,
        lossless: bool = True,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        """Append one tensor.

        Args:
            name: unique non-empty str.
            tensor: a tensor of any dtype in `q8.formats.DTYPES` (stored exactly; floats
                byte-plane + zstd compressed) or a `QTensor` (stored as is: codes + absmax).
            lossless: False quantizes a float tensor with the writer's code and blocksize.
            extra: per-tensor str -> str info kept in the index.
        """
        if self._file is None:
            self._open()
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.path}: tensor names must be non-empty str, got {name!r}")
        if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise ValueError(f"{self.path}: tensor name longer than {MAX_NAME_BYTES} bytes: {name[:80]!r}...")
        if name in self._names:
            raise ValueError(f"{self.path}: duplicate tensor name {name!r}")
        extra = _check_str_map(extra, f"extra of tensor {name!r}")
        if isinstance(tensor, torch.Tensor) and not lossless:
            if tensor.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{self.path}: cannot quantize tensor {name!r} of dtype {tensor.dtype}")
            tensor = quantize(tensor.detach().cpu(), self._code, self._blocksize)
        if isinstance(tensor, QTensor):
            record = self._add_qtensor(name, tensor)
        elif isinstance(tensor, torch.Tensor):
            record = self._add_tensor(name, tensor)
        else:
            raise TypeError(f"{self.path}: tensor {name!r} must be a torch.Tensor or q8.QTensor, not {type(tensor)}")
        record = {"name": name, **record, "extra": extra}
        self._records.append(record)
        self._names.add(name)

    def _add_tensor(self, name: str, x: torch.Tensor) -> dict:
        check_storable(x, f"{self.path}: tensor {name!r}")
        x = x.detach().cpu().contiguous()
        if x.dtype == torch.bool and (problem := bool_problem(x)):
            raise ValueError(f"{self.path}: tensor {name!r}: {problem}")
        encoding, parts = _exact_parts(x)
        return {
            "dtype": dtype_name(x.dtype),
            "shape": list(x.shape),
            "encoding": encoding,
            "segments": self._segments(parts),
        }

    def _add_qtensor(self, name: str, qt: QTensor) -> dict:
        if problem := blockwise_problem(qt.absmax, qt.code, qt.dtype):
            raise ValueError(f"{self.path}: QTensor {name!r}: {problem}")
        qt = qt.to("cpu")
        code = self._codes.setdefault(qt.code, len(self._codes))
        segments = self._segments(_blockwise_parts(qt), self._compress_codes)
        record = {"dtype": dtype_name(qt.dtype), "shape": list(qt.shape), "encoding": "blockwise"}
        if qt.row_length != qt.numel():  # rows cut blocks: a reader that does not know rows must refuse it
            record.update(encoding=ROW_BLOCKWISE, row_length=qt.row_length)
        return {**record, "code": code, "blocksize": qt.blocksize, "segments": segments}

    def _segments(self, parts: Iterable[torch.Tensor], compress: bool = True) -> list[list[int]]:
        """Compress (where it pays, if `compress`), checksum and write the parts, one after another."""
        out = []
        for part in parts:
            pieces, raw_length, compression = _encode_segment(part, self._level, self._threads, compress)
            if compression == RAW:  # memory-mappable as any dtype
                self._write(b"\0" * (-self._pos % ALIGN))
            start = self._pos
            stored = sum(memoryview(p).nbytes for p in pieces)
            # beside the writes (both release the GIL), where that pays for the thread handoff
            crc = _pool().submit(_crc32, pieces) if stored >= _PARALLEL_CRC_BYTES else None
            for piece in pieces:
                self._write(piece)
            out.append([start, stored, raw_length, compression, crc.result() if crc else _crc32(pieces)])
            del part, pieces  # freed before the next part is made
        return out

    def set_q8_metadata(self, key: str, value: str) -> None:
        """q8's own metadata (kept apart from the user's), e.g. what wrote the file."""
        self._q8_meta.update(_check_str_map({key: value}, "q8 metadata"))

    def set_tree(self, tree: bytes) -> None:
        """The msgpack structure of a nested object (`q8.save`) referencing tensors by name."""
        self._tree = bytes(tree)

    def close(self) -> None:
        """Write index and footer, fsync, and atomically rename onto `path`."""
        if self._file is None:
            self._open()
        self._finish()
        f = self._file
        try:
            f.flush()
            os.fsync(f.fileno())
            os.replace(self._tmp, self.path)  # still locked: never taken for a dead writer's file
            fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self._discard.detach()
        self._file = self._tmp = None
        f.close()

    def _finish(self) -> None:
        """Write the index and the footer after the data."""
        from .. import __version__

        index = {
            "tensors": self._records,
            "codes": [_code_entry(c) for c in self._codes],
            "metadata": self._metadata,
            "q8": {"writer": f"q8 {__version__}", **self._q8_meta},
        }
        if self._tree is not None:
            index["tree"] = self._tree
        blob = msgpack.packb(index, use_bin_type=True)
        self._write(b"\0" * (-self._pos % ALIGN))
        offset = self._pos
        self._write(blob)
        self._write(FOOTER.pack(offset, len(blob), crc32(blob), FORMAT_VERSION, MAGIC))

    def abort(self) -> None:
        """Drop the temporary file; the previous file at `path`, if any, is untouched."""
        if self._file is not None:
            self._file = self._tmp = None
            self._discard()


class BytesWriter(Writer):
    """A `Writer` that builds the file in memory: `close()` returns its bytes (`q8.save_bytes`)."""

    def __init__(self, metadata: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__("<bytes>", metadata, **kwargs)

    def _open(self) -> None:
        self._file = io.BytesIO()
        self._written_back = math.inf  # nothing to write back
        self._write(HEADER.pack(MAGIC, FORMAT_VERSION, 0))

    def close(self) -> bytes:
        if self._file is None:
            self._open()
        self._finish()
        data, self._file = self._file.getvalue(), None
        return data

    def abort(self) -> None:
        self._file = None


def blockwise_problem(absmax: torch.Tensor, code: Code, dtype: torch.dtype) -> str | None:
    """Why 8-bit codes with these fp32 scales cannot be stored: an absmax that is negative
    or not finite, or values that would decode beyond `dtype`'s range (the largest
    |table entry| x the largest absmax, rounded to `dtype` as decoding rounds, is inf).
    None if they are fine. One pass over the absmax (in numpy: a few microseconds, where
    torch's calls cost a hundred per tensor of an optimizer file), none over the codes."""
    if absmax.numel() == 0:
        return None
    scales = absmax.detach().cpu().numpy()
    low, high = scales.min(), scales.max()
    if not (low >= 0 and high < math.inf):  # also false for NaN
        return "absmax holds negative or non-finite values"
    table = code.values.numpy()
    with numpy.errstate(over="ignore"):
        extreme = max(-table[0], table[-1]) * high  # float32, as decoding computes it
    if extreme > torch.finfo(dtype).max and not torch.isfinite(torch.tensor(extreme).to(dtype)):
        return f"decodes to values beyond {dtype}'s range (largest |table entry| x absmax = {extreme:.4g})"
    return None


def bool_problem(data: torch.Tensor) -> str | None:
    """Why the bytes of a bool tensor are not one (0 or 1 per element), or None."""
    if data.numel() and bool((data.view(torch.uint8) > 1).any()):
        return "bool tensor holds bytes other than 0 and 1"
    return None


def _exact_parts(x: torch.Tensor) -> tuple[str, Iterable[torch.Tensor]]:
    """The encoding of an exact contiguous CPU tensor and its segments' bytes: `planes` for
    floats of at least 1024 elements (made one plane at a time), `raw` otherwise."""
    width = PLANE_WIDTH.get(x.dtype)
    if width and x.numel() >= _PLANES_MIN_NUMEL:
        return "planes", (byte_plane(x, width, j) for j in range(width))
    return "raw", [x.reshape(-1).view(torch.uint8)]


def stored_as_is(record: dict) -> bool:
    """Whether every segment of a tensor record (`Reader.record`) holds the tensor's bytes as
    they are: uncompressed raw or 8-bit (codes, absmax) segments, which read without decoding."""
    return record["encoding"] in ("raw", "blockwise") and all(seg[3] == RAW for seg in record["segments"])


def _blockwise_parts(qt: QTensor) -> list[torch.Tensor]:
    return [qt.codes.contiguous(), qt.absmax.contiguous().view(torch.uint8)]


def _encode_segment(part: torch.Tensor, level: int, threads: int, compress: bool = True) -> tuple[list, int, int]:
    """(buffers to store, raw length, compression): the smallest of raw, Huffman and
    zstd that saves at least `_MIN_SAVING` (3%), or raw without trying if not `compress`.
    Huffman (fast) is tried first; zstd only where Huffman does not pay or where the data
    is so skewed (> 4x) that repeats may beat it."""
    raw = memoryview(part.numpy()).cast("B") if part.numel() else memoryview(b"")
    n = raw.nbytes
    best, best_size, compression = [raw], n * (1 - _MIN_SAVING), RAW
    if compress and n >= _MIN_COMPRESS_BYTES:
        packed = huffman_encode(part, _MIN_SAVING)
        if packed is not None and (size := sum(memoryview(p).nbytes for p in packed)) <= best_size:
            best, best_size, compression = packed, size, HUFFMAN
        if best_size < n / 4 if compression == HUFFMAN else _zstd_pays(raw, level, threads):
            packed = _zstd(raw, level, threads)
            if len(packed) <= best_size:
                best, compression = [packed], ZSTD
    return best, n, compression


def _zstd(data, level: int, threads: int) -> bytes:
    """zstd frame of `data`, by a compressor kept per thread (making one costs more than
    compressing a small segment; one may not be shared between threads)."""
    compressors = _THREAD.__dict__.setdefault("zstd", {})
    if (level, threads) not in compressors:
        compressors[level, threads] = zstandard.ZstdCompressor(level=level, write_content_size=True, threads=threads)
    return compressors[level, threads].compress(data)


_THREAD = threading.local()


def _zstd_pays(raw: memoryview, level: int, threads: int) -> bool:
    n = raw.nbytes
    if n <= 4 * _ZSTD_PROBE:
        return True
    probe = b"".join(raw[i : i + _ZSTD_PROBE] for i in (0, n // 2, n - _ZSTD_PROBE))
    return len(_zstd(probe, level, threads)) <= len(probe) * (1 - _MIN_SAVING)


def _code_entry(code: Code) -> dict:
    return {"name": code.name, "values": code.values.numpy().tobytes()}


def code_nbytes(code: Code) -> int:
    """Bytes a code table adds to the index of a file that does not hold it yet (each
    table is stored once per file, whatever the number of tensors using it)."""
    return len(msgpack.packb(_code_entry(code), use_bin_type=True))


def stored_nbytes(x: torch.Tensor | QTensor, level: int = 1) -> int:
    """Bytes the data segments of `x` take in a q8 file (what `Writer.add` stores for it,
    compressed where that pays; alignment padding and the index not counted), without
    writing anything. A QTensor as it is, a tensor exactly."""
    if isinstance(x, QTensor):
        parts = _blockwise_parts(x.to("cpu"))
    else:
        check_storable(x, "stored_nbytes: x")
        parts = _exact_parts(x.detach().cpu().contiguous())[1]
    threads = max(1, torch.get_num_threads())
    total = 0
    for part in parts:
        pieces, _, _ = _encode_segment(part, level, threads)
        total += sum(memoryview(p).nbytes for p in pieces)
    return total


def _crc32(pieces: list) -> int:
    crc = 0
    for piece in pieces:
        crc = crc32(piece, crc)
    return crc


def check_storable(x: Any, what: str) -> None:
    """TypeError/ValueError (naming `what`) if `x` is not a tensor the format can hold."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or q8.QTensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{what} has layout {x.layout}; only dense (strided) tensors can be stored")
    if x.is_quantized or x.is_nested or x.device.type == "meta":
        raise TypeError(f"{what} is a quantized, nested or meta tensor, which the q8 format cannot hold")
    dtype_name(x.dtype)


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="q8-format")
    return _POOL


# -- reading -----------------------------------------------------------------------------


class Reader:
    """Random access to one q8 file: validates header, footer and index on open; reads
    and checks only the segments of the tensor asked for. Use through `q8.safe_open`."""

    def __init__(
        self, path: str | os.PathLike, device: str | torch.device = "cpu", *, data: bytes | None = None
    ) -> None:
        """Open file `path`, or with `data`, a q8 file held in memory (`path` names it in errors)."""
        self.path = Path(path)
        self.device = torch.device(device)
        self._fd = None  # for pread: decoding reads ranges (a file in memory is read from it)
        self._mm = None
        try:
            if data is not None:
                self._mm = bytearray(data)  # a writable copy, as the copy-on-write map of a file
                self.size = len(self._mm)
                if self.size < HEADER.size + FOOTER.size:
                    raise self.error(f"too short for a q8 file ({self.size} bytes)")
            else:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                self._close_fd = weakref.finalize(self, os.close, self._fd)
                self.size = os.fstat(self._fd).st_size
                if self.size < HEADER.size + FOOTER.size:
                    raise self.error(f"file too short for a q8 file ({self.size} bytes)")
                self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
            self._parse()
        except BaseException:
            self.close()
            raise

    def error(self, msg: str, name: str | None = None) -> FormatError:
        where = f"{self.path}" + (f", tensor {name!r}" if name is not None else "")
        return FormatError(f"{where}: {msg}")

    def close(self) -> None:
        """Drop the map and the file; zero-copy tensors keep the map alive (they hold
        references) until freed."""
        self._mm = None
        if self._fd is not None:
            self._close_fd()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # - index -

    def _parse(self) -> None:
        magic, version, reserved = HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC:
            raise self.error(f"not a q8 file (magic {magic!r}, expected {MAGIC!r})")
        if version > FORMAT_VERSION:
            raise self.error(f"format version {version} is newer than this reader's ({FORMAT_VERSION}); upgrade q8")
        if version < 1 or reserved != 0:
            raise self.error(f"bad header (version {version}, reserved {reserved})")
        offset, length, crc, fversion, fmagic = FOOTER.unpack_from(self._mm, self.size - FOOTER.size)
        if fmagic != MAGIC or fversion != version:
            raise self.error("bad footer (truncated or not a q8 file)")
        self.data_end = self.size - FOOTER.size - length
        if length > MAX_INDEX_BYTES or offset != self.data_end or offset < HEADER.size or offset % ALIGN:
            raise self.error(f"index at {offset} (+{length} bytes) does not fit a {self.size}-byte file")
        blob = self._mm[offset : offset + length]  # a copy: the checked bytes cannot change under us
        if crc32(blob) != crc:
            raise self.error("index checksum mismatch (file corrupt)")
        self._index = blob
        try:
            self._parse_index(msgpack.Unpacker(io.BytesIO(blob), max_buffer_size=max(1, length), **_UNPACK))
        except FormatError:
            raise
        except Exception as e:
            raise self.error(f"index is not valid msgpack/UTF-8: {e}") from None

    def _parse_index(self, unpacker: msgpack.Unpacker) -> None:
        """Everything but the tensor records, which `_scan_records` only locates."""
        try:
            entries = unpacker.read_map_header()
        except Exception:
            raise self.error("index is not a map") from None
        index: dict[Any, Any] = {}
        for _ in range(entries):
            key = unpacker.unpack()
            if key in index:
                raise self.error(f"index has two {key!r} entries")
            index[key] = self._scan_records(unpacker) if key == "tensors" else unpacker.unpack()
        if unpacker.tell() != len(self._index):
            raise self.error("index has trailing bytes")
        if "tensors" not in index:
            raise self.error("tensors is not an array")
        self._metadata = self._str_map(index.get("metadata", {}), "metadata")
        self.q8_metadata = self._str_map(index.get("q8", {}), "q8 metadata")
        tree = index.get("tree")
        if tree is not None and not isinstance(tree, bytes):
            raise self.error("tree is not binary")
        self.tree = tree
        codes = index.get("codes", [])
        if not isinstance(codes, list):
            raise self.error("codes is not an array")
        self._code_tables = codes
        self.codes: list[Code | None] = [None] * len(codes)  # parsed on first use

    def _scan_records(self, unpacker: msgpack.Unpacker) -> int:
        """Locate every record (its name, where it lies in the index) and check that the
        segments of all records lie in the data area without overlapping; the rest of a
        record is parsed when the tensor is asked for. Work and memory are linear in the
        index size, a few small objects per record."""
        try:
            count = unpacker.read_array_header()
        except Exception:
            raise self.error("tensors is not an array") from None
        self._where: dict[str, int] = {}
        self._bounds = array.array("q", [unpacker.tell()])
        starts, ends, owners = array.array("q"), array.array("q"), array.array("q")
        for k in range(count):
            record = unpacker.unpack()
            name, segments = record.get("name") if isinstance(record, dict) else None, None
            if isinstance(name, str):
                segments = record.get("segments")
            if not isinstance(segments, list):
                raise self.error("a tensor record has no name or no segments", name if isinstance(name, str) else None)
            if name in self._where:
                raise self.error("duplicate tensor name", name)
            self._where[name] = k
            for seg in segments:
                if not (isinstance(seg, list) and len(seg) == 5 and type(seg[0]) is int and type(seg[1]) is int):
                    raise self.error(f"malformed segment {seg!r:.100}", name)
                offset, stored = seg[0], seg[1]
                if not (HEADER.size <= offset and 0 <= stored <= self.data_end - offset):
                    raise self.error(f"segment at {offset} (+{stored} bytes) lies outside the data area", name)
                starts.append(offset)
                ends.append(offset + stored)
                owners.append(k)
            self._bounds.append(unpacker.tell())
        begin, end = numpy.frombuffer(starts, numpy.int64), numpy.frombuffer(ends, numpy.int64)
        order = numpy.lexsort((end, begin))  # by start, then end
        clash = numpy.flatnonzero(begin[order][1:] < end[order][:-1])
        if clash.size:
            names = list(self._where)
            a, b = (names[owners[order[i]]] for i in (clash[0], clash[0] + 1))
            raise self.error(f"segments of {a!r} and {b!r} overlap", b)
        return count

    def _str_map(self, value: Any, what: str, name: str | None = None) -> dict[str, str]:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise self.error(f"{what} is not a map of str to str", name)
        return value

    def _code(self, i: int) -> Code:
        if self.codes[i] is None:
            self.codes[i] = self._parse_code(i, self._code_tables[i])
        return self.codes[i]

    def _parse_code(self, i: int, c: Any) -> Code:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("values"), bytes):
            raise self.error(f"code table {i} is malformed")
        if len(c["values"]) != 1024:
            raise self.error(f"code table {i} ({c['name']!r}) has {len(c['values'])} bytes, expected 1024")
        try:
            return Code(c["name"], torch.frombuffer(bytearray(c["values"]), dtype=torch.float32))
        except ValueError as e:
            raise self.error(f"code table {i} is invalid: {e}") from None

    def _parse_record(self, record: Any) -> tuple[str, dict]:
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise self.error("a tensor record has no name")
        name = record["name"]
        if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise self.error("tensor name is empty or too long", name)
        dtype = DTYPES.get(record.get("dtype")) if isinstance(record.get("dtype"), str) else None
        if dtype is None:
            raise self.error(f"unknown dtype {record.get('dtype')!r}", name)
        shape = record.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_BYTES for d in shape)
        ):
            raise self.error(f"bad shape {shape!r:.100}", name)
        numel = math.prod(shape)
        if numel * dtype.itemsize > MAX_BYTES:
            raise self.error(f"shape {shape} is too large", name)
        extra = self._str_map(record.get("extra", {}), "extra", name)
        encoding = record.get("encoding")
        segments = record.get("segments")
        if not isinstance(segments, list):
            raise self.error("segments is not an array", name)
        rec = {"name": name, "dtype": dtype, "shape": torch.Size(shape), "encoding": encoding, "extra": extra}
        if encoding == "raw":
            expected = [numel * dtype.itemsize]
        elif encoding == "planes" and dtype in PLANE_WIDTH:
            width = PLANE_WIDTH[dtype]
            expected = [numel * dtype.itemsize // width] * width
        elif encoding in ("blockwise", ROW_BLOCKWISE) and dtype in FLOAT_DTYPES:
            code, blocksize = record.get("code"), record.get("blocksize")
            if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code < len(self.codes):
                raise self.error(f"code reference {code!r} out of range ({len(self.codes)} tables)", name)
            try:
                _check_blocksize(blocksize)
            except ValueError as e:
                raise self.error(str(e), name) from None
            row_length = record.get("row_length") if encoding == ROW_BLOCKWISE else numel
            if encoding == ROW_BLOCKWISE and not (
                isinstance(row_length, int)
                and not isinstance(row_length, bool)
                and 0 < row_length < numel
                and numel % row_length == 0
                and row_length % blocksize
            ):
                raise self.error(
                    f"row_length {row_length!r:.100} must divide the {numel} elements into several rows "
                    f"that are not whole blocks of {blocksize}",
                    name,
                )
            # In memory one encoding, "blockwise", with its rows (numel: the flat layout).
            rec.update(encoding="blockwise", code=self._code(code), blocksize=blocksize, row_length=row_length)
            expected = [numel, 4 * num_blocks(numel, blocksize, row_length)]
        else:
            raise self.error(f"unknown encoding {encoding!r} for dtype {dtype_name(dtype)}", name)
        if len(segments) != len(expected):
            raise self.error(f"{len(segments)} segments, expected {len(expected)}", name)
        rec["segments"] = [self._parse_segment(s, n, name) for s, n in zip(segments, expected, strict=True)]
        return name, rec

    def _parse_segment(self, s: Any, raw_length: int, name: str) -> tuple[int, int, int, int, int]:
        if not (isinstance(s, list) and len(s) == 5 and all(isinstance(v, int) and not isinstance(v, bool) for v in s)):
            raise self.error(f"malformed segment {s!r:.100}", name)
        offset, stored, raw, compression, crc = s
        if raw != raw_length:
            raise self.error(f"segment holds {raw} bytes, the shape needs {raw_length}", name)
        if not (HEADER.size <= offset and 0 <= stored <= self.data_end - offset):
            raise self.error(f"segment at {offset} (+{stored} bytes) lies outside the data area", name)
        if compression not in (RAW, ZSTD, HUFFMAN) or not 0 <= crc < 1 << 32:
            raise self.error(f"bad segment header {s!r}", name)
        if compression == RAW and (stored != raw or offset % ALIGN):
            raise self.error(f"uncompressed segment at {offset} is unaligned or not {raw} bytes", name)
        return offset, stored, raw, compression, crc

    # - tensors -

    def keys(self) -> list[str]:
        """Tensor names in the order they were written, which is their order in the file."""
        return list(self._where)

    def offset_keys(self) -> list[str]:
        """Tensor names by position in the file (safetensors' `offset_keys`): `keys()`."""
        return self.keys()

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._where)

    def get_slice(self, name: str):
        """A `q8.formats.slicing.TensorSlice` of tensor `name`: index it to read part of it."""
        from .slicing import TensorSlice  # it builds on this module

        return TensorSlice(self, name)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def record(self, name: str) -> dict:
        """The validated record of tensor `name` (parsed from the index on each call)."""
        try:
            k = self._where[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        raw = msgpack.unpackb(memoryview(self._index)[self._bounds[k] : self._bounds[k + 1]], **_UNPACK)
        return self._parse_record(raw)[1]

    def info(self, name: str) -> dict:
        rec = self.record(name)
        code = rec.get("code")
        return {
            "shape": tuple(rec["shape"]),
            "dtype": rec["dtype"],
            "encoding": rec["encoding"],
            "code": code.name if code is not None else None,
            "blocksize": rec.get("blocksize"),
            "row_length": rec.get("row_length"),
            "stored_bytes": sum(s[1] for s in rec["segments"]),
            "raw_bytes": math.prod(rec["shape"]) * rec["dtype"].itemsize,
            "extra": dict(rec["extra"]),
        }

    def _segment(self, seg: tuple[int, int, int, int, int], name: str, owned: bool = False) -> torch.Tensor:
        """The raw bytes of one segment as a uint8 tensor: zero-copy into the map if stored
        uncompressed (read into a new tensor if `owned`), else decoded straight into a
        buffer of exactly its raw length."""
        offset, stored, raw, compression, crc = seg
        if owned and compression == RAW:
            out = torch.empty(raw, dtype=torch.uint8)
            self._read([out], offset, name)
            if crc32(out.numpy()) != crc:
                raise self.error(f"checksum mismatch in segment at {offset} (file corrupt)", name)
            return out
        view = memoryview(self._mm)[offset : offset + stored]
        if crc32(view) != crc:
            raise self.error(f"checksum mismatch in segment at {offset} (file corrupt)", name)
        if raw == 0:
            return torch.empty(0, dtype=torch.uint8)
        if compression == RAW:
            return torch.frombuffer(self._mm, dtype=torch.uint8, count=raw, offset=offset)
        if compression == HUFFMAN:
            out = huffman_decode(view, raw)
            if isinstance(out, str):
                raise self.error(out, name)
            return out
        zstd = self._zstd_stream(view, raw, name)  # sizes checked before allocating
        out = torch.empty(raw, dtype=torch.uint8)
        zstd.readinto(out)
        zstd.finish()
        return out

    def segment_bytes(self, seg: tuple[int, int, int, int, int], start: int, stop: int, name: str) -> torch.Tensor:
        """Bytes [start, stop) of one segment's raw content. Uncompressed: a zero-copy view
        of the map, so only those bytes are read, and the segment's checksum, which covers
        all of it, is not checked. Compressed: the whole segment is checked and decoded."""
        offset, _, raw, compression, _ = seg
        if not 0 <= start <= stop <= raw:
            raise ValueError(f"bytes [{start}, {stop}) outside a segment of {raw} bytes")
        if stop == start:
            return torch.empty(0, dtype=torch.uint8)
        if compression == RAW:
            return torch.frombuffer(self._mm, dtype=torch.uint8, count=stop - start, offset=offset + start)
        return self._segment(seg, name)[start:stop]

    def _read(self, outs: list[torch.Tensor], offset: int, name: str) -> None:
        """Fill the uint8 tensors `outs`, one after another, with the file's bytes from
        `offset` on (`pread`: no map pages become resident), or a file in memory's."""
        if self._fd is None:
            for out in outs:
                out.numpy()[:] = numpy.frombuffer(self._mm, numpy.uint8, out.numel(), offset)
                offset += out.numel()
        else:
            pread(self._fd, outs, offset, lambda msg: self.error(msg, name))

    def _zstd_stream(self, view: memoryview, raw: int, name: str) -> ZstdStream:
        return ZstdStream(view, raw, MAX_ZSTD_RATIO, MAX_ZSTD_WINDOW, lambda msg: self.error(msg, name))

    def _source(self, seg: tuple[int, int, int, int, int], name: str) -> RawSource | ZstdSource:
        """One segment, to be decoded range by range (formats/stream.py)."""
        error = lambda msg: self.error(msg, name)  # noqa: E731
        read = lambda out, offset: self._read([out], offset, name)  # noqa: E731
        if seg[3] == RAW:
            return RawSource(read, seg, error)
        if seg[3] == HUFFMAN:
            return HuffmanSource(read, seg, error)
        offset, stored, raw, _, crc = seg
        view = memoryview(self._mm)[offset : offset + stored]
        if crc32(view) != crc:
            raise self.error(f"checksum mismatch in segment at {offset} (file corrupt)", name)
        return ZstdSource(self._zstd_stream(view, raw, name))

    def _decoded(self, rec: dict, owned: bool = False) -> list[torch.Tensor]:
        """The segments of a tensor: checksummed, decoded whole, and checked for everything
        decoding relies on (`q8.verify` runs exactly these checks; `get_tensor` makes them
        range by range). `owned`: never views of the map."""
        name = rec["name"]
        parts = [self._segment(s, name, owned) for s in rec["segments"]]
        if rec["encoding"] == "blockwise":
            self._check_absmax(rec, parts[1])
        elif rec["dtype"] == torch.bool and (problem := bool_problem(parts[0])):
            raise self.error(problem, name)
        return parts

    def _check_absmax(self, rec: dict, absmax: torch.Tensor) -> None:
        if problem := blockwise_problem(absmax.view(torch.float32), rec["code"], rec["dtype"]):
            raise self.error(problem, rec["name"])

    def verify(self) -> None:
        """Read and check every tensor as loading it would, without decoding 8-bit codes
        or reassembling byte planes."""
        for name in self._where:
            self._decoded(self.record(name))

    def read_stored(self, records: list[dict]) -> dict[str, torch.Tensor | QTensor]:
        """The tensors of `records` (from `record`), whose segments are all stored as they
        are (`stored_as_is`), each in memory of its own (no view of the map): 8-bit ones as
        QTensors (`get_qtensor`), the others as tensors (`get_tensor(copy=True)`), on the
        reader's device, with the same checks. Segments that follow one another in the file
        are read together, straight into their tensors, up to `_BATCH_BYTES` per `preadv`
        on several threads, each checked against its CRC-32 as soon as read: many small
        tensors cost a few reads, not a round of calls each."""
        batches: list[list] = []
        for seg, k, j in sorted((s, k, j) for k, r in enumerate(records) for j, s in enumerate(r["segments"])):
            first, last = (batches[-1][0][0], batches[-1][-1][0]) if batches else (None, None)
            if first is None or seg[0] - (last[0] + last[1]) >= ALIGN or seg[0] + seg[1] - first[0] > _BATCH_BYTES:
                batches.append([])
            batches[-1].append((seg, k, j))
        parts: list[list[Any]] = [[None] * len(r["segments"]) for r in records]  # each read below

        def read(batch: list) -> None:
            outs, pos = [], batch[0][0][0]
            for (offset, stored, _, _, _), k, j in batch:
                outs.append(torch.empty(offset - pos, dtype=torch.uint8))  # padding before it
                parts[k][j] = torch.empty(stored, dtype=torch.uint8)
                outs.append(parts[k][j])
                pos = offset + stored
            self._read(outs, batch[0][0][0], records[batch[0][1]]["name"])
            for (offset, _, _, _, crc), k, j in batch:
                if crc32(parts[k][j].numpy()) != crc:
                    raise self.error(f"checksum mismatch in segment at {offset} (file corrupt)", records[k]["name"])

        map_all(_pool(), read, batches)
        out = {}
        for rec, bufs in zip(records, parts, strict=True):
            if rec["encoding"] == "blockwise":
                self._check_absmax(rec, bufs[1])
                out[rec["name"]] = self._qtensor(rec, bufs)
            else:
                if rec["dtype"] == torch.bool and (problem := bool_problem(bufs[0])):
                    raise self.error(problem, rec["name"])
                x = bufs[0].view(rec["dtype"]).view(rec["shape"])
                out[rec["name"]] = x if self.device.type == "cpu" else x.to(self.device)
        return out

    def get_qtensor(self, name: str) -> QTensor:
        """The codes + absmax of a quantized tensor, not decoded, on the reader's device;
        read into new tensors (8-bit state is updated in place: no copy-on-write map)."""
        rec = self.record(name)
        if rec["encoding"] != "blockwise":
            raise ValueError(f"{self.path}: tensor {name!r} is stored exactly, not quantized")
        return self._qtensor(rec, self._decoded(rec, owned=True))

    def _qtensor(self, rec: dict, parts: list[torch.Tensor]) -> QTensor:
        codes, absmax = parts[0], parts[1].view(torch.float32)
        qt = QTensor(codes, absmax, rec["code"], rec["blocksize"], rec["shape"], rec["dtype"], rec["row_length"])
        return qt if self.device.type == "cpu" else qt.to(self.device)

    def get_tensor(self, name: str, *, copy: bool = False) -> torch.Tensor:
        """The tensor, decoded, on the reader's device. Uncompressed exact tensors read on
        CPU are zero-copy views of the memory-mapped file (copy-on-write), unless `copy`;
        the others are decoded range by range straight into the output (formats/stream.py).
        Quantized tensors read for a GPU travel as codes and are decoded there."""
        rec = self.record(name)
        dtype, shape, segments = rec["dtype"], rec["shape"], rec["segments"]
        if rec["encoding"] == "blockwise" and self.device.type != "cpu":
            return self._qtensor(rec, self._decoded(rec)).dequantize()
        if math.prod(shape) == 0 or (rec["encoding"] == "raw" and segments[0][3] == RAW):
            x = self._decoded(rec, owned=copy)[0].view(dtype).view(shape)
        else:
            x = self._decode(rec)
        return x if self.device.type == "cpu" else x.to(self.device)

    def _decode(self, rec: dict) -> torch.Tensor:
        """A non-empty tensor stored as planes, codes or compressed raw bytes, decoded
        straight into a new CPU tensor, allocated once every size is checked."""
        name, dtype, segments = rec["name"], rec["dtype"], rec["segments"]
        try:
            if rec["encoding"] == "blockwise":
                absmax = self._segment(segments[1], name).view(torch.float32)
                self._check_absmax(rec, absmax)
                segments = segments[:1]
            sources = [self._source(s, name) for s in segments]
            out = torch.empty(math.prod(rec["shape"]) * dtype.itemsize, dtype=torch.uint8)
            if rec["encoding"] == "planes":
                width = PLANE_WIDTH[dtype]

                def combine(b0: int, b1: int, planes: list[torch.Tensor]) -> None:
                    join(planes, out, width, b0, b1)

            elif rec["encoding"] == "blockwise":

                def combine(b0: int, b1: int, bufs: list[torch.Tensor]) -> None:
                    values = out.view(dtype)[b0:b1]
                    decoded = values if dtype == torch.float32 else torch.empty(b1 - b0, dtype=torch.float32)
                    decode_range(
                        bufs[0][: b1 - b0], absmax, rec["code"], rec["blocksize"], rec["row_length"], b0, decoded
                    )
                    if decoded is not values:
                        values.copy_(decoded)  # rounded as dequantize's .to(dtype)

            else:

                def combine(b0: int, b1: int, bufs: list[torch.Tensor]) -> None:
                    out.numpy()[b0:b1] = bufs[0].numpy()[: b1 - b0]  # a memcpy on this thread

            decode_ranges(sources, segments[0][2], combine)
        except FormatError:
            if self._fd is not None and os.fstat(self._fd).st_size != self.size:
                raise  # the file changed under us: its map cannot be read
            for seg in segments:  # a corrupt file is named as such, as reading a segment whole does
                if crc32(memoryview(self._mm)[seg[0] : seg[0] + seg[1]]) != seg[4]:
                    raise self.error(f"checksum mismatch in segment at {seg[0]} (file corrupt)", name) from None
            raise
        if dtype == torch.bool and (problem := bool_problem(out)):
            raise self.error(problem, name)
        return out.view(dtype).view(rec["shape"])
