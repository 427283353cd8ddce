"""Loading straight into the output: range by range, several threads, bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import q8
import torch
from q8.codec.native import decode, decode_range
from q8.formats import _planes, stream
from q8.formats.planes import map_all

N = 3 * stream.MIN_RANGE + 12345  # several ranges and a partial last one


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_planes_decode_range_by_range(tmp_path, dtype):
    x = (torch.randn(N, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    x[:4] = torch.tensor([float("nan"), float("-inf"), -0.0, float("inf")], dtype=dtype)
    q8.save_file({"x": x}, tmp_path / "m.q8")
    with q8.safe_open(tmp_path / "m.q8") as f:
        assert f.info("x")["encoding"] == "planes"
        assert torch.equal(_bits(f.get_tensor("x")), _bits(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("row_length", [None, 1000, 333])
def test_codes_decode_range_by_range(tmp_path, dtype, row_length):
    """Ranges of a power of two bytes cut the blocks of a row layout: the cut blocks decode
    as the whole tensor's decode does."""
    x = torch.randn(3000, 1000, generator=torch.Generator().manual_seed(1)).to(dtype)
    if row_length == 333:
        x = x.reshape(-1)[: 333 * 9000].reshape(9000, 333)
    qt = q8.quantize(x, "dynamic", 256, row_length=row_length or x.numel())
    q8.save_file({"q": qt}, tmp_path / "m.q8")
    out = q8.load_file(tmp_path / "m.q8")["q"]
    assert out.dtype == dtype and torch.equal(_bits(out), _bits(qt.dequantize()))


@pytest.mark.parametrize("row_length", [4096, 1000, 333])
def test_decode_range_matches_the_whole_decode(row_length):
    n = row_length * 60
    qt = q8.quantize(torch.randn(n), "dynamic", 64, row_length=row_length)
    whole = decode(qt.codes, qt.absmax, qt.code, 64, row_length)
    for e0, e1 in [(0, n), (0, 1), (5, 70), (64, 128), (63, 1000), (n - 7, n), (900, 900 + 2 * row_length + 1)]:
        out = torch.empty(e1 - e0)
        decode_range(qt.codes[e0:e1], qt.absmax, qt.code, 64, row_length, e0, out)
        assert torch.equal(out, whole[e0:e1]), (e0, e1)


def test_compressed_raw_tensors_decode_range_by_range(tmp_path):
    tensors = {
        "zeros": torch.zeros(N, dtype=torch.int64),  # zstd, decoded in order across batches
        "nibbles": torch.randint(0, 16, (N,), generator=torch.Generator().manual_seed(2), dtype=torch.uint8),  # Huffman
    }
    q8.save_file(tensors, tmp_path / "m.q8")
    with q8.safe_open(tmp_path / "m.q8") as f:
        assert [f.record(k)["segments"][0][3] for k in tensors] == [1, 2]
        for name, x in tensors.items():
            assert torch.equal(f.get_tensor(name), x)


@pytest.mark.parametrize("plane", [0, 3])  # a raw mantissa plane, the Huffman exponent plane
def test_a_flipped_byte_in_a_late_range_is_a_checksum_error(tmp_path, plane):
    path = tmp_path / "m.q8"
    q8.save_file({"x": torch.randn(N)}, path)
    with q8.safe_open(path) as f:
        offset, stored, *_ = f.record("x")["segments"][plane]
    blob = bytearray(path.read_bytes())
    blob[offset + stored - 100] ^= 0x10
    path.write_bytes(blob)
    with pytest.raises(q8.FormatError, match=r"tensor 'x': checksum mismatch"):
        q8.load_file(path)
    with pytest.raises(q8.FormatError, match=r"tensor 'x': checksum mismatch"):
        q8.verify(path)


def test_a_file_truncated_after_opening_is_a_format_error(tmp_path):
    path = tmp_path / "m.q8"
    q8.save_file({"x": torch.randn(N)}, path)
    with q8.safe_open(path) as f:
        os.truncate(path, 4096)
        with pytest.raises(q8.FormatError, match=r"tensor 'x': file ends at"):
            f.get_tensor("x")


def test_load_needs_little_more_memory_than_the_data(tmp_path):
    """Peak resident memory of a fresh process loading 128 MB of fp32: the data, not data + a
    decoded copy of every plane (the old 2x). A small load first starts the threads and
    fills the pool of decode buffers, a one-time cost that later loads reuse (without the
    pool each tensor's buffers churn the allocator: 1.14x)."""
    path, warm = tmp_path / "m.q8", tmp_path / "warm.q8"
    q8.save_file({f"w{i}": torch.randn(2048, 4096) for i in range(4)}, path)
    q8.save_file({"w": torch.randn(4 * stream.MIN_RANGE)}, warm)
    code = f"""
        import q8, torch
        q8.load_file({str(warm)!r})
        def hwm():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = hwm()
        out = q8.load_file({str(path)!r})
        print(hwm() - before, sum(x.nbytes for x in out.values()))
    """
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    extra, data = map(int, result.stdout.split())
    assert extra <= 1.05 * data, f"{extra / data:.2f}x the data"


def test_an_error_is_raised_once_every_parallel_read_has_ended():
    """A failed tensor must not leave others still reading the file (the caller may delete
    or rewrite it as soon as it sees the error)."""
    ended = threading.Event()

    def read(i: int) -> int:
        if i == 0:
            raise q8.FormatError("bad")
        time.sleep(0.3)
        ended.set()
        return i

    with ThreadPoolExecutor(2) as pool, pytest.raises(q8.FormatError):
        map_all(pool, read, [0, 1])
    assert ended.is_set()


def test_crc32_is_zlibs_and_pieces_combine():
    """The format's checksum: zlib's CRC-32 for every length, alignment and starting value (the
    carry-less-multiply bulk, the byte loop around it), and CRCs of pieces join into the whole's."""
    data = bytes(torch.randint(0, 256, (70_000,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8))
    for n in [*range(0, 200), 1023, 4096, 65_537]:
        for offset in (0, 1, 7):
            piece = memoryview(data)[offset : offset + n]
            assert _planes.crc32(piece) == zlib.crc32(piece) and _planes.crc32(piece, 99) == zlib.crc32(piece, 99)
    for cut in (0, 1, 100, 69_999, 70_000):
        a, b = data[:cut], data[cut:]
        assert _planes.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)
