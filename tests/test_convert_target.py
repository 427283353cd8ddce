"""q8convert --target-error: per tensor the smallest stored option within the target; the
default is a target; larger targets never give larger files; old flags still mean what
they meant; the choice is reported (table, --json, the file's extra, info, info --plot)."""

from __future__ import annotations

import json
import sys

import pytest
import q8
import torch
from q8.codec.blockwise import BLOCKSIZES
from q8.tools import search
from q8.tools.convert import EXIT_OK, EXIT_USAGE, main
from q8.tools.policy import DEFAULT_TARGET_ERROR
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


def test_default_is_the_target_and_old_flags_keep_their_meaning(src, tmp_path, capsys):
    got = convert_json(src, tmp_path / "m.q8", capsys=capsys)
    assert got["mlp.weight"]["target_error"] == DEFAULT_TARGET_ERROR
    within = [t for t in got.values() if "smallest within" in t["reason"]]
    assert len(within) >= 4 and all(t["rel_l2"] <= DEFAULT_TARGET_ERROR for t in within)
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
    assert "why" in out and "bits" in out and f"smallest within --target-error {DEFAULT_TARGET_ERROR:g}" in out
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
    got = convert_json(tmp_path / "optimizer.pt", tmp_path / "o.q8", capsys=capsys)  # the default target is for weights
    m, v = got["state.0.exp_avg"], got["state.0.exp_avg_sq"]
    assert (m["code"], m["blocksize"], m["reason"]) == ("dynamic", 2048, "Adam exp_avg")
    assert (v["code"], v["blocksize"], v["reason"]) == ("udynamic", 2048, "Adam exp_avg_sq")
    got = convert_json(tmp_path / "optimizer.pt", tmp_path / "o.q8", "--target-error", "0.03", capsys=capsys)
    m, v = got["state.0.exp_avg"], got["state.0.exp_avg_sq"]
    assert m["code"] == "dynamic" and v["code"] == "udynamic"
    assert m["rel_l2"] <= 0.03 and m["reason"] == "Adam exp_avg: smallest within --target-error 0.03"
