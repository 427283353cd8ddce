"""q8convert --target-error: per tensor the smallest stored option within the target;
--model-error (the default): each tensor within its share of an error of the weights all
together; larger targets never give larger files; old flags still mean what they meant;
the choice is reported (table, --json, the file's extra, info, info --plot)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import q8
import torch
from q8.codec.blockwise import BLOCKSIZES
from q8.formats.checkpoints import SafetensorsFile
from q8.tools import search
from q8.tools.convert import EXIT_OK, EXIT_USAGE, main
from q8.tools.policy import MAX_SHARE, SHARE_EXPONENT, Policy
from safetensors.torch import save_file as st_save


def run(*argv) -> int:
    return main([str(a) for a in argv])


def checkpoint() -> dict[str, torch.Tensor]:
    """Tensors of different character: Gaussian weights, an embedding with an outlier
    feature, a heavy-tailed matrix, a non-negative one, one large enough to be searched
    on a sample, and fp8 values held in fp32, whose exact bytes compress below any 8-bit
    option's (they are the case where a target out of reach stores a tensor exactly)."""
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(512, 64, generator=g) * 0.02
    embed[:, 3] *= 40
    return {
        "mlp.weight": torch.randn(256, 256, generator=g) * 0.02,
        "embed.weight": embed,
        "heavy.weight": torch.randn(128, 256, generator=g)
        / torch.randn(3, 128, 256, generator=g).square().mean(0).sqrt(),
        "scale.weight": torch.rand(64, 128, generator=g) + 0.5,
        "bf16.weight": torch.randn(160, 256, generator=g).bfloat16(),  # decodes to bf16: that rounding counts
        "fp16.weight": (torch.randn(64, 128, generator=g) * 9000).half(),  # coarse tables' far entries overflow fp16
        "big.weight": torch.randn(640, 512, generator=g) * 0.02,  # > 2 x 16 x 4096 elements: sampled
        "fp8.weight": torch.randn(128, 128, generator=g).to(torch.float8_e4m3fn).float() / 64,
        "norm.weight": torch.ones(256),
    }


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("target") / "m.safetensors"
    st_save(checkpoint(), path)
    return path


def convert_json(src, dst, *argv, capsys) -> dict[str, dict]:
    assert run(src, "-o", dst, "--json", "--overwrite", *argv) == EXIT_OK
    return {t["name"]: t for t in json.loads(capsys.readouterr().out)["files"][0]["tensors"]}


def test_target_is_met_and_the_error_reported_is_the_error_stored(src, tmp_path, capsys):
    tensors = checkpoint()
    for target in (0.007, 0.02):
        got = convert_json(src, tmp_path / "m.q8", "--target-error", target, capsys=capsys)
        back = q8.load_file(tmp_path / "m.q8")
        for name, t in got.items():
            if t["encoding"] != "quantized":
                continue
            if t["reason"].endswith("out of reach: lowest error"):
                assert target == 0.007 and t["blocksize"] == 64 and t["rel_l2"] > target, (name, t)
            else:
                assert 0 < t["rel_l2"] <= target, (target, name, t)
                assert t["reason"].endswith(f"smallest within --target-error {target:g}")
            assert q8.quant_error(tensors[name], back[name]).rel_l2 == pytest.approx(t["rel_l2"], rel=1e-6)
        with q8.safe_open(tmp_path / "m.q8") as f:
            extra = f.info("mlp.weight")["extra"]
            assert extra["target_error"] == f"{target:g}" and int(extra["options_tried"]) > 1
    # at the loose target the coarser linear tables pay: fewer levels than 127
    assert got["mlp.weight"]["code"].startswith("linear-")


def test_larger_target_never_gives_a_larger_file(src, tmp_path, capsys):
    """The file, code tables included: a tensor may take a few more data bytes at a larger
    target when that lets it share a table the file holds anyway."""
    sizes = []
    for target in (0.002, 0.004, 0.006, 0.008, 0.009, 0.01, 0.015, 0.03, 0.1):
        convert_json(src, tmp_path / "m.q8", "--target-error", target, capsys=capsys)
        sizes.append((tmp_path / "m.q8").stat().st_size)
    assert sizes == sorted(sizes, reverse=True), sizes
    assert sizes[0] > 1.5 * sizes[-1]  # the target really moves the size


def test_unreachable_target_gives_the_lowest_error_or_exact(src, tmp_path, capsys):
    got = convert_json(src, tmp_path / "m.q8", "--target-error", "1e-5", capsys=capsys)
    mlp = got["mlp.weight"]
    assert mlp["encoding"] == "quantized" and mlp["blocksize"] == 64 and mlp["code"] == "linear"
    assert "out of reach: lowest error" in mlp["reason"]
    fp8 = got["fp8.weight"]  # 4 significant bits: its exact bytes compress below any 8-bit option
    assert fp8["encoding"] == "exact" and "exact is smaller" in fp8["reason"], fp8
    assert torch.equal(q8.load_file(tmp_path / "m.q8")["fp8.weight"], checkpoint()["fp8.weight"])


def test_default_is_the_model_error_and_old_flags_keep_their_meaning(src, tmp_path, capsys):
    got = convert_json(src, tmp_path / "m.q8", capsys=capsys)
    assert 0 < got["mlp.weight"]["model_error"] < 0.02
    within = [t for t in got.values() if t["reason"] == "smallest within its share of --model-error auto"]
    assert len(within) >= 4 and all(t["rel_l2"] <= t["target_error"] for t in within)
    # --code / --blocksize alone: no target, one blocksize, the lower-error table, as before
    got = convert_json(src, tmp_path / "m.q8", "--code", "auto", capsys=capsys)
    quantized = [t for t in got.values() if t["encoding"] == "quantized"]
    assert {t["blocksize"] for t in quantized} == {2048} and {t["code"] for t in quantized} <= {
        "linear",
        "dynamic",
        "ulinear",
        "udynamic",
    }
    assert all(t["target_error"] is None and t["reason"] == "--code auto" for t in quantized)
    got = convert_json(src, tmp_path / "m.q8", "--blocksize", "256", capsys=capsys)
    assert {t["blocksize"] for t in got.values() if t["encoding"] == "quantized"} == {256}
    # with a target they narrow the search
    got = convert_json(src, tmp_path / "m.q8", "--target-error", "0.01", "--blocksize", "512", capsys=capsys)
    quantized = [t for t in got.values() if t["encoding"] == "quantized"]
    assert {t["blocksize"] for t in quantized} == {512}
    assert all(t["rel_l2"] <= 0.01 for t in quantized if "smallest within" in t["reason"])
    got = convert_json(src, tmp_path / "m.q8", "--target-error", "0.02", "--code", "dynamic", capsys=capsys)
    assert {t["code"] for t in got.values() if t["encoding"] == "quantized"} <= {"dynamic", "udynamic"}
    # --max-error stays a hard limit on what the target chose; --lossless and --keep win
    got = convert_json(src, tmp_path / "m.q8", "--target-error", "0.02", "--max-error", "0.015", capsys=capsys)
    assert all(t["rel_l2"] <= 0.015 for t in got.values() if t["encoding"] == "quantized")
    assert any("> --max-error 0.015" in t["reason"] for t in got.values())
    got = convert_json(src, tmp_path / "m.q8", "--target-error", "0.02", "--keep", "mlp.*", capsys=capsys)
    assert got["mlp.weight"]["reason"] == "--keep mlp.*"
    got = convert_json(src, tmp_path / "m.q8", "--target-error", "0.02", "--lossless", capsys=capsys)
    assert {t["encoding"] for t in got.values()} == {"exact"}
    assert run(src, "-o", tmp_path / "x.q8", "--target-error", "0") == EXIT_USAGE
    assert "positive number" in capsys.readouterr().err
    assert run(src, "-o", tmp_path / "x.q8", "--target-error", "0.01", "--model-error", "0.01") == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err
    assert run(src, "-o", tmp_path / "x.q8", "--model-error", "much") == EXIT_USAGE
    assert "must be 'auto' or a positive number" in capsys.readouterr().err


def test_sampled_search_confirms_on_the_whole_tensor():
    x = checkpoint()["big.weight"]
    families = search.families(True)
    found = search.search(x, 0.009, families)
    assert found.met and found.error.rel_l2 <= 0.009
    assert found.error == q8.quant_error(x, found.qt)
    assert found.nbytes == q8.formats.stored_nbytes(found.qt)
    every = len(BLOCKSIZES) * sum(len(f) for f in families)
    assert found.tried < every / 3 and found.whole <= 3  # bisection on a sample, 1-3 whole tensors quantized
    # the choice is the smallest within the target among the options next to it
    for option in (search.Option(found.option.code, b) for b in BLOCKSIZES):
        qt = q8.quantize(x, option.code, option.blocksize)
        if q8.quant_error(x, qt).rel_l2 <= 0.009:
            assert q8.formats.stored_nbytes(qt) >= found.nbytes * 0.99, option
    with pytest.raises(ValueError, match="positive"):
        search.search(x, float("nan"), families)


def test_info_shows_the_choice_and_plots_it(src, tmp_path, capsys):
    assert run(src, "-o", tmp_path / "m.q8", "-q") == EXIT_OK
    assert run("info", tmp_path / "m.q8") == EXIT_OK
    out = capsys.readouterr().out
    assert "why" in out and "bits" in out and "smallest within its share of --model-error auto" in out
    pytest.importorskip("matplotlib")
    assert run("info", tmp_path / "m.q8", "--plot", tmp_path / "tradeoff.png") == EXIT_OK
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(src, tmp_path, capsys, monkeypatch):
    assert run(src, "-o", tmp_path / "m.q8", "-q") == EXIT_OK
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert run("info", tmp_path / "m.q8", "--plot", tmp_path / "t.png") == EXIT_USAGE
    assert "q8[plot]" in capsys.readouterr().err and not (tmp_path / "t.png").exists()


def test_adam_moments_keep_their_tables_and_follow_an_explicit_target(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(256, 128, generator=g) * torch.rand(256, 1, generator=g)
    state = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": grad * 0.1, "exp_avg_sq": grad.square() * 1e-3}},
             "param_groups": [{"lr": 1e-3, "params": [0]}]}  # fmt: skip
    torch.save(state, tmp_path / "optimizer.pt")
    for argv in ((), ("--model-error", "0.03")):  # a model error is the weights'
        got = convert_json(tmp_path / "optimizer.pt", tmp_path / "o.q8", *argv, capsys=capsys)
        m, v = got["state.0.exp_avg"], got["state.0.exp_avg_sq"]
        assert (m["code"], m["blocksize"], m["reason"]) == ("dynamic", 2048, "Adam exp_avg")
        assert (v["code"], v["blocksize"], v["reason"]) == ("udynamic", 2048, "Adam exp_avg_sq")
    got = convert_json(tmp_path / "optimizer.pt", tmp_path / "o.q8", "--target-error", "0.03", capsys=capsys)
    m, v = got["state.0.exp_avg"], got["state.0.exp_avg_sq"]
    assert m["code"] == "dynamic" and v["code"] == "udynamic"
    assert m["rel_l2"] <= 0.03 and m["reason"] == "Adam exp_avg: smallest within --target-error 0.03"


# -- --model-error: the weights' error all together --------------------------------------


def layers() -> dict[str, torch.Tensor]:
    """A model's weights whose scales differ as trained transformers' do: embeddings and
    input projections of larger weights than the output projections (GPT-2 initialises
    those at 1/sqrt(2 n_layer) of the others), these heavy-tailed. The embedding is large
    enough to be searched on a sample (and its scale estimated from one)."""
    g = torch.Generator().manual_seed(3)
    out = {"wte.weight": torch.randn(1024, 160, generator=g) * 0.03, "norm.weight": torch.ones(128)}
    for i in range(3):
        out[f"h.{i}.fc.weight"] = torch.randn(128, 512, generator=g) * 0.02
        t = torch.randn(512, 128, generator=g) / torch.randn(4, 512, 128, generator=g).square().mean(0).sqrt()
        out[f"h.{i}.proj.weight"] = t * 0.004
    return out


@pytest.fixture(scope="module")
def model_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    st_save(layers(), path)
    return path


def weights_error(original: dict, decoded: dict) -> float:
    err2 = sum(float((decoded[k].double() - w.double()).square().sum()) for k, w in original.items())
    return math.sqrt(err2 / sum(float(w.double().square().sum()) for w in original.values()))


def fixed_error(tensors: dict) -> float:
    """The error of the weights together under the fixed encoding (--code auto, blocksize 2048)."""
    decoded = {
        k: q8.dequantize(q8.codec.quantize_best(w, q8.codec.AUTO_CODES[True], 2048)[0]) for k, w in tensors.items()
    }
    return weights_error(tensors, decoded)


def test_model_error_default_is_smaller_than_the_old_default_at_a_lower_error(model_src, tmp_path, capsys):
    """On weights of different scales the model error spends the error where it is cheap:
    by default (`--model-error auto`: the fixed encoding's error of the weights together)
    a smaller file than the pre-target default (`--code auto`, blocksize 2048) at a lower
    error of the weights together; and the report's figure is the file's."""
    matrices = {k: v for k, v in layers().items() if v.dim() == 2}
    got = {}
    for label, argv in (("old", ("--code", "auto")), ("new", ())):
        assert run(model_src, "-o", tmp_path / f"{label}.q8", "--json", *argv) == EXIT_OK
        report = json.loads(capsys.readouterr().out)
        got[label] = (
            (tmp_path / f"{label}.q8").stat().st_size,
            weights_error(matrices, q8.load_file(tmp_path / f"{label}.q8")),
            report["files"][0]["model_rel_l2"],
            {t["name"]: t for t in report["files"][0]["tensors"]},
        )
    (old_size, old_error, no_model, _), (new_size, new_error, reported, tensors) = got["old"], got["new"]
    assert new_size < old_size and new_error < old_error, got
    assert no_model is None and reported == pytest.approx(new_error, rel=1e-6)
    auto = tensors["h.0.fc.weight"]["model_error"]  # what auto measured, on samples: the fixed encoding's error
    assert auto == pytest.approx(old_error, rel=0.02) and auto == pytest.approx(fixed_error(matrices), rel=0.02)
    assert {t["model_error"] for t in tensors.values() if t["name"] in matrices} == {auto}
    assert run(model_src, "-o", tmp_path / "new.q8", "--overwrite") == EXIT_OK
    out = capsys.readouterr().out
    assert f"relative L2 of its 7 weights together {new_error:.2e} (--model-error auto: {auto:.2e})" in out


def test_model_error_shares(model_src, tmp_path, capsys):
    """Each tensor's target is its share of E: relative errors proportional to
    rms ** -SHARE_EXPONENT, at most MAX_SHARE * E, that make E the error of the weights
    together; the model's figures come from samples read alone from the file."""
    tensors = {k: v for k, v in layers().items() if v.dim() == 2}
    norm2 = {k: float(v.double().square().sum()) for k, v in tensors.items()}
    ms = {k: norm2[k] / v.numel() for k, v in tensors.items()}
    scale = 0.01 * math.sqrt(sum(norm2.values()) / sum(norm2[k] * ms[k] ** -SHARE_EXPONENT for k in tensors))
    got = convert_json(model_src, tmp_path / "m.q8", "--model-error", "0.01", capsys=capsys)
    for k, t in got.items():
        if k not in tensors:
            assert t["model_error"] is None and t["encoding"] == "exact"
            continue
        share = min(scale * ms[k] ** (-SHARE_EXPONENT / 2), MAX_SHARE * 0.01)
        assert t["model_error"] == 0.01 and t["target_error"] == pytest.approx(share, rel=0.02), (k, t)
        assert t["rel_l2"] <= t["target_error"] and t["reason"] == "smallest within its share of --model-error 0.01"
    assert got["h.0.proj.weight"]["target_error"] > got["h.0.fc.weight"]["target_error"]
    assert got["h.0.fc.weight"]["target_error"] > 0.01 > got["wte.weight"]["target_error"]
    shares = math.sqrt(sum(norm2[k] * got[k]["target_error"] ** 2 for k in tensors) / sum(norm2.values()))
    assert shares == pytest.approx(0.01, rel=0.02)
    # the samples: read alone from the safetensors file, they are the search's sample of the tensor
    f = SafetensorsFile(model_src)
    for ref in f.refs():
        if ref.name in tensors:
            flat = tensors[ref.name].reshape(-1)
            assert torch.equal(ref.read(100, 4096), flat[100:4196])
    with pytest.raises(ValueError, match="out of range"):
        f.read_elements("wte.weight", 1024 * 160 - 10, 11)
    # without a model fitted, a tensor is a model of its own
    w = tensors["h.0.proj.weight"]
    assert Policy(model_error=0.01).apply("h.0.proj.weight", w)[1].target_error == 0.01
    assert Policy().apply("h.0.proj.weight", w)[1].target_error == pytest.approx(fixed_error({"w": w}), rel=1e-6)


def test_larger_model_error_never_gives_a_larger_file(model_src, tmp_path, capsys):
    sizes, errors = [], []
    for e in (0.0075, 0.0085, 0.01, 0.015, 0.03):
        assert run(model_src, "-o", tmp_path / "m.q8", "--model-error", e, "--overwrite", "--json") == EXIT_OK
        errors.append(json.loads(capsys.readouterr().out)["files"][0]["model_rel_l2"])
        sizes.append((tmp_path / "m.q8").stat().st_size)
        assert errors[-1] <= e * 1.01  # the shares are fitted on samples
    assert sizes == sorted(sizes, reverse=True), sizes
    assert errors == sorted(errors), errors


def test_model_error_covers_a_nested_object_as_one_model(tmp_path, capsys):
    weights = {k: v for k, v in layers().items() if v.dim() == 2}
    torch.save({"model": weights, "epoch": 3}, tmp_path / "ckpt.pt")
    got = convert_json(tmp_path / "ckpt.pt", tmp_path / "c.q8", "--model-error", "0.01", capsys=capsys)
    shares = {k.removeprefix("model."): t["target_error"] for k, t in got.items() if t["model_error"]}
    assert shares.keys() == weights.keys() and shares["h.0.proj.weight"] > 0.01 > shares["wte.weight"]
