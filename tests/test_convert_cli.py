"""q8convert's command line around the conversion: progress without a terminal, --version,
`python -m q8`, decode --max-shard-size / --dtype and the record of a lossy decode, folders
with other standard names (PEFT adapters, shards without an index), exit codes, output
folders and permissions."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import q8
import torch
from q8.tools.convert import EXIT_INPUT, EXIT_OK, EXIT_USAGE, main
from q8.tools.progress import LineProgress
from safetensors import safe_open as st_open
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A small model folder: a few matrices (quantized by default), a norm and ids."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(256, 128, generator=g) * 0.02 for i in range(6)}
    tensors |= {"norm.weight": torch.ones(128), "position_ids": torch.arange(64)}
    folder = tmp_path_factory.mktemp("model")
    st_save(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text("{}")
    return folder


def test_progress_lines_without_a_terminal_and_quiet(weights, tmp_path, capsys):
    assert run(weights, "-o", tmp_path / "a.q8") == EXIT_OK
    err = capsys.readouterr().err.splitlines()  # pytest's stderr is not a terminal: lines, not a bar
    assert err and all(line.startswith("q8convert: weights: ") for line in err), err
    assert err[-1].startswith("q8convert: weights: done (787.5 KB)")
    assert run("decode", tmp_path / "a.q8", "-o", tmp_path / "back") == EXIT_OK
    assert "q8convert: model.q8: done" in capsys.readouterr().err
    assert run(weights, "-o", tmp_path / "b.q8", "-q") == EXIT_OK
    assert capsys.readouterr() == ("", "")
    out = io.StringIO()  # a slow step: a line per 10% (here without the one-second gap)
    with LineProgress(1000, "weights", out, gap=0) as bar:
        for _ in range(20):
            bar.update(50)
    lines = out.getvalue().splitlines()
    assert [line.split(": ")[2].split()[0] for line in lines] == [f"{p}%" for p in range(10, 101, 10)] + ["done"]


def test_version_and_python_m_q8(capsys, tmp_path):
    assert run("--version") == EXIT_OK
    assert capsys.readouterr().out.strip() == f"q8convert {q8.__version__}"
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "q8", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0 and "usage: q8convert" in proc.stdout


def test_decode_shards_and_dtype(weights, tmp_path):
    assert run(weights, "-o", tmp_path / "m.q8", "-q") == EXIT_OK
    assert run("decode", tmp_path / "m.q8", "-o", tmp_path / "whole", "-q") == EXIT_OK
    args = ("--max-shard-size", "100KB", "--dtype", "bfloat16", "-q")
    assert run("decode", tmp_path / "m.q8", "-o", tmp_path / "sharded", *args) == EXIT_OK
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    n = len(files) - 2  # config.json and the index
    assert n >= 3 and files == ["config.json", *[f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)],
                                "model.safetensors.index.json"]  # fmt: skip
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    whole = st_load(tmp_path / "whole" / "model.safetensors")
    assert sorted(index["weight_map"]) == sorted(whole)
    for name, shard in index["weight_map"].items():
        t = st_load(tmp_path / "sharded" / shard)[name]
        expected = whole[name].bfloat16() if whole[name].is_floating_point() else whole[name]
        assert t.dtype == expected.dtype and torch.equal(t, expected), name
    shards = {shard: st_load(tmp_path / "sharded" / shard) for shard in set(index["weight_map"].values())}
    assert index["metadata"]["total_size"] == sum(t.nbytes for part in shards.values() for t in part.values())


def test_a_lossy_decode_says_so_in_its_metadata(weights, tmp_path):
    assert run(weights, "-o", tmp_path / "m.q8", "-q") == EXIT_OK
    assert run(weights, "-o", tmp_path / "l.q8", "--lossless", "-q") == EXIT_OK
    for name in ("m", "l"):
        assert run("decode", tmp_path / f"{name}.q8", "-o", tmp_path / name, "-q") == EXIT_OK
    with st_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        meta = f.metadata()
    report = q8.load_file(tmp_path / "m.q8" / "model.q8")
    worst = max(q8.quant_error(t, report[k]).rel_l2 for k, t in st_load(weights / "model.safetensors").items()
                if t.is_floating_point())  # fmt: skip
    assert meta["format"] == "pt" and meta["q8.decoded_from"] == "8-bit codes (6 of 8 tensors)"
    assert float(meta["q8.max_rel_l2"]) == pytest.approx(worst, rel=1e-3)
    with st_open(tmp_path / "l" / "model.safetensors", "pt") as f:
        assert "q8.decoded_from" not in f.metadata()


def test_peft_adapters_and_shards_without_an_index(tmp_path):
    g = torch.Generator().manual_seed(1)
    adapter = {"base.lora_A.weight": torch.randn(8, 512, generator=g), "base.lora_B.weight": torch.zeros(512, 8)}
    (tmp_path / "lora").mkdir()
    st_save(adapter, tmp_path / "lora" / "adapter_model.safetensors")
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    assert run(tmp_path / "lora", "-o", tmp_path / "lora.q8", "-q") == EXIT_OK
    assert sorted(os.listdir(tmp_path / "lora.q8")) == ["adapter_config.json", "adapter_model.q8"]
    assert run("decode", tmp_path / "lora.q8", "-o", tmp_path / "lora-back", "-q") == EXIT_OK
    back = st_load(tmp_path / "lora-back" / "adapter_model.safetensors")
    assert back.keys() == adapter.keys() and torch.equal(back["base.lora_B.weight"], adapter["base.lora_B.weight"])

    (tmp_path / "shards").mkdir()
    parts = [{"a": torch.randn(64, 64, generator=g)}, {"b": torch.randn(64, 64, generator=g), "c": torch.arange(5)}]
    for i, part in enumerate(parts, 1):
        st_save(part, tmp_path / "shards" / f"model-{i:05d}-of-00002.safetensors")
    assert run(tmp_path / "shards", "-o", tmp_path / "shards.q8", "--lossless", "-q") == EXIT_OK
    assert os.listdir(tmp_path / "shards.q8") == ["model.q8"]
    loaded = q8.load_file(tmp_path / "shards.q8" / "model.q8")
    assert all(torch.equal(loaded[k], v) for part in parts for k, v in part.items())
    (tmp_path / "shards" / "model-00002-of-00002.safetensors").unlink()
    assert run(tmp_path / "shards", "-o", tmp_path / "broken.q8", "-q") == EXIT_INPUT


def test_exit_codes_name_the_path(weights, tmp_path, capsys):
    not_q8 = weights / "model.safetensors"
    for argv in (("info", not_q8), ("decode", not_q8, "-o", tmp_path / "x.safetensors")):
        assert run(*argv) == EXIT_INPUT, argv  # another kind of file: a bad input, not a corrupt q8 file
        assert f"{not_q8}: not a q8 file" in capsys.readouterr().err
    assert run(weights, "-o", tmp_path / "m.q8", "-q") == EXIT_OK
    assert run("decode", tmp_path / "m.q8" / "model.q8", "-o", tmp_path / "m.pt") == EXIT_USAGE  # wrong suffix
    assert f"{tmp_path / 'm.q8' / 'model.q8'}: holds weights" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_output_folders_are_made_and_permissions_follow_the_umask(weights, tmp_path):
    old = os.umask(0o027)
    try:
        deep = tmp_path / "a" / "b" / "m.q8"
        assert run(weights / "model.safetensors", "-o", deep, "-q") == EXIT_OK
        assert run(weights, "-o", tmp_path / "c" / "folder.q8", "-q") == EXIT_OK
        assert run("decode", tmp_path / "c" / "folder.q8", "-o", tmp_path / "d" / "back", "-q") == EXIT_OK
        q8.save_file({"w": torch.ones(3)}, tmp_path / "api.q8")
        torch.save({"w": torch.ones(3)}, tmp_path / "torch.pt")
    finally:
        os.umask(old)
    mode = stat.S_IMODE
    reference = mode((tmp_path / "torch.pt").stat().st_mode)
    assert reference == 0o640
    for path in (deep, tmp_path / "api.q8", tmp_path / "c" / "folder.q8" / "model.q8",
                 tmp_path / "d" / "back" / "model.safetensors"):  # fmt: skip
        assert mode(path.stat().st_mode) == reference, path
    for folder in (tmp_path / "a" / "b", tmp_path / "c" / "folder.q8", tmp_path / "d" / "back"):
        assert mode(folder.stat().st_mode) == 0o750, folder


def test_max_error_report_shows_what_was_stored(tmp_path, capsys):
    """Tensors --max-error keeps exact count as exact (error 0) in the table and its total, in one
    row; the error they would have had is in the JSON and the file (`refused_rel_l2`)."""
    g = torch.Generator().manual_seed(0)
    outliers = [torch.randn(512, 64, generator=g) for _ in range(2)]
    for t in outliers:
        t[:, 0] *= 50  # a linear table loses precision on every other element
    tensors = {"a.weight": outliers[0], "b.weight": outliers[1], "mlp.weight": torch.randn(256, 256, generator=g)}
    st_save(tensors, tmp_path / "m.safetensors")
    argv = ("--code", "linear", "--blocksize", "256", "--max-error", "0.01")
    assert run(tmp_path / "m.safetensors", "-o", tmp_path / "m.q8", *argv, "--json") == EXIT_OK
    got = {t["name"]: t for t in json.loads(capsys.readouterr().out)["files"][0]["tensors"]}
    for name in ("a.weight", "b.weight"):
        assert got[name]["encoding"] == "exact" and got[name]["rel_l2"] == 0 and got[name]["refused_rel_l2"] > 0.01
    stored = got["mlp.weight"]["rel_l2"]
    assert 0 < stored <= 0.01
    assert run(tmp_path / "m.safetensors", "-o", tmp_path / "n.q8", *argv) == EXIT_OK
    table = capsys.readouterr().out.splitlines()
    (fallback,) = [line for line in table if "> --max-error" in line]  # one row for both
    assert fallback.split()[-1] == "0" and "  2  " in fallback
    total = next(line for line in table if line.startswith("total"))
    assert total.split()[-1] == f"{stored:.2e}"  # the error of what was stored, nothing else
    with q8.safe_open(tmp_path / "n.q8") as f:
        assert f.info("a.weight")["extra"]["refused_rel_l2"] == f"{got['a.weight']['refused_rel_l2']:.3e}"
