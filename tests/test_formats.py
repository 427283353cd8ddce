"""The q8 container: round trips, API, atomic saves, sharding, zero-copy, bad input."""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import json
import os
import struct
import subprocess
import sys
import zlib

import msgpack
import pytest
import q8
import torch
from q8.formats import DTYPES, FORMAT_VERSION, MAGIC
from q8.formats.container import FOOTER

SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (33, 65), (2, 3, 4, 5)]


def _sample(dtype: torch.dtype, shape: tuple, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point and dtype.itemsize >= 2:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
        y = x.to(dtype)
        if y.numel() >= 4:  # specials must survive bit for bit
            flat = y.view(-1)
            flat[:4] = torch.tensor([float("nan"), float("-inf"), -0.0, float("inf")], dtype=dtype)
        return y
    # every other dtype (ints, fp8, fp4): random bytes are valid values
    nbytes = dtype.itemsize * torch.Size(shape).numel()
    return torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8).view(dtype).view(shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_round_trip_every_dtype_and_shape(tmp_path, dtype):
    tensors = {f"t{i}": _sample(dtype, s, i) for i, s in enumerate(SHAPES)}
    tensors["big"] = _sample(dtype, (5000,), 99)  # large enough for planes / zstd
    tensors["strided"] = _sample(dtype, (40, 30), 7).t()[::2]  # non-contiguous
    path = tmp_path / "m.q8"
    q8.save_file(tensors, path)
    out = q8.load_file(path)
    assert list(out) == list(tensors)
    for name, x in tensors.items():
        assert _same(x.contiguous(), out[name]), name
    q8.verify(path)


def test_lossless_floats_use_planes_and_compress(tmp_path):
    x = torch.randn(256, 1024) * 0.02
    small = {"small": x.flatten()[:4095].clone(), "zeros": torch.zeros(4095), "planes": x.flatten()[:4096].clone()}
    q8.save_file({"w": x, "b": x.bfloat16(), **small}, tmp_path / "m.q8")
    with q8.safe_open(tmp_path / "m.q8") as f:
        assert f.info("w")["encoding"] == "planes" and f.info("planes")["encoding"] == "planes"
        assert f.info("w")["stored_bytes"] < 0.9 * x.nbytes
        assert f.info("b")["stored_bytes"] < 0.75 * x.bfloat16().nbytes
        # under 4096 elements (16 KiB): stored as they are, however well they would compress
        assert [f.record(n)["encoding"] for n in ("small", "zeros")] == ["raw", "raw"]
        assert [f.record(n)["segments"][0][3] for n in ("small", "zeros")] == [0, 0]


def test_tensors_stored_as_is_are_read_together(tmp_path):
    """Uncompressed segments are read several per preadv (more than IOV_MAX of them here, with
    the alignment padding between them), each into memory of its own, from a file or from memory."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(700):
        tensors[f"q.{i}"] = q8.quantize(torch.randn(64 + i % 3, generator=g), "dynamic", 64)
        tensors[f"x.{i}"] = torch.randint(0, 9, (i % 5,), dtype=torch.int16)
    tensors["planes"] = torch.randn(5000, generator=g)  # compressed: read on its own, between batches
    path = tmp_path / "m.q8"
    q8.save_file(tensors, path, compress_codes=False)
    with q8.safe_open(path) as f:
        assert sum(len(f.record(n)["segments"]) for n in f.keys()) > 2 * os.sysconf("SC_IOV_MAX")
        got = q8.formats.read_tensors(f, copy=True)
    with q8.formats.Reader("<bytes>", data=path.read_bytes()) as f:
        from_memory = q8.formats.read_tensors(f, copy=True)
    for out in (got, from_memory):
        assert list(out) == list(tensors)
        for name, x in tensors.items():
            y = out[name]
            if isinstance(x, q8.QTensor):
                assert torch.equal(y.codes, x.codes) and torch.equal(y.absmax, x.absmax) and y.shape == x.shape
            else:
                assert y.dtype == x.dtype and torch.equal(y, x)
    parts = [t for y in got.values() for t in ((y.codes, y.absmax) if isinstance(y, q8.QTensor) else (y,))]
    assert len({t.untyped_storage().data_ptr() for t in parts if t.numel()}) == sum(t.numel() > 0 for t in parts)


def test_a_writer_starts_writing_back_as_it_goes(tmp_path, monkeypatch):
    """Every 8 MiB a save asks the kernel to write what it has written so far, so that its
    final fsync waits for less; the ranges cover the file from its start, in order."""
    from q8.formats import container

    calls = []
    monkeypatch.setattr(container, "start_writeback", lambda fd, offset, length: calls.append((offset, length)))
    tensors = {f"x.{i}": torch.randint(0, 255, (3 << 20,), dtype=torch.uint8) for i in range(7)}
    q8.save_file(tensors, tmp_path / "m.q8")
    assert len(calls) >= 2 and calls[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(calls))


def test_quantize_policy(tmp_path):
    tensors = {
        "w": torch.randn(128, 256),
        "norm": torch.ones(256),
        "ids": torch.arange(5000),
        "mask": torch.ones(5000, dtype=torch.bool),
        "inf": torch.full((5000,), float("inf")),
        "qt": q8.quantize(torch.randn(4096), "dynamic", 256),
    }
    path = tmp_path / "m.q8"
    q8.save_file(tensors, path, quantize=True, code="linear", blocksize=256)
    with q8.safe_open(path) as f:
        info = {n: f.info(n) for n in f.keys()}
        assert info["w"]["encoding"] == "blockwise" and info["w"]["code"] == "linear" and info["w"]["blocksize"] == 256
        assert info["qt"]["encoding"] == "blockwise" and info["qt"]["code"] == "dynamic"
        for name in ("norm", "ids", "mask", "inf"):
            assert info[name]["encoding"] != "blockwise", name
            assert torch.equal(f.get_tensor(name), tensors[name])
        qt = f.get_qtensor("qt")
        assert torch.equal(qt.codes, tensors["qt"].codes) and torch.equal(qt.absmax, tensors["qt"].absmax)
        expected = q8.quantize(tensors["w"], "linear", 256)
        assert torch.equal(f.get_qtensor("w").codes, expected.codes)
        assert torch.equal(f.get_tensor("w"), expected.dequantize())
        with pytest.raises(ValueError, match="norm"):
            f.get_qtensor("norm")
    q8.save_file(tensors, tmp_path / "p.q8", quantize=lambda name, x: name == "norm")
    with q8.safe_open(tmp_path / "p.q8") as f:
        assert f.info("norm")["encoding"] == "blockwise" and f.info("w")["encoding"] == "planes"


def test_code_tables_stored_once(tmp_path):
    tensors = {f"q{i}": q8.quantize(torch.randn(1000), "dynamic", 64) for i in range(5)}
    q8.save_file(tensors, tmp_path / "m.q8")
    blob = (tmp_path / "m.q8").read_bytes()
    offset, length = FOOTER.unpack_from(blob, len(blob) - FOOTER.size)[:2]
    index = msgpack.unpackb(blob[offset : offset + length])
    assert len(index["codes"]) == 1 and all(r["code"] == 0 for r in index["tensors"])


def test_stored_nbytes_and_code_nbytes_predict_the_file(tmp_path):
    """What q8convert's search ranks options by: the bytes the writer stores for a tensor
    (compressed where it pays) and for a new code table, without writing."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "q": q8.quantize(torch.randn(300, 700, generator=g) * 0.02, q8.linear_code(levels=90), 256),
        "zeros": q8.quantize(torch.zeros(50_000), "dynamic", 64),  # zstd-coded codes
        "w": torch.randn(20_000, generator=g),  # planes
        "ids": torch.arange(500),  # raw
    }
    q8.save_file(tensors, tmp_path / "m.q8")
    with q8.safe_open(tmp_path / "m.q8") as f:
        for k, t in tensors.items():
            assert q8.formats.stored_nbytes(t) == f.info(k)["stored_bytes"], k
    blob = (tmp_path / "m.q8").read_bytes()
    offset, length = FOOTER.unpack_from(blob, len(blob) - FOOTER.size)[:2]
    entries = msgpack.unpackb(blob[offset : offset + length])["codes"]
    assert [e["name"] for e in entries] == ["linear-90", "dynamic"]
    for entry, code in zip(entries, (q8.linear_code(levels=90), q8.dynamic_code()), strict=True):
        assert len(msgpack.packb(entry, use_bin_type=True)) == q8.formats.code_nbytes(code)


def test_writer_streams_metadata_and_extra(tmp_path):
    path = tmp_path / "m.q8"
    with q8.Writer(path, metadata={"step": "7"}) as w:
        w.add("a", torch.randn(3000))
        w.add("b", torch.randn(3000), lossless=False, extra={"rel_l2": "0.01"})
        assert not path.exists()  # nothing under the final name until the writer closes
    with q8.safe_open(path) as f:
        assert f.metadata() == {"step": "7"}
        assert f.info("b")["extra"] == {"rel_l2": "0.01"} and f.info("b")["encoding"] == "blockwise"
        assert f.q8_metadata["writer"].startswith("q8 ")


def test_nested_save_load(tmp_path):
    qt = q8.quantize(torch.randn(5000), "dynamic", 256)
    shared = torch.randn(10)
    obj = {
        "state": {0: {"exp_avg": qt, "step": torch.tensor(4.0)}, 1: {}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "name": None, "flag": True}],
        "blob": b"\x00\x01",
        "tied": [shared, shared],
        "big": 2**63,
    }
    path = tmp_path / "s.q8"
    q8.save(obj, path, metadata={"kind": "optimizer"})
    out = q8.load(path)
    assert out["param_groups"] == obj["param_groups"] and out["blob"] == b"\x00\x01" and out["big"] == 2**63
    assert isinstance(out["param_groups"][0]["betas"], tuple)
    got = out["state"][0]["exp_avg"]
    assert isinstance(got, q8.QTensor) and torch.equal(got.codes, qt.codes) and got.code == qt.code
    assert torch.equal(out["state"][0]["step"], obj["state"][0]["step"]) and out["state"][1] == {}
    assert torch.equal(out["tied"][0], shared) and out["tied"][0] is out["tied"][1]
    with q8.safe_open(path) as f:
        assert len(f.keys()) == 3  # the tied tensor is stored once
    q8.verify(path)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"a": object()}, "cannot store object at 'a'"),
        ({1.5: 1}, "keys must be str or int"),
        ({"x": [1, {2}]}, "cannot store set"),
        ({"x": 2**64}, "64 bits"),
        ({"q": torch.zeros(2).to_sparse()}, "layout"),
    ],
)
def test_save_rejects_unsupported_before_writing(tmp_path, obj, match):
    path = tmp_path / "s.q8"
    with pytest.raises((TypeError, ValueError), match=match):
        q8.save(obj, path)
    assert os.listdir(tmp_path) == []


def test_save_file_rejects_bad_input_before_writing(tmp_path):
    path = tmp_path / "m.q8"
    for bad, match in [
        ({1: torch.zeros(1)}, "non-empty str"),
        ({"a": [1, 2]}, "must be a torch.Tensor"),
        ({"a": torch.zeros(2, dtype=torch.uint1)}, "cannot hold dtype"),
    ]:
        with pytest.raises(TypeError, match=match):
            q8.save_file(bad, path)
    with pytest.raises(TypeError, match="metadata"):
        q8.save_file({"a": torch.zeros(1)}, path, metadata={"a": 1})
    with pytest.raises(ValueError, match="blocksize"):
        q8.save_file({"a": torch.zeros(1)}, path, blocksize=100)
    with pytest.raises(ValueError, match="max_shard_size"):
        q8.save_file({"a": torch.zeros(1)}, path, max_shard_size="lots")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="duplicate"), q8.Writer(path) as w:
        w.add("a", torch.zeros(1))
        w.add("a", torch.zeros(1))
    assert os.listdir(tmp_path) == []


def test_atomic_save_keeps_previous_file(tmp_path):
    path = tmp_path / "m.q8"
    q8.save_file({"old": torch.arange(10)}, path)
    before = path.read_bytes()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), q8.Writer(path) as w:
        w.add("new", torch.randn(100_000))
        raise Boom
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.q8"]
    # an exception from inside save (an unsupported object met mid-write) as well
    with pytest.raises(TypeError):
        with q8.Writer(path) as w:
            w.add("new", torch.randn(100_000))
            w.add("bad", "not a tensor")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.q8"]
    assert torch.equal(q8.load_file(path)["old"], torch.arange(10))


_HANGING_WRITER = """
import sys, time, torch, q8
with q8.Writer(sys.argv[1]) as w:
    w.add("a", torch.randn(1000))
    print("ready", flush=True)
    time.sleep(120)
"""


_ABANDONED_WRITER = """
import sys, torch, q8
w = q8.Writer(sys.argv[1])  # never closed: the process ends with an error
w.add("a", torch.randn(1000))
raise SystemExit("gave up")
"""


def test_a_writer_never_closed_leaves_no_temp_file(tmp_path):
    path = tmp_path / "m.q8"
    w = q8.Writer(path)
    w.add("a", torch.ones(3))
    del w  # garbage collected (CPython: at once)
    assert list(tmp_path.iterdir()) == []
    done = subprocess.run([sys.executable, "-c", _ABANDONED_WRITER, str(path)], capture_output=True)
    assert done.returncode == 1 and list(tmp_path.iterdir()) == []  # removed at interpreter exit


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_later_save_removes_what_killed_writers_left(tmp_path):
    path = tmp_path / "m.q8"
    writer = subprocess.Popen([sys.executable, "-c", _HANGING_WRITER, str(path)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"ready\n"
        (live,) = [p.name for p in tmp_path.iterdir()]
        q8.save_file({"x": torch.ones(2)}, path)  # a writer still at work keeps its file
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, "m.q8"])
    finally:
        writer.kill()
        writer.wait()
    q8.save({"y": torch.ones(3)}, path)  # killed: nothing could clean up but the next save
    assert [p.name for p in tmp_path.iterdir()] == ["m.q8"]
    assert torch.equal(q8.load(path)["y"], torch.ones(3))


def test_stale_temp_files_are_judged_by_lock_and_pid(tmp_path):
    path, dead = tmp_path / "m.q8", _dead_pid()
    stale = tmp_path / f".m.q8.{dead}.0123abcd.tmp"  # dead pid, unlocked: removed
    reused = tmp_path / f".m.q8.{os.getpid()}.0123abcd.tmp"  # pid running (perhaps reused): kept
    locked = tmp_path / f".m.q8.{dead}.4567abcd.tmp"  # dead here, locked (another pid namespace): kept
    other = tmp_path / f".n.q8.{dead}.0123abcd.tmp"  # another destination's: kept
    link = tmp_path / f".m.q8.{dead}.89abcdef.tmp"  # never followed
    for p in (stale, reused, locked, other):
        p.write_bytes(b"partial")
    link.symlink_to(other)
    with open(locked, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        q8.save_file({"x": torch.ones(2)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (path, reused, locked, other, link))
    assert other.read_bytes() == b"partial"


_FSIZE_LIMITED_SAVE = """
import os, resource, signal, sys, torch, q8
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    q8.save_file({"w": torch.randn(1 << 20)}, sys.argv[1])
except OSError as e:
    print("refused:", os.strerror(e.errno))
"""


def test_a_save_refused_by_the_file_size_limit_leaves_no_temp_file(tmp_path):
    path = tmp_path / "m.q8"
    q8.save_file({"old": torch.arange(10)}, path)
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", _FSIZE_LIMITED_SAVE, str(path)], capture_output=True, check=True)
    assert done.stdout.decode().startswith("refused: File too large"), done
    assert [p.name for p in tmp_path.iterdir()] == ["m.q8"] and path.read_bytes() == before


@pytest.mark.parametrize("name", ["x" * 252 + ".q8", "é" * 126 + ".q8"], ids=["255-ascii", "255-utf8"])
def test_names_up_to_255_bytes_save(tmp_path, name):
    path = tmp_path / name
    assert len(os.fsencode(path.name)) == 255
    q8.save_file({"w": torch.ones(3)}, path)
    q8.save_file({"w": torch.zeros(3)}, path)  # and a second save (cleanup of the same names) replaces it
    assert torch.equal(q8.load_file(path)["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_sharding(tmp_path):
    tensors = {f"layer{i}.w": torch.randn(64, 64) for i in range(10)}
    tensors["ids"] = torch.arange(7)
    path = tmp_path / "model.q8"
    q8.save_file({"stale": torch.zeros(1)}, path)
    q8.save_file(tensors, path, metadata={"m": "1"}, max_shard_size=40_000)
    files = sorted(os.listdir(tmp_path))
    assert "model.q8" not in files and "model.q8.index.json" in files
    shards = [f for f in files if f.endswith(".q8")]
    assert len(shards) == 5 and shards[0] == "model-00001-of-00005.q8"  # two 16 KB tensors per shard
    index = json.loads((tmp_path / "model.q8.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["format"] == "q8"
    for p in (path, tmp_path / "model.q8.index.json"):
        out = q8.load_file(p)
        assert list(out) == list(tensors) and all(torch.equal(out[k], tensors[k]) for k in tensors)
    with q8.safe_open(path) as f:
        assert f.metadata() == {"m": "1"} and f.info("ids")["shape"] == (7,)
    q8.verify(path)
    (tmp_path / shards[2]).unlink()
    with pytest.raises(q8.FormatError, match="missing"):
        q8.load_file(path)


def test_bad_index_json(tmp_path):
    p = tmp_path / "m.q8.index.json"
    for text in ["{", '{"weight_map": {"a": "../x.q8"}}', '{"weight_map": [1]}', "\xff"]:
        p.write_bytes(text.encode("latin-1"))
        with pytest.raises(q8.FormatError, match=r"m\.q8\.index\.json"):
            q8.load_file(p)


def test_uncompressed_tensors_are_zero_copy(tmp_path):
    x = torch.randint(-(2**31), 2**31 - 1, (300, 70), dtype=torch.int32)  # incompressible: stored raw
    path = tmp_path / "m.q8"
    q8.save_file({"x": x}, path)
    with q8.safe_open(path) as f:
        y = f.get_tensor("x")
        mm = f._mm
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        assert base <= y.data_ptr() < base + len(mm) and (y.data_ptr() - base) % 64 == 0
    assert torch.equal(y, x)  # still valid after the reader closed
    y[0, 0] = 5  # copy-on-write: the file is unchanged
    assert torch.equal(q8.load_file(path)["x"], x)


def test_random_access_reads_only_needed_segments(tmp_path):
    path = tmp_path / "m.q8"
    q8.save_file({"a": torch.randn(50_000), "b": torch.arange(1000)}, path)
    with q8.safe_open(path) as f:
        seg = f.record("a")["segments"][3]  # the exponent plane of "a"
    blob = bytearray(path.read_bytes())
    blob[seg[0] + 5] ^= 0xFF  # corrupt "a" only
    path.write_bytes(blob)
    with q8.safe_open(path) as f:
        assert torch.equal(f.get_tensor("b"), torch.arange(1000))
        with pytest.raises(q8.FormatError, match=r"tensor 'a'.*checksum"):
            f.get_tensor("a")
    with pytest.raises(q8.FormatError, match="checksum"):
        q8.verify(path)


def _valid(tmp_path) -> bytes:
    q8.save_file({"w": torch.randn(3000), "i": torch.arange(5)}, tmp_path / "v.q8")
    return (tmp_path / "v.q8").read_bytes()


def _rewrite_index(blob: bytes, edit) -> bytes:
    offset, length = FOOTER.unpack_from(blob, len(blob) - FOOTER.size)[:2]
    index = msgpack.unpackb(blob[offset : offset + length])
    edit(index)
    new = msgpack.packb(index, use_bin_type=True)
    return blob[:offset] + new + FOOTER.pack(offset, len(new), zlib.crc32(new), FORMAT_VERSION, MAGIC)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b[:10], "too short"),
        (lambda b: b[:-1], "footer"),
        (lambda b: b"NOTQ8!!!" + b[8:], "not a q8 file"),
        (lambda b: b[:8] + struct.pack("<I", 9) + b[12:], "newer"),
        (lambda b: b[:-32] + bytes([b[-32] ^ 1]) + b[-31:], "index"),
        (lambda b: _rewrite_index(b, lambda i: i["tensors"].append(dict(i["tensors"][0]))), "duplicate"),
        (lambda b: _rewrite_index(b, lambda i: i["tensors"][0].update(dtype="float128")), "unknown dtype"),
        (lambda b: _rewrite_index(b, lambda i: i["tensors"][0].update(shape=[2**40, 2**40])), "too large"),
        (lambda b: _rewrite_index(b, lambda i: i["tensors"][0].update(shape=[3001])), "the shape needs"),
        (lambda b: _rewrite_index(b, lambda i: i["tensors"][1]["segments"][0].__setitem__(0, 1 << 40)), "outside"),
        (lambda b: _rewrite_index(b, lambda i: i["tensors"][1]["segments"][0].__setitem__(0, 64)), "overlap"),
        (lambda b: _rewrite_index(b, lambda i: i["tensors"][0].update(encoding="magic")), "unknown encoding"),
        (lambda b: _rewrite_index(b, lambda i: i["metadata"].update(k=1)), "metadata"),
        (lambda b: _rewrite_index(b, lambda i: i["tensors"][1].update(name=b"\xff\xfe")), "name"),
    ],
)
def test_malformed_files_raise_format_error(tmp_path, mutate, match):
    bad = tmp_path / "bad.q8"
    bad.write_bytes(mutate(_valid(tmp_path)))
    with pytest.raises(q8.FormatError, match=match) as e:
        q8.load_file(bad)
    assert "bad.q8" in str(e.value)


def test_bad_utf8_in_index(tmp_path):
    blob = _valid(tmp_path)
    offset, length = FOOTER.unpack_from(blob, len(blob) - FOOTER.size)[:2]
    index = blob[offset : offset + length].replace(b"\xa1w", b"\xa1\xff")  # the name "w"
    bad = tmp_path / "bad.q8"
    bad.write_bytes(blob[:offset] + index + FOOTER.pack(offset, length, zlib.crc32(index), FORMAT_VERSION, MAGIC))
    with pytest.raises(q8.FormatError, match="UTF-8"):
        q8.load_file(bad)


def test_zstd_bomb_and_lying_sizes(tmp_path):
    """A zstd segment claiming more (or less) than it holds fails without allocating it."""
    path = tmp_path / "m.q8"
    q8.save_file({"z": torch.zeros(1 << 16, dtype=torch.int64)}, path)
    with q8.safe_open(path) as f:
        assert f.record("z")["segments"][0][3] == 1  # zstd
    blob = path.read_bytes()

    def lie(i):
        i["tensors"][0]["shape"] = [1 << 40]
        i["tensors"][0]["segments"][0][2] = 8 << 40

    bad = tmp_path / "bad.q8"
    bad.write_bytes(_rewrite_index(blob, lie))
    with pytest.raises(q8.FormatError, match="zstd frame holds"):
        q8.load_file(bad)


def test_missing_tensor_is_key_error(tmp_path):
    q8.save_file({"a": torch.zeros(1)}, tmp_path / "m.q8")
    with q8.safe_open(tmp_path / "m.q8") as f, pytest.raises(KeyError, match="'b'"):
        f.get_tensor("b")


def _huffman_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    fib = torch.cat([torch.full((int(1.6**i) + 1,), i, dtype=torch.uint8) for i in range(30)])  # lengths > 11
    mixed = torch.cat([torch.zeros(1 << 20, dtype=torch.uint8), torch.randint(0, 256, (1 << 20,), generator=g)])
    return [
        torch.full((5000,), 7, dtype=torch.uint8),  # one symbol
        (torch.randn(300_000, generator=g).abs() * 4).to(torch.uint8),
        (torch.rand(9999, generator=g) ** 8 * 256).to(torch.uint8),
        fib,
        mixed.to(torch.uint8),  # a chunk that is stored as is
    ]


def test_huffman_round_trip_and_corruption():
    from q8.formats.planes import huffman_decode, huffman_encode

    g = torch.Generator().manual_seed(2)
    for x in _huffman_cases():
        pieces = huffman_encode(x)
        assert pieces is not None
        packed = b"".join(pieces)
        assert len(packed) < x.numel()
        assert torch.equal(huffman_decode(memoryview(packed), x.numel()), x)
        for _ in range(50):  # corrupt chunks decode to an error message or to something, never crash
            bad = bytearray(packed)
            bad[int(torch.randint(0, len(bad), (1,), generator=g))] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
            out = huffman_decode(memoryview(bytes(bad)), x.numel())
            assert isinstance(out, str) or out.numel() == x.numel()
        assert isinstance(huffman_decode(memoryview(packed)[:-1], x.numel()), str)
        assert isinstance(huffman_decode(memoryview(packed), 8 * len(packed) + 1), str)  # cannot hold it
    assert huffman_encode(torch.randint(0, 256, (10_000,), dtype=torch.uint8, generator=g)) is None


def _dyadic(longest: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n bytes whose Huffman code is lengths 1, 2, ..., longest - 1, longest, longest:
    symbol k (k < longest) with probability 2^-(k + 1), the last two with the rest."""
    p = torch.tensor([2.0 ** -(k + 1) for k in range(longest)] + [2.0**-longest])
    return (torch.multinomial(p, n, replacement=True, generator=g) * 3 + 40).to(torch.uint8)


def test_huffman_decoder_every_code_length_and_stream_end():
    """The decoder (several symbols per table lookup while each of the 4 streams has room,
    then one by one) against the input: longest codes of 1..11 bits, sizes around the
    ends of its batches and a chunk boundary, and a stream whose recorded size is off."""
    from q8.formats.planes import HUFFMAN_CHUNK, huffman_decode, huffman_encode

    g = torch.Generator().manual_seed(5)
    for longest in range(1, 12):
        x = _dyadic(longest, 1 << 15, g)
        chunk = bytes(memoryview(huffman_encode(x)[1]).cast("B"))
        lengths = [(chunk[2 + k // 2] >> (4 * (k & 1))) & 15 for k in range(chunk[1] - chunk[0] + 1)]
        assert max(lengths) == longest
        for n in [*range(120, 200), 255, 256, 257, 1001, 2999, 3000]:
            packed = huffman_encode(x[:n])
            if packed is not None:
                assert torch.equal(huffman_decode(memoryview(b"".join(packed)), n), x[:n]), (longest, n)
    x = _dyadic(6, HUFFMAN_CHUNK + 37, g)  # a full chunk and a short one
    assert torch.equal(huffman_decode(memoryview(b"".join(huffman_encode(x))), x.numel()), x)
    packed = bytearray(b"".join(huffman_encode(x[:5000])))
    sizes = 4 + 4 + 2 + (packed[9] - packed[8] + 2) // 2  # segment header, then the chunk's lengths
    m0, m1 = struct.unpack_from("<2I", packed, sizes)
    struct.pack_into("<2I", packed, sizes, m0 + 1, m1 - 1)  # stream 0 one byte longer, same total
    assert huffman_decode(memoryview(bytes(packed)), 5000) == "Huffman chunk is malformed"


def _optimal_limited_bits(hist: list[int], maxlen: int = 11) -> int:
    """The fewest bits any prefix code with lengths <= maxlen spends on `hist`, by the
    coin collector's problem: each symbol is a coin of every denomination 2^-1..2^-maxlen
    (its frequency is its cost); the cheapest coins worth n - 1 in total give the lengths."""
    coins = sorted(f for f in hist if f)
    items = [(f, 1) for f in coins]  # (cost, leaves inside) at the deepest level
    for _ in range(maxlen - 1):
        packages = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(items[::2], items[1::2], strict=False)]
        items = sorted([(f, 1) for f in coins] + packages, key=lambda item: item[0])
    return sum(cost for cost, _ in items[: 2 * len(coins) - 2])


def test_huffman_code_lengths_are_optimal_within_the_limit():
    """Where the Huffman code needs more than 11 bits, the lengths are the best ones of at
    most 11 bits (package-merge), not those of a flattened histogram."""
    from q8.formats.planes import huffman_encode

    torch.manual_seed(3)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1 << 20,)) * 12  # tails that want 14-bit codes
    x = (laplace.round().clamp(-127, 127) + 128).to(torch.uint8)
    chunk = bytes(memoryview(huffman_encode(x)[1]).cast("B"))
    first, last = chunk[0], chunk[1]
    lengths = [(chunk[2 + k // 2] >> (4 * (k & 1))) & 15 for k in range(last - first + 1)]
    hist = torch.bincount(x.long(), minlength=256).tolist()
    assert max(lengths) == 11
    assert sum(hist[first + k] * n for k, n in enumerate(lengths)) == _optimal_limited_bits(hist)


def test_exponent_planes_use_huffman(tmp_path):
    path = tmp_path / "m.q8"
    q8.save_file({"w": torch.randn(512, 512) * 0.02}, path)
    with q8.safe_open(path) as f:
        compressions = [s[3] for s in f.record("w")["segments"]]
    assert compressions == [0, 0, 0, 2]  # mantissa planes raw, the exponent plane Huffman coded


def test_row_layout_records(tmp_path):
    """QTensors whose rows cut blocks are `blockwise_rows` records with their row_length (which
    a reader without rows rejects as an unknown encoding); any other is plain `blockwise`."""
    rows = q8.quantize(torch.randn(30, 100), "dynamic", 64, row_length=100)
    whole = q8.quantize(torch.randn(30, 128), "dynamic", 64, row_length=128)  # rows of whole blocks: flat
    q8.save({"rows": rows, "whole": whole}, tmp_path / "r.q8")  # nested, as save_optimizer's QTensors go
    back = q8.load(tmp_path / "r.q8")
    for name, qt in (("rows", rows), ("whole", whole)):
        got = back[name]
        assert (got.row_length, got.shape) == (qt.row_length, qt.shape)
        assert torch.equal(got.codes, qt.codes) and torch.equal(got.absmax, qt.absmax)
    assert torch.equal(q8.load_file(tmp_path / "r.q8")["rows"], rows.dequantize())
    blob = (tmp_path / "r.q8").read_bytes()
    offset, length = FOOTER.unpack_from(blob, len(blob) - FOOTER.size)[:2]
    records = {t["name"]: t for t in msgpack.unpackb(blob[offset : offset + length])["tensors"]}
    assert (records["rows"]["encoding"], records["rows"]["row_length"]) == ("blockwise_rows", 100)
    assert records["whole"]["encoding"] == "blockwise" and "row_length" not in records["whole"]

    def edit(**fields):
        def apply(index):
            next(t for t in index["tensors"] if t["name"] == "rows").update(fields)

        bad = tmp_path / "bad.q8"
        bad.write_bytes(_rewrite_index(blob, apply))
        return bad

    for fields in ({"row_length": 7}, {"row_length": 128}, {"row_length": 3000}, {"row_length": "100"}, {}):
        fields = fields or {"row_length": None}
        with pytest.raises(q8.FormatError, match=r"bad\.q8, tensor 'rows': row_length"):
            q8.load(edit(**fields))
    with pytest.raises(q8.FormatError, match="the shape needs"):  # flat blocks: another absmax count
        q8.load(edit(encoding="blockwise"))


def test_writer_refuses_what_the_reader_would_refuse(tmp_path):
    """q8 reads everything q8 writes: tensors that would fail the reader's value checks are
    refused at save, before the destination is touched."""
    path = tmp_path / "m.q8"
    code = q8.codec.get_code("dynamic")
    ok = q8.QTensor(torch.full((64,), 255, dtype=torch.uint8), torch.tensor([65504.0]), code, 64, (64,), torch.float16)
    q8.save_file({"q": ok}, path)  # fp16's largest value: decodes exactly to it
    assert q8.load_file(path)["q"].max() == 65504
    bad = {
        "absmax": q8.QTensor(ok.codes, torch.tensor([float("nan")]), code, 64, (64,), torch.float32),
        "overflow": q8.QTensor(ok.codes, torch.tensor([65520.0]), code, 64, (64,), torch.float16),  # rounds to inf
        "bool": torch.tensor([0, 1, 2], dtype=torch.uint8).view(torch.bool),
    }
    for name, x in bad.items():
        with pytest.raises(ValueError, match=rf"tensor {name!r}|QTensor {name!r}"):
            q8.save_file({name: x}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.q8"]


def test_nesting_limit_is_the_same_for_save_and_load(tmp_path):
    deepest = 1
    for _ in range(127):
        deepest = (deepest,)
    q8.save({"a": deepest}, tmp_path / "s.q8")
    assert q8.load(tmp_path / "s.q8") == {"a": deepest}
    with pytest.raises(ValueError, match="nested deeper than 128"):
        q8.save({"a": (deepest,)}, tmp_path / "s.q8")
