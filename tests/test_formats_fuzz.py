"""Fuzz the q8 reader: every mutated file loads identical tensors or raises q8.FormatError,
and `q8.verify` accepts exactly the files that load. The hostile corpus (tests/hostile.py)
goes through every reader, and is mutated further.

`make fuzz` runs the mutation fuzz far longer (Q8_FUZZ_EXAMPLES) with the C extensions
built under AddressSanitizer and UBSan.
"""

from __future__ import annotations

import functools
import os
import tempfile
import tracemalloc
from pathlib import Path

import hostile
import pytest
import q8
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from q8.formats.container import FOOTER, Reader
from q8.formats.planes import huffman_decode, huffman_encode
from q8.tools.convert import EXIT_CORRUPT
from q8.tools.convert import main as q8convert

FUZZ_EXAMPLES = int(os.environ.get("Q8_FUZZ_EXAMPLES", "2000"))


@functools.cache
def _originals() -> dict[str, bytes | object]:
    """Small valid files covering every encoding (raw, planes, blockwise, zstd or not), a
    nested state and an optimizer file (8-bit state stored as is, read in batches), with
    what they must load to."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "planes": torch.randn(1500, generator=g) * 0.02,
        "bf16": torch.randn(40, 40, generator=g).bfloat16(),
        "ids": torch.arange(300) % 7,  # raw, zstd
        "noise": torch.randint(0, 256, (200,), dtype=torch.uint8, generator=g),  # raw, stored as is
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "qt": q8.quantize(torch.randn(700, generator=g), "dynamic", 64),
        "rows": q8.quantize(torch.randn(7, 90, generator=g), "dynamic", 64, row_length=90),  # blockwise_rows
    }
    state = {"step": 3, "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}], "m": tensors["qt"], "v": tensors["rows"]}
    out = {}
    with tempfile.TemporaryDirectory() as d:
        q8.save_file(tensors, Path(d) / "t.q8", metadata={"k": "v"})
        q8.save(state, Path(d) / "s.q8")
        out["tensors"] = ((Path(d) / "t.q8").read_bytes(), tensors)
        out["state"] = ((Path(d) / "s.q8").read_bytes(), state)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
        opt = q8.optim.AdamW8bit(model.parameters(), min_8bit_size=1024, blocksize=256)
        model(torch.randn(4, 64, generator=g)).square().sum().backward()
        opt.step()
        q8.optim.save_optimizer(opt, Path(d) / "o.q8")
        out["optimizer"] = ((Path(d) / "o.q8").read_bytes(), q8.optim.load_optimizer_state_dict(Path(d) / "o.q8"))
    for name, build in hostile.CASES.items():  # expected None: each must fail to load, until mutated
        out[name] = (build()[0], None)
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, q8.QTensor):
        return (
            isinstance(b, q8.QTensor)
            and torch.equal(a.codes, b.codes)
            and torch.equal(a.absmax, b.absmax)
            and a.code == b.code
            and (a.blocksize, a.shape, a.dtype, a.row_length) == (b.blocksize, b.shape, b.dtype, b.row_length)
        )
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _mutate(data: st.DataObject, blob: bytes) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "overwrite"]))
    n = len(blob)
    if kind == "flip":
        out = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 4))):
            out[data.draw(st.integers(0, n - 1))] ^= 1 << data.draw(st.integers(0, 7))
        return bytes(out)
    if kind == "truncate":
        return blob[: data.draw(st.integers(0, n - 1))]
    a = data.draw(st.integers(0, n))
    b = data.draw(st.integers(a, min(n, a + 256)))
    c = data.draw(st.integers(0, n))
    if kind == "splice":  # move a chunk: insert a copy of blob[a:b] at c, maybe drop another
        d = data.draw(st.integers(c, min(n, c + 64)))
        return blob[:c] + blob[a:b] + blob[d:]
    return blob[:c] + data.draw(st.binary(min_size=1, max_size=16)) + blob[c + 1 :]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_files_load_identical_or_raise_format_error(tmp_path_factory, data):
    which = data.draw(st.sampled_from(sorted(_originals())))
    blob, expected = _originals()[which]
    path = tmp_path_factory.getbasetemp() / "fuzz.q8"
    path.write_bytes(_mutate(data, blob))
    load = {"tensors": q8.load_file, "optimizer": q8.optim.load_optimizer_state_dict}.get(which, q8.load)
    try:
        loaded = load(path)
    except q8.FormatError as e:
        assert str(path) in str(e)
        with pytest.raises(q8.FormatError):  # verify refuses whatever load refuses ...
            q8.verify(path)
        return
    q8.verify(path)  # ... and accepts whatever loads
    if expected is None:
        return
    if which == "tensors":  # decoded on load
        expected = {k: v.dequantize() if isinstance(v, q8.QTensor) else v for k, v in expected.items()}
    assert _same(expected, loaded)


@pytest.mark.parametrize("case", sorted(hostile.CASES))
def test_hostile_corpus_is_refused_by_every_reader(tmp_path, case, capsys):
    blob, match = hostile.CASES[case]()
    path = tmp_path / f"{case}.q8"
    path.write_bytes(blob)
    for read in (q8.load, q8.verify):
        with pytest.raises(q8.FormatError, match=match) as e:
            read(path)
        assert str(path) in str(e.value)
    assert q8convert(["verify", str(path)]) == EXIT_CORRUPT
    assert match in capsys.readouterr().out


def test_opening_a_huge_index_costs_a_small_multiple_of_its_size(tmp_path, monkeypatch):
    """100,000 empty tensor records (60 bytes each): opening parses none of them (only
    locates them and checks their segments) and allocates less than 5x the index (about
    100 bytes per record for the name table: 3.9x here, where records are 70 bytes)."""
    path = tmp_path / "many.q8"
    path.write_bytes(hostile.many_records(100_000))
    index_bytes = FOOTER.unpack_from(path.read_bytes(), path.stat().st_size - FOOTER.size)[1]
    parsed = []
    parse = Reader._parse_record
    monkeypatch.setattr(Reader, "_parse_record", lambda self, r: parsed.append(r) or parse(self, r))
    tracemalloc.start()
    try:
        f = q8.safe_open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * index_bytes, (peak, index_bytes)
    assert parsed == [] and len(f.keys()) == 100_000 and "t99999" in f
    assert f.get_tensor("t99999").shape == (0,) and len(parsed) == 1  # only the record asked for


@settings(max_examples=FUZZ_EXAMPLES // 4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_huffman_decoder_survives_any_chunk(data):
    """The compiled decoder (formats/_planes.c) on mutated and random chunks: an error
    message or `raw_length` bytes, never a crash (under `make fuzz`: never a sanitizer report)."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    n = data.draw(st.integers(1, 1 << 14))
    skew = data.draw(st.floats(0.5, 8.0))
    plain = (torch.rand(n, generator=g) ** skew * 256).to(torch.uint8)
    packed = huffman_encode(plain)
    stored = bytearray(b"".join(packed) if packed else data.draw(st.binary(min_size=4, max_size=4096)))
    for _ in range(data.draw(st.integers(0, 6))):
        stored[data.draw(st.integers(0, len(stored) - 1))] = data.draw(st.integers(0, 255))
    out = huffman_decode(memoryview(bytes(stored)), n)
    assert isinstance(out, str) or out.numel() == n
