"""q8.save_optimizer / q8.load_optimizer: bit-exact resume through the container, file size,
errors."""

import os
import threading
import zlib

import msgpack
import pytest
import q8
import torch
from q8.formats import FORMAT_VERSION, MAGIC, background
from q8.formats.container import FOOTER
from q8.optim import AdamW8bit, LAMB8bit, Lion8bit, SGD8bit


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    g = torch.Generator().manual_seed(123)
    batches = [torch.randn(16, 64, generator=g) for _ in range(9)]
    return model, batches


def run(model, opt, batches):
    for x in batches:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def state_bytes(opt) -> list:
    out = []
    for state in opt.state.values():
        for key, value in sorted(state.items()):
            if isinstance(value, q8.QTensor):
                out += [key, value.codes.clone(), value.absmax.clone(), value.code.name, value.blocksize]
            else:
                out += [key, value.clone() if isinstance(value, torch.Tensor) else value]
    return out


def assert_equal_lists(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


@pytest.mark.parametrize(
    "cls,kwargs",
    [(AdamW8bit, {"lr": 1e-2}), (Lion8bit, {"lr": 1e-3}), (SGD8bit, {"lr": 0.1, "momentum": 0.9}), (LAMB8bit, {})],
)
def test_resume_is_bit_exact_over_several_cycles(cls, kwargs, tmp_path):
    model, batches = model_and_data()
    straight = cls(model.parameters(), **kwargs)
    run(model, straight, batches)

    resumed_model, _ = model_and_data()
    opt = cls(resumed_model.parameters(), **kwargs)
    for cycle, (start, stop) in enumerate([(0, 3), (3, 5), (5, 9)]):
        run(resumed_model, opt, batches[start:stop])
        if stop == len(batches):
            break
        path = tmp_path / f"opt{cycle}.q8"
        q8.save_optimizer(opt, path)
        q8.save_file(dict(resumed_model.state_dict()), tmp_path / "model.q8")
        resumed_model, _ = model_and_data(seed=cycle + 1)  # a fresh model and optimizer
        resumed_model.load_state_dict(q8.load_file(tmp_path / "model.q8"))
        opt = cls(resumed_model.parameters(), **kwargs)
        q8.load_optimizer(opt, path)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_equal_lists(state_bytes(straight), state_bytes(opt))


def test_file_is_codes_plus_absmax(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 256))
    opt = AdamW8bit(model.parameters())
    run(model, opt, [torch.randn(8, 512) for _ in range(2)])
    path = tmp_path / "opt.q8"
    q8.save_optimizer(opt, path)
    raw = opt.state_nbytes()
    assert os.path.getsize(path) <= 1.01 * raw, (os.path.getsize(path), raw)
    with q8.safe_open(path) as f:
        info = f.info("state.0.exp_avg")
        assert info["encoding"] == "blockwise" and info["code"] == "dynamic" and info["blocksize"] == 256
        assert f.info("state.1.exp_avg")["encoding"] != "blockwise"  # 1024 elements: fp32 state, lossless


def embedding_model_state(steps: int = 2):
    """An AdamW8bit state whose embedding rows are mostly untouched (all-zero blocks: codes that
    entropy-code to a fraction of their size), and small fp32 state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(512, 64), torch.nn.Linear(64, 32))
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randint(0, 16, (4, 8))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def compressions(path) -> dict[str, list[int]]:
    """Each tensor's segment compressions (0 raw, 1 zstd, 2 Huffman), from the file's index."""
    with q8.safe_open(path) as f:
        return {name: [seg[3] for seg in f.record(name)["segments"]] for name in f.keys()}


@pytest.mark.parametrize("save", [q8.save_optimizer, lambda *a, **k: q8.async_save_optimizer(*a, **k).result()])
def test_codes_stored_as_is_unless_compress_codes(save, tmp_path):
    """Optimizer files keep 8-bit state as it is by default (fast); compress_codes=True
    entropy-codes it (smaller); both load bit-exactly, and so does either into the other's place."""
    model, opt = embedding_model_state()
    fast, small = tmp_path / "fast.q8", tmp_path / "small.q8"
    save(opt, fast)
    save(opt, small, compress_codes=True)
    assert all(c == [0] * len(c) for c in compressions(fast).values())  # every segment raw
    assert compressions(small)["state.0.exp_avg"][0] != 0  # the codes, Huffman or zstd coded
    assert os.path.getsize(small) < 0.5 * os.path.getsize(fast)
    for path in (fast, small):
        again = AdamW8bit(model.parameters(), lr=1e-2)
        q8.load_optimizer(again, path)
        assert_equal_lists(state_bytes(again), state_bytes(opt))
    with pytest.raises(TypeError, match="compress_codes must be a bool"):
        q8.save_optimizer(opt, fast, compress_codes="yes")


@pytest.mark.parametrize("tensor", ["state.0.exp_avg", "state.0.exp_avg_sq", "state.1.exp_avg", "state.2.exp_avg_sq"])
@pytest.mark.parametrize("segment", [0, -1])
def test_a_flipped_byte_in_a_batched_read_names_its_tensor(tensor, segment, tmp_path):
    """Neighbouring segments are read together; each is still checked, and an error names its tensor."""
    model, opt = embedding_model_state()
    path = tmp_path / "opt.q8"
    q8.save_optimizer(opt, path)
    with q8.safe_open(path) as f:
        offset, stored = f.record(tensor)["segments"][segment][:2]
    data = bytearray(path.read_bytes())
    data[offset + stored // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(q8.FormatError, match=rf"opt\.q8, tensor '{tensor}': checksum mismatch in segment at {offset}"):
        q8.load_optimizer(AdamW8bit(model.parameters()), path)


def test_errors_name_the_file(tmp_path):
    model, batches = model_and_data()
    opt = AdamW8bit(model.parameters())
    run(model, opt, batches[:2])
    path = tmp_path / "opt.q8"
    q8.save_optimizer(opt, path)
    before = path.read_bytes()

    with pytest.raises(ValueError, match=r"opt\.q8: state of a AdamW8bit, cannot load it into Lion8bit"):
        q8.load_optimizer(Lion8bit(model.parameters()), path)
    other = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"opt\.q8: .*parameter 0 \(shape \(64, 64\)\)"):
        q8.load_optimizer(AdamW8bit(other.parameters()), path)
    with pytest.raises(ValueError, match="parameter groups saved"):
        q8.load_optimizer(AdamW8bit([{"params": model[0].parameters()}, {"params": model[2].parameters()}]), path)

    plain = tmp_path / "weights.q8"
    q8.save_file({"w": torch.ones(3)}, plain)
    with pytest.raises(q8.FormatError, match="not a q8 optimizer state file"):
        q8.load_optimizer(opt, plain)

    corrupt = tmp_path / "corrupt.q8"
    data = bytearray(before)
    data[200] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(q8.FormatError):
        q8.load_optimizer(AdamW8bit(model.parameters()), corrupt)

    opt.param_groups[0]["lr"] = torch.tensor(1e-3)  # not JSON: the save fails before touching the file
    with pytest.raises(TypeError, match="JSON"):
        q8.save_optimizer(opt, path)
    assert path.read_bytes() == before
    with pytest.raises(TypeError, match=r"expects a torch\.optim\.Optimizer"):
        q8.save_optimizer(model, path)


def test_state_of_the_previous_release_loads():
    """State saved before the row layout (tests/data/make_previous_release_state.py: flat
    codes, 1-D parameters in 8 bits, second moments in "udynamic"), from its state_dict
    (torch.save) and from its save_optimizer file: rows of whole blocks keep their bytes and
    table, rows that cut blocks are decoded and re-encoded in rows (one more rounding, in
    this optimizer's tables), 1-D state is decoded; training goes on."""
    from data.make_previous_release_state import HERE, OPTIONS

    saved = torch.load(HERE / "previous_release_adamw8bit.pt", weights_only=True)
    old = saved["state_dict"]["state"]

    def fresh() -> tuple[list[torch.nn.Parameter], AdamW8bit]:
        params = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
        return params, AdamW8bit(params, **OPTIONS)

    params, from_dict = fresh()
    from_dict.load_state_dict(saved["state_dict"])
    _, from_file = fresh()
    q8.load_optimizer(from_file, HERE / "previous_release_adamw8bit.q8")
    assert_equal_lists(state_bytes(from_dict), state_bytes(from_file))

    for i, p in enumerate(params):
        for key, code in (("exp_avg", "dynamic"), ("exp_avg_sq", "udynamic")):
            got, entry = from_dict.state[p][key], old[i]
            if f"{key}.absmax" not in entry:  # fp32 in that release too
                assert torch.equal(got, entry[key])
                continue
            assert entry[key].dim() == 1  # the flat layout
            flat = q8.QTensor(entry[key], entry[f"{key}.absmax"], q8.codec.get_code(code), 64, p.shape, torch.float32)
            if p.dim() == 1:  # vectors keep fp32 state now: the 8-bit values, decoded
                assert torch.equal(got, flat.dequantize())
            elif p.shape[1] % 64 == 0:  # rows of whole blocks: the very bytes, in their own table
                assert got.code == flat.code
                assert torch.equal(got.codes, flat.codes) and torch.equal(got.absmax, flat.absmax)
            else:  # re-encoded in rows, in this optimizer's table
                ours = from_dict.state_codes(from_dict.param_groups[0])[key]
                want = q8.quantize(flat.dequantize(), ours, 64, row_length=p.shape[1])
                assert got.row_length == p.shape[1] and torch.equal(got.codes, want.codes)
                assert torch.equal(got.absmax, want.absmax)
    assert [p.shape for i, p in enumerate(params) if p.dim() == 1 and "exp_avg.absmax" in old[i]] == [(130,)]
    for p in params:
        p.grad = torch.ones_like(p)
    from_dict.step()
    assert from_dict.state[params[0]]["step"] == 3


def _rewrite_index(path, edit) -> None:
    blob = path.read_bytes()
    offset, length = FOOTER.unpack_from(blob, len(blob) - FOOTER.size)[:2]
    index = msgpack.unpackb(blob[offset : offset + length])
    edit(index)
    new = msgpack.packb(index, use_bin_type=True)
    path.write_bytes(blob[:offset] + new + FOOTER.pack(offset, len(new), zlib.crc32(new), FORMAT_VERSION, MAGIC))


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda i: i["codes"][0].update(name="bool"), ValueError, r"tensor 'state\.0\.exp_avg.*'bool'.*not one of"),
        (
            lambda i: i["metadata"].update({"q8.optimizer": i["metadata"]["q8.optimizer"].replace('"0"', '"x"')}),
            q8.FormatError,
            "steps",
        ),
        (
            lambda i: i["metadata"].update({"q8.optimizer": i["metadata"]["q8.optimizer"].replace('"params"', '"p"')}),
            ValueError,
            "params",
        ),
    ],
)
def test_tampered_files_raise_errors_naming_file_and_tensor(tmp_path, edit, error, match):
    model, batches = model_and_data()
    opt = AdamW8bit(model.parameters())
    run(model, opt, batches[:1])
    path = tmp_path / "opt.q8"
    q8.save_optimizer(opt, path)
    _rewrite_index(path, edit)
    with pytest.raises(error, match=match) as e:
        q8.load_optimizer(AdamW8bit(model.parameters()), path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "make", [lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=1024), lambda ps: torch.optim.AdamW(ps, lr=1e-2)],
    ids=["AdamW8bit", "torch AdamW"],
)  # fmt: skip
def test_async_save_optimizer_keeps_the_state_of_the_call(tmp_path, make):
    """The file holds the state (8-bit codes and absmax, or a torch optimizer's tensors; steps,
    groups) as it was when async_save_optimizer returned, whatever the optimizer does next."""
    model, batches = model_and_data()
    opt = make(model.parameters())
    run(model, opt, batches[:3])
    q8.save_optimizer(opt, tmp_path / "sync.q8")
    gate = threading.Event()
    blocker = background.save_in_background(os.devnull, lambda _: gate.wait())
    future = q8.async_save_optimizer(opt, tmp_path / "async.q8")
    run(model, opt, batches[3:])  # steps update codes and absmax in place
    opt.param_groups[0]["lr"] = 0.5
    gate.set()
    blocker.result()
    assert future.result(timeout=60) is None
    expected, got = make(model.parameters()), make(model.parameters())
    q8.load_optimizer(expected, tmp_path / "sync.q8")
    q8.load_optimizer(got, tmp_path / "async.q8")
    assert got.param_groups[0]["lr"] == 1e-2
    assert_equal_lists(state_bytes(got), state_bytes(expected))


TORCH_OPTIMIZERS = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps),
}


@pytest.mark.parametrize("make", TORCH_OPTIMIZERS.values(), ids=TORCH_OPTIMIZERS.keys())
def test_any_torch_optimizer_round_trips_exactly(make, tmp_path):
    """save_optimizer takes any torch.optim optimizer: its state dict, losslessly, class recorded."""
    model, batches = model_and_data()
    opt = make(model.parameters())
    run(model, opt, batches[:3])
    path = tmp_path / "opt.q8"
    q8.save_optimizer(opt, path)
    again = make(model.parameters())
    q8.load_optimizer(again, path)
    assert_equal_lists(state_bytes(opt), state_bytes(again))
    assert again.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    other = torch.optim.RMSprop(model.parameters())
    with pytest.raises(ValueError, match=r"opt\.q8: state of a torch\.optim\..*, cannot load it into torch\.optim"):
        q8.load_optimizer(other, path)
    with pytest.raises(ValueError, match=r"opt\.q8: state of a torch.optim.*cannot load it into q8\.optim"):
        q8.load_optimizer(AdamW8bit(model.parameters()), path)
    with pytest.raises(FileNotFoundError, match=r"missing\.q8"):
        q8.load_optimizer(again, tmp_path / "missing.q8")


def test_quantized_torch_state_and_8bit_state_into_torch(tmp_path, caplog):
    model, batches = model_and_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run(model, opt, batches[:3])
    lossless, quantized = tmp_path / "lossless.q8", tmp_path / "quantized.q8"
    q8.save_optimizer(opt, lossless)
    with caplog.at_level("WARNING", logger="q8"):
        q8.save_optimizer(opt, quantized, quantize=True)
    assert "max relative L2 error" in caplog.text
    assert os.path.getsize(lossless) / os.path.getsize(quantized) > 2  # the 1-D and small state stays exact
    with q8.safe_open(quantized) as f:
        assert 0 < float(f.metadata()["quantized_rel_l2_max"]) < 0.05
        assert f.info("state.0.exp_avg")["encoding"] == "blockwise"
    again = torch.optim.AdamW(model.parameters(), lr=1e-2)
    q8.load_optimizer(again, quantized)
    m, approx = opt.state[model[0].weight]["exp_avg"], again.state[model[0].weight]["exp_avg"]
    assert approx.dtype == torch.float32 and 0 < q8.quant_error(m, approx).rel_l2 < 0.05

    eight = AdamW8bit(model.parameters())
    run(model, eight, batches[:1])
    q8.save_optimizer(eight, tmp_path / "eight.q8")
    with pytest.raises(ValueError, match=r"eight\.q8: holds a q8 optimizer's 8-bit state"):
        q8.load_optimizer(torch.optim.AdamW(model.parameters()), tmp_path / "eight.q8")
    q8.save(eight.state_dict(), tmp_path / "state_dict.q8")  # 8-bit state as a plain state dict
    with pytest.raises(ValueError, match=r"state_dict\.q8: holds 8-bit optimizer state"):
        q8.load_optimizer(torch.optim.AdamW(model.parameters()), tmp_path / "state_dict.q8")


def test_state_dict_of_a_file_without_its_optimizer(tmp_path):
    """load_optimizer_state_dict gives exactly the optimizer's state_dict() (what q8convert
    decode writes to optimizer.pt): 8-bit entries as codes + absmax, the class mark, tuples."""
    model, batches = model_and_data()
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    run(model, opt, batches[:2])
    q8.save_optimizer(opt, tmp_path / "opt.q8")
    got, expected = q8.optim.load_optimizer_state_dict(tmp_path / "opt.q8"), opt.state_dict()
    assert got["param_groups"] == expected["param_groups"] and got["param_groups"][-1]["q8_optimizer"] == "AdamW8bit"
    assert got["state"].keys() == expected["state"].keys()
    for i, entries in expected["state"].items():
        assert got["state"][i].keys() == entries.keys()
        for key, value in entries.items():
            other = got["state"][i][key]
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, (i, key)
    again = AdamW8bit(model.parameters(), lr=1e-2)
    again.load_state_dict(got)
    assert_equal_lists(state_bytes(opt), state_bytes(again))
