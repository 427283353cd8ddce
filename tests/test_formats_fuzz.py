"""Fuzz the q8 reader: every mutated file loads identical tensors or raises q8.FormatError."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import q8
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@functools.cache
def _originals() -> dict[str, bytes | object]:
    """Small valid files covering every encoding (raw, planes, blockwise, zstd or not) and a
    nested state, with what they must load to."""
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


@settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_files_load_identical_or_raise_format_error(tmp_path_factory, data):
    which = data.draw(st.sampled_from(["tensors", "state"]))
    blob, expected = _originals()[which]
    path = tmp_path_factory.getbasetemp() / "fuzz.q8"
    path.write_bytes(_mutate(data, blob))
    try:
        loaded = q8.load_file(path) if which == "tensors" else q8.load(path)
    except q8.FormatError as e:
        assert str(path) in str(e)
        return
    if which == "tensors":  # decoded on load
        expected = {k: v.dequantize() if isinstance(v, q8.QTensor) else v for k, v in expected.items()}
    assert _same(expected, loaded)
    q8.verify(path)  # whatever loads identically also verifies
