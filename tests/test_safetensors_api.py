"""The safetensors-style API: safe_open's signature, get_slice, offset_keys, the bytes API,
shared tensors refused by save_file, save_model / load_model with tied weights."""

from __future__ import annotations

import pytest
import q8
import torch


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """One file with every encoding get_slice reads: raw, byte planes, bool, 8-bit flat, 8-bit rows."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 80, generator=g)
    rows = q8.QTensor(
        torch.randint(0, 256, (100 * 300,), dtype=torch.uint8, generator=g),  # uniform codes: stored raw
        torch.rand(100 * 2, generator=g),
        q8.dynamic_code(),
        256,
        (100, 300),
        torch.float32,
        300,
    )
    tensors = {
        "ints": torch.randint(-(2**31), 2**31 - 1, (40, 7), dtype=torch.int32, generator=g),
        "planes": torch.randn(64, 33, generator=g),
        "bf16": torch.randn(50, 40, generator=g).bfloat16(),
        "mask": torch.rand(30, 5, generator=g) > 0.5,
        "flat8": q8.quantize(weight, "linear", 256),
        "rows8": rows,
        "vector": torch.randn(3000, generator=g),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path_factory.mktemp("slices") / "m.q8"
    q8.save_file(tensors, path, metadata={"step": "7"})
    return path


INDEXES = [
    (slice(None),),
    (3,),
    (-1,),
    (slice(2, 10),),
    (slice(2, 30, 7),),
    (slice(5, 2),),
    (Ellipsis, slice(1, 4)),
    (slice(1, 5), slice(2, 7)),
    (slice(20, None), 1),
]


def test_safe_open_takes_safetensors_signature(stored):
    with q8.safe_open(stored, "pt", device="cpu") as f:
        assert f.offset_keys() == f.keys() == list(f) and len(f) == 8
        assert "planes" in f and "nothing" not in f
        assert f.metadata() == {"step": "7"}
    with q8.safe_open(stored, framework="pt") as f:
        assert torch.equal(f.get_tensor("ints"), q8.load_file(stored)["ints"])
    with pytest.raises(ValueError, match="framework must be 'pt'"):
        q8.safe_open(stored, framework="np")
    with pytest.raises(ValueError, match=r"pass the device by name"):
        q8.safe_open(stored, "cpu")


@pytest.mark.parametrize("name", ["ints", "planes", "bf16", "mask", "flat8", "rows8", "vector"])
def test_get_slice_equals_indexing_the_tensor(stored, name):
    with q8.safe_open(stored, "pt") as f:
        whole = f.get_tensor(name)
        part = f.get_slice(name)
        assert part.get_shape() == list(whole.shape) and len(part) == whole.shape[0]
        for index in INDEXES[: 6 if whole.dim() == 1 else None]:
            got = part[index if len(index) > 1 else index[0]]
            assert got.dtype == whole.dtype and torch.equal(got, whole[index]), index
    assert {"planes": "F32", "bf16": "BF16", "mask": "BOOL", "ints": "I32"}.get(name, part.get_dtype()) == (
        part.get_dtype()
    )


def test_get_slice_of_a_scalar_and_bad_indexes(stored):
    with q8.safe_open(stored, "pt") as f:
        assert f.get_slice("scalar")[...].item() == 2.5 and f.get_slice("scalar")[()].item() == 2.5
        with pytest.raises(IndexError, match="out of bounds"):
            f.get_slice("ints")[40]
        with pytest.raises(ValueError, match="step must be greater than zero"):
            f.get_slice("ints")[::-1]
        with pytest.raises(KeyError, match="no tensor named 'nothing'"):
            f.get_slice("nothing")


def test_get_slice_reads_only_the_rows_it_needs(stored, tmp_path):
    """Corrupt a row of the raw tensors: slices elsewhere are untouched (their bytes alone are
    read, so the segment checksum is not checked), the whole tensor fails its checksum."""
    with q8.safe_open(stored) as f:
        ints, rows8 = f.record("ints")["segments"][0], f.record("rows8")["segments"][0]
        assert ints[3] == rows8[3] == 0  # both segments stored uncompressed
        expected = {"ints": f.get_tensor("ints")[:30], "rows8": f.get_tensor("rows8")[:90]}
    blob = bytearray(stored.read_bytes())
    blob[ints[0] + 35 * 7 * 4] ^= 0xFF  # row 35 of "ints"
    blob[rows8[0] + 95 * 300] ^= 0xFF  # row 95 of "rows8"
    path = tmp_path / "corrupt.q8"
    path.write_bytes(blob)
    with q8.safe_open(path) as f:
        for name, rows in expected.items():
            assert torch.equal(f.get_slice(name)[: len(rows)], rows)
            with pytest.raises(q8.FormatError, match=f"tensor '{name}'.*checksum"):
                f.get_tensor(name)


def test_sharded_checkpoint_slices_and_keys(tmp_path):
    tensors = {f"w{i}": torch.randn(64, 64) for i in range(4)}
    q8.save_file(tensors, tmp_path / "m.q8", max_shard_size="20KB")
    with q8.safe_open(tmp_path / "m.q8", "pt") as f:
        assert sorted(f.offset_keys()) == sorted(f) == sorted(tensors) and "w3" in f and len(f) == 4
        assert torch.equal(f.get_slice("w3")[10:20, :5], tensors["w3"][10:20, :5])


def test_bytes_api(tmp_path):
    tensors = {"w": torch.randn(128, 64), "ids": torch.arange(10)}
    data = q8.save_bytes(tensors, metadata={"a": "b"})
    assert isinstance(data, bytes) and data[:8] == q8.formats.MAGIC
    loaded = q8.load_bytes(data)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    (tmp_path / "m.q8").write_bytes(data)  # the bytes are a q8 file
    with q8.safe_open(tmp_path / "m.q8") as f:
        assert f.metadata() == {"a": "b"}
    quantized = q8.load_bytes(q8.save_bytes({"w": tensors["w"]}, quantize=True, blocksize=256))["w"]
    assert 0 < q8.quant_error(tensors["w"], quantized).rel_l2 < 0.02
    with pytest.raises(q8.FormatError, match=r"<bytes>: .*too short"):
        q8.load_bytes(b"nonsense")
    with pytest.raises(q8.FormatError, match="<bytes>: not a q8 file"):
        q8.load_bytes(bytes(200))
    with pytest.raises(TypeError, match="expects bytes"):
        q8.load_bytes("m.q8")


def test_save_file_refuses_shared_memory(tmp_path):
    w = torch.randn(16, 8)
    for tensors, names in [
        ({"emb": w, "lm_head": w}, "'emb', 'lm_head'"),
        ({"a": w, "view": w[2:5]}, "'a', 'view'"),
        ({"t": w, "t2": w.t()}, "'t', 't2'"),
    ]:
        with pytest.raises(ValueError, match=f"tensors {names} share memory.*q8.save_model"):
            q8.save_file(tensors, tmp_path / "m.q8")
    assert not (tmp_path / "m.q8").exists()
    q8.save_file({"top": w[:8], "bottom": w[8:]}, tmp_path / "m.q8")  # disjoint parts of one storage: fine
    assert torch.equal(q8.load_file(tmp_path / "m.q8")["bottom"], w[8:])


class TiedLM(torch.nn.Module):
    def __init__(self, vocab: int = 300, dim: int = 32) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight


def test_save_model_stores_tied_weights_once_and_load_model_keeps_the_tie(tmp_path, caplog):
    torch.manual_seed(0)
    model = TiedLM()
    q8.save_model(model, tmp_path / "m.q8")
    with q8.safe_open(tmp_path / "m.q8") as f:
        assert sorted(f) == ["norm.bias", "norm.weight", "wte.weight"]  # under its first name, not "head.weight"
    torch.manual_seed(1)
    fresh = TiedLM()
    assert q8.load_model(fresh, tmp_path / "m.q8") == ([], [])
    assert fresh.head.weight is fresh.wte.weight and torch.equal(fresh.head.weight, model.wte.weight)

    q8.save_file({"head.weight": model.wte.weight.detach().clone()}, tmp_path / "head.q8")  # under the other name
    assert q8.load_model(TiedLM(), tmp_path / "head.q8", strict=False) == (["norm.weight", "norm.bias"], [])
    with pytest.raises(ValueError, match=r"head\.q8: model weights do not match the model: missing \['norm"):
        q8.load_model(TiedLM(), tmp_path / "head.q8")
    with pytest.raises(ValueError, match=r"m\.q8: model weights do not match"):
        q8.load_model(TiedLM(vocab=301), tmp_path / "m.q8")

    with caplog.at_level("WARNING", logger="q8"):
        q8.save_model(model, tmp_path / "m8.q8", quantize=True)
    assert "max relative L2 error" in caplog.text
    with q8.safe_open(tmp_path / "m8.q8") as f:
        assert f.info("wte.weight")["encoding"] == "blockwise" and f.info("norm.weight")["encoding"] == "raw"
        error = float(f.metadata()["quantized_rel_l2_max"])
    q8.load_model(fresh, tmp_path / "m8.q8")
    assert 0 < q8.quant_error(model.wte.weight, fresh.wte.weight).rel_l2 <= error
