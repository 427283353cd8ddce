"""A corpus of hostile q8 files, built by code: the attacks of issue 11 and their kin.

Each case is a small file (at most a few MB, built in milliseconds) that once crashed,
hung, over-allocated or fooled a q8 reader. `CASES` maps a case name to a builder
returning (file bytes, what the FormatError must say). tests/test_formats_fuzz.py loads
every case through every reader and mutates them further.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import msgpack
import q8
import torch
from q8.formats.container import ALIGN, FOOTER, FORMAT_VERSION, HEADER, MAGIC

ZSTD_MAGIC = 0xFD2FB528
RLE_BLOCK = 1 << 17  # zstd's largest block


def q8_file(records: list[dict], data: bytes = b"", *, codes: list | None = None, tree: bytes | None = None) -> bytes:
    """A q8 file with `data` right after the header and an index of `records`, as given:
    nothing is validated, so any lie can be told. Segment offsets count from the file start
    (data starts at 16)."""
    head = HEADER.pack(MAGIC, FORMAT_VERSION, 0) + data
    head += b"\0" * (-len(head) % ALIGN)
    index = {"tensors": records, "codes": codes or [], "metadata": {}, "q8": {"writer": "hostile"}}
    if tree is not None:
        index["tree"] = tree
    blob = msgpack.packb(index, use_bin_type=True)
    return head + blob + FOOTER.pack(len(head), len(blob), zlib.crc32(blob), FORMAT_VERSION, MAGIC)


def segment(data: bytes, offset: int, raw: int, compression: int) -> list[int]:
    return [offset, len(data), raw, compression, zlib.crc32(data)]


def zstd_rle_frame(content_size: int, blocks: int, *, last: bool = True) -> bytes:
    """A hand-made zstd frame whose header declares `content_size` and whose body is
    `blocks` RLE blocks of 128 KiB each (4 bytes per block: the best ratio zstd allows)."""
    header = struct.pack("<IBBQ", ZSTD_MAGIC, 0xC0, 0x38, content_size)  # 8-byte size field, 128 KiB window
    body = b"".join(
        struct.pack("<I", RLE_BLOCK << 3 | 1 << 1 | (last and i == blocks - 1))[:3] + b"\x07" for i in range(blocks)
    )
    return header + body


def _zstd_record(name: str, numel: int, frame: bytes) -> bytes:
    return q8_file([_raw_record(name, "uint8", [numel], segment(frame, 16, numel, 1))], frame)


def _raw_record(name: str, dtype: str, shape: list[int], seg: list[int]) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape, "encoding": "raw", "segments": [seg], "extra": {}}


def deep_tuples(depth: int = 250) -> bytes:
    """A `tree` of `depth` tuples nested in each other (ext type 2 payloads)."""
    payload = msgpack.packb([1])
    for _ in range(depth):
        payload = msgpack.packb([msgpack.ExtType(2, payload)])
    return q8_file([], tree=msgpack.packb(msgpack.ExtType(2, payload)))


def deep_arrays(depth: int = 5000) -> bytes:
    """A `tree` of arrays nested deeper than any q8 writer nests them."""
    return q8_file([], tree=b"\x91" * depth + b"\xc0")


def zstd_declares_1tib() -> bytes:
    """2 KiB of zstd claiming a 1 TiB tensor (frame header and index agree)."""
    numel = 1 << 40
    return _zstd_record("bomb", numel, zstd_rle_frame(numel, 500))


def zstd_longer_than_declared() -> bytes:
    """A frame that keeps producing bytes past the 1 MiB its header and index declare."""
    numel = 1 << 20
    return _zstd_record("long", numel, zstd_rle_frame(numel, 800))


def zstd_shorter_than_declared() -> bytes:
    """A frame whose header declares 512 KiB and that ends after 256 KiB."""
    numel = 1 << 19
    return _zstd_record("short", numel, zstd_rle_frame(numel, 2, last=False))


def many_records(count: int = 100_000) -> bytes:
    """`count` empty tensor records: a 60-byte record each, all legal."""
    return q8_file([_raw_record(f"t{i}", "float32", [0], [64, 0, 0, 0, 0]) for i in range(count)])


def _quantized(dtype: torch.dtype, absmax: float, *, table: str = "dynamic") -> bytes:
    """A blockwise tensor of 64 elements (one block) with the given absmax; every code
    is the table's largest entry."""
    code = q8.codec.get_code(table)
    codes, scale = bytes([255]) * 64, struct.pack("<f", absmax)
    record = {
        "name": "q",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": [64],
        "encoding": "blockwise",
        "code": 0,
        "blocksize": 64,
        "segments": [segment(codes, 64, 64, 0), segment(scale, 128, 4, 0)],
        "extra": {},
    }
    data = b"\0" * (64 - 16) + codes + scale  # codes at 64, absmax at 128
    return q8_file([record], data, codes=[{"name": code.name, "values": code.values.numpy().tobytes()}])


def bool_bytes(value: int = 2) -> bytes:
    data = bytes([0, 1, value, 1])
    return q8_file([_raw_record("mask", "bool", [4], segment(data, 64, 4, 0))], b"\0" * 48 + data)


CASES: dict[str, Callable[[], tuple[bytes, str]]] = {
    "deep_tuples": lambda: (deep_tuples(), "nested deeper"),
    "deep_arrays": lambda: (deep_arrays(), "nested structure"),
    "zstd_declares_1tib": lambda: (zstd_declares_1tib(), "cannot hold"),
    "zstd_longer_than_declared": lambda: (zstd_longer_than_declared(), "zstd"),
    "zstd_shorter_than_declared": lambda: (zstd_shorter_than_declared(), "zstd"),
    "absmax_nan": lambda: (_quantized(torch.float32, float("nan")), "absmax"),
    "absmax_negative": lambda: (_quantized(torch.float32, -1.0), "absmax"),
    "absmax_inf": lambda: (_quantized(torch.float32, float("inf")), "absmax"),
    "fp16_overflow": lambda: (_quantized(torch.float16, 3.4e38), "beyond torch.float16's range"),
    "bf16_overflow": lambda: (_quantized(torch.bfloat16, 3.4e38), "beyond torch.bfloat16's range"),
    "bool_byte_2": lambda: (bool_bytes(2), "bool tensor"),
    "bool_byte_255": lambda: (bool_bytes(255), "bool tensor"),
}
