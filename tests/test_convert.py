"""q8convert: tiny Hugging Face models and Trainer checkpoints built here, converted, decoded
and loaded again; bitsandbytes 8-bit state kept code for code; lossless mode bit-exact;
bad inputs refused with errors naming the file; nothing partial left behind."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import q8
import torch
from q8.tools.convert import (
    EXIT_CORRUPT,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_TERMINATED,
    EXIT_USAGE,
    main,
)
from q8.tools.state import infer_blocksize
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

transformers = pytest.importorskip("transformers")


def run(*argv) -> int:
    return main([str(a) for a in argv])


def text_batches(vocab: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """Generated 'text': noisy arithmetic sequences a model can learn something from."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (8, 1), generator=g)
        step = torch.randint(1, 5, (8, 1), generator=g)
        seq = (start + step * torch.arange(48)) % vocab
        noise = torch.rand(seq.shape, generator=g) < 0.1
        out.append(torch.where(noise, torch.randint(0, vocab, seq.shape, generator=g), seq))
    return out


def train(model: torch.nn.Module, batches: list[torch.Tensor], **kwargs) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for x in batches:
        loss = model(input_ids=x, labels=x, **kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def hidden(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, output_hidden_states=True).hidden_states[-1]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).min())


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 (about 2M parameters) briefly trained, saved as a Trainer-style
    checkpoint: model, AdamW optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json.
    Returns the folder and the model (to compare hidden states with)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=256, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = train(model, text_batches(cfg.vocab_size, 6))
    folder = tmp_path_factory.mktemp("gpt2") / "checkpoint-6"
    model.save_pretrained(folder)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    torch.save(sched.state_dict(), folder / "scheduler.pt")
    torch.save({"python": random.getstate(), "cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 6, "log_history": []}))
    torch.save(NotAStateDict(), folder / "training_args.bin")  # a pickle needing code: carried over, never loaded
    return folder, model


@pytest.fixture(scope="module")
def gpt2_converted(gpt2, tmp_path_factory):
    folder = gpt2[0]
    out = tmp_path_factory.mktemp("gpt2-out")
    assert run(folder, "-o", out / "ckpt.q8", "--quantize-weights", "--quiet") == EXIT_OK
    assert run("decode", out / "ckpt.q8", "-o", out / "restored", "--quiet") == EXIT_OK
    return out / "ckpt.q8", out / "restored"


def test_gpt2_roundtrip_close_and_4x_smaller(gpt2, gpt2_converted):
    folder, model = gpt2
    converted, restored = gpt2_converted
    ratio = (folder / "model.safetensors").stat().st_size / (converted / "model.q8").stat().st_size
    assert ratio >= 3.9, ratio
    back = transformers.GPT2LMHeadModel.from_pretrained(restored).eval()
    x = text_batches(512, 1, seed=1)[0]
    assert cosine(hidden(model, x), hidden(back, x)) >= 0.999
    # the quantized weights really changed (this is not a copy), the 1-D ones did not
    orig, dec = model.state_dict(), st_load(restored / "model.safetensors")
    assert not torch.equal(orig["transformer.h.0.mlp.c_fc.weight"], dec["transformer.h.0.mlp.c_fc.weight"])
    assert torch.equal(orig["transformer.h.0.ln_1.weight"], dec["transformer.h.0.ln_1.weight"])


def test_bert_roundtrip_close_and_4x_smaller(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(cfg)
    train(model, text_batches(cfg.vocab_size, 4))
    model.save_pretrained(tmp_path / "bert")
    assert run(tmp_path / "bert", "-o", tmp_path / "bert.q8", "-q") == EXIT_OK
    assert run("decode", tmp_path / "bert.q8", "-o", tmp_path / "bert-back", "-q") == EXIT_OK
    ratio = (tmp_path / "bert/model.safetensors").stat().st_size / (tmp_path / "bert.q8/model.q8").stat().st_size
    assert ratio >= 3.9, ratio
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "bert-back").eval()
    x = text_batches(512, 1, seed=2)[0]
    assert cosine(hidden(model, x), hidden(back, x)) >= 0.999


def test_target_error_is_monotone_on_a_trained_gpt2(gpt2, tmp_path):
    """A larger --target-error never gives a larger file, and every tensor the target
    reaches stays within it (the model's weights, as in a real conversion); nor does a
    larger --model-error."""
    src = gpt2[0] / "model.safetensors"
    sizes = []
    for target in (0.005, 0.008, 0.009, 0.012, 0.025):
        assert run(src, "-o", tmp_path / "m.q8", "--target-error", target, "--overwrite", "-q") == EXIT_OK
        sizes.append((tmp_path / "m.q8").stat().st_size)
        with q8.safe_open(tmp_path / "m.q8") as f:
            extras = [f.info(k)["extra"] for k in f.keys() if f.info(k)["encoding"] == "blockwise"]
        met = [float(e["rel_l2"]) for e in extras if "smallest within" in e["q8convert"]]
        assert all(err <= target for err in met) and len(met) >= (len(extras) if target > 0.007 else 0)
    assert sizes == sorted(sizes, reverse=True), sizes
    sizes = []
    for target in (0.005, 0.008, 0.012, 0.025):
        assert run(src, "-o", tmp_path / "m.q8", "--model-error", target, "--overwrite", "-q") == EXIT_OK
        sizes.append((tmp_path / "m.q8").stat().st_size)
    assert sizes == sorted(sizes, reverse=True), sizes


def test_trainer_checkpoint_resumes(gpt2, gpt2_converted):
    folder = gpt2[0]
    converted, restored = gpt2_converted
    # the other files are carried over byte for byte, there and back
    for name in ("config.json", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
        assert (converted / name).read_bytes() == (folder / name).read_bytes()
        assert (restored / name).read_bytes() == (folder / name).read_bytes()
    # Adam moments are stored with the dynamic codes, signed and unsigned
    with q8.safe_open(converted / "optimizer.q8") as f:
        assert f.info("state.0.exp_avg")["code"] == "dynamic"
        assert f.info("state.0.exp_avg_sq")["code"] == "udynamic"
    # resume: the decoded model and optimizer.pt load into torch AdamW and train on
    back = transformers.GPT2LMHeadModel.from_pretrained(restored)
    resumed = torch.optim.AdamW(back.parameters(), lr=2e-3)
    resumed.load_state_dict(torch.load(restored / "optimizer.pt", weights_only=True))
    orig_state, new_state = torch.load(folder / "optimizer.pt", weights_only=True), resumed.state_dict()
    assert new_state["param_groups"] == orig_state["param_groups"]
    for pid, st in orig_state["state"].items():
        assert torch.equal(new_state["state"][pid]["step"], st["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert q8.quant_error(st[key], new_state["state"][pid][key]).rel_l2 < 0.05, (pid, key)
    x = text_batches(512, 1, seed=3)[0]
    before = float(back(input_ids=x, labels=x).loss.detach())
    for _ in range(3):
        back(input_ids=x, labels=x).loss.backward()
        resumed.step()
        resumed.zero_grad()
    assert float(back(input_ids=x, labels=x).loss.detach()) < before
    assert int(resumed.state_dict()["state"][0]["step"]) == 6 + 3


def test_bitsandbytes_state_kept_code_for_code(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.ReLU(), torch.nn.Linear(96, 10))
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(16, 128)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    torch.save(sd, tmp_path / "optimizer.pt")
    assert run(tmp_path / "optimizer.pt", "-o", tmp_path / "opt.q8", "-q") == EXIT_OK
    assert run("decode", tmp_path / "opt.q8", "-o", tmp_path / "back.pt", "-q") == EXIT_OK
    with q8.safe_open(tmp_path / "opt.q8") as f:
        info = f.info("state.0.__bnb_optimizer_quant_state__.state1")
        assert (info["encoding"], info["code"], info["blocksize"]) == ("blockwise", "dynamic", 256)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    wrap = "__bnb_optimizer_quant_state__"
    for pid, st in sd["state"].items():
        assert back["state"][pid]["step"] == st["step"]
        assert back["state"][pid][wrap].keys() == st[wrap].keys()
        for key, value in st[wrap].items():
            got = back["state"][pid][wrap][key]
            assert got.dtype == value.dtype and torch.equal(got, value), (pid, key)
    # and bitsandbytes loads it and steps on
    fresh = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back)
    model(torch.randn(16, 128)).square().mean().backward()
    fresh.step()


def test_q8_optimizer_state_dict_round_trips_exactly(tmp_path):
    """A q8 optimizer's torch.save'd state_dict (what a plain Trainer writes for it): codes are
    integers and the (rows, K) absmax are kept exact, so decode gives the state back bit for bit."""
    torch.manual_seed(0)
    big = q8.optim.AdamW8bit([torch.nn.Parameter(torch.randn(3000, 100))], blocksize=64)
    big.param_groups[0]["params"][0].grad = torch.randn(3000, 100)
    big.step()
    sd = big.state_dict()
    assert sd["state"][0]["exp_avg.absmax"].shape == (3000, 2)  # 6000 values: would be quantized as a 2-D float
    torch.save(sd, tmp_path / "optimizer.pt")
    assert run(tmp_path / "optimizer.pt", "-o", tmp_path / "opt.q8", "-q") == EXIT_OK
    with q8.safe_open(tmp_path / "opt.q8") as f:
        assert f.info("state.0.exp_avg.absmax")["encoding"] != "blockwise"
    assert run("decode", tmp_path / "opt.q8", "-o", tmp_path / "back.pt", "-q") == EXIT_OK
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for key, value in sd["state"][0].items():
        got = back["state"][0][key]
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, key


def test_bitsandbytes_blocksize_is_inferred_and_checked(tmp_path):
    assert infer_blocksize(96 * 128, 48) == 256
    assert infer_blocksize(12288, 6) == 2048
    assert infer_blocksize(100, 1) == 128  # one block: every blocksize >= 100 decodes alike
    assert infer_blocksize(12288, 7) is None
    qmap = q8.dynamic_code(True).values
    bad = {"state": {0: {"step": 1, "state1": torch.zeros(96, 128, dtype=torch.uint8), "qmap1": qmap,
                         "absmax1": torch.ones(7)}}, "param_groups": []}  # fmt: skip
    torch.save(bad, tmp_path / "bad.pt")
    assert run(tmp_path / "bad.pt", "-o", tmp_path / "bad.q8", "-q") == EXIT_INPUT
    assert not (tmp_path / "bad.q8").exists()
    bad["state"][0]["absmax1"], bad["state"][0]["qmap1"] = torch.ones(48), torch.linspace(-1, 1, 256)
    torch.save(bad, tmp_path / "bad.pt")
    assert run(tmp_path / "bad.pt", "-o", tmp_path / "bad.q8", "-q") == EXIT_INPUT


def test_lossless_is_bit_exact(gpt2, tmp_path, capsys):
    folder = gpt2[0]
    assert run(folder, "-o", tmp_path / "l.q8", "--lossless", "--json") == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert {t["encoding"] for f in report["files"] for t in f["tensors"]} == {"exact"}
    assert run("decode", tmp_path / "l.q8", "-o", tmp_path / "back", "-q") == EXIT_OK
    a, b = st_load(folder / "model.safetensors"), st_load(tmp_path / "back/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)), k
    oa = torch.load(folder / "optimizer.pt", weights_only=True)
    ob = torch.load(tmp_path / "back/optimizer.pt", weights_only=True)
    assert oa["param_groups"] == ob["param_groups"]
    for pid in oa["state"]:
        for k, v in oa["state"][pid].items():
            assert torch.equal(v, ob["state"][pid][k])


def test_policy_flags_keep_max_error_code_blocksize(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(512, 64, generator=g)
    embed[:, 0] *= 50  # an outlier feature: a linear table loses precision on every other element
    tensors = {
        "embed.weight": embed,
        "lm_head.weight": torch.randn(512, 64, generator=g),
        "mlp.weight": torch.randn(256, 256, generator=g),
        "norm.weight": torch.ones(8192),
        "position_ids": torch.arange(4096),
        "mask": torch.ones(64, 64, dtype=torch.bool),
        "half": torch.randn(128, 64, generator=g).half(),
    }
    st_save(tensors, tmp_path / "m.safetensors")
    argv = ["--keep", "lm_head.*", "--max-error", "0.01", "--blocksize", "256", "--code", "linear", "--json"]
    assert run(tmp_path / "m.safetensors", "-o", tmp_path / "m.q8", *argv) == EXIT_OK
    got = {t["name"]: t for t in json.loads(capsys.readouterr().out)["files"][0]["tensors"]}
    assert got["lm_head.weight"]["reason"] == "--keep lm_head.*"
    assert got["norm.weight"]["reason"] == "1-D (norm/bias)"
    assert got["position_ids"]["reason"].startswith("int64") and got["mask"]["reason"].startswith("bool")
    assert got["mlp.weight"]["encoding"] == "quantized" and got["mlp.weight"]["code"] == "linear"
    assert 0 < got["mlp.weight"]["rel_l2"] <= 0.01
    assert got["half"]["encoding"] == "quantized"
    # linear codes on an embedding with outlier rows: error too high, kept exact and said so
    assert got["embed.weight"]["encoding"] == "exact" and "> --max-error" in got["embed.weight"]["reason"]
    with q8.safe_open(tmp_path / "m.q8") as f:
        assert f.info("mlp.weight")["blocksize"] == 256
        assert f.info("mlp.weight")["extra"]["rel_l2"] == f"{got['mlp.weight']['rel_l2']:.3e}"
        assert torch.equal(f.get_tensor("lm_head.weight"), tensors["lm_head.weight"])
        assert f.get_tensor("half").dtype == torch.float16
    # the error recorded is the error of what was stored
    err = q8.quant_error(tensors["mlp.weight"], q8.load_file(tmp_path / "m.q8")["mlp.weight"]).rel_l2
    assert err == pytest.approx(got["mlp.weight"]["rel_l2"], rel=1e-6)


def test_dry_run_and_sharded_output(gpt2, tmp_path, capsys):
    folder = gpt2[0]
    assert run(folder / "model.safetensors", "-o", tmp_path / "m.q8", "--dry-run") == EXIT_OK
    assert "dry run: nothing written" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert run(folder, "--dry-run", "--json", "--quantize-weights") == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["output"] is None and report["totals"]["ratio"] > 3.9  # estimated from the 8-bit sizes
    assert not folder.with_name(folder.name + ".q8").exists()
    assert run(folder / "model.safetensors", "-o", tmp_path / "m.q8", "--max-shard-size", "1MB", "-q") == EXIT_OK
    shards = sorted(p.name for p in tmp_path.iterdir())
    n = len(shards) - 1
    assert n >= 2 and shards == [f"m-{i:05d}-of-{n:05d}.q8" for i in range(1, n + 1)] + ["m.q8.index.json"]
    assert run("verify", tmp_path / "m.q8.index.json") == EXIT_OK
    assert run("decode", tmp_path / "m.q8.index.json", "-o", tmp_path / "back.safetensors") == EXIT_OK
    a, b = st_load(folder / "model.safetensors"), st_load(tmp_path / "back.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_sharded_safetensors_input(tmp_path):
    g = torch.Generator().manual_seed(0)
    parts = [{f"l{i}.{j}": torch.randn(64, 128, generator=g) for j in range(2)} for i in range(3)]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        st_save(part, tmp_path / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert run(tmp_path / "model.safetensors.index.json", "-o", tmp_path / "m.q8", "-q") == EXIT_OK
    with q8.safe_open(tmp_path / "m.q8") as f:
        assert sorted(f.keys()) == sorted(weight_map)
    weight_map["missing"] = "model-00001-of-00003.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert run(tmp_path / "model.safetensors.index.json", "-o", tmp_path / "n.q8", "-q") == EXIT_INPUT


class NotAStateDict:
    def __init__(self) -> None:
        self.w = torch.ones(3)


def test_pickle_needing_code_is_refused(tmp_path, capsys):
    torch.save({"model": NotAStateDict()}, tmp_path / "evil.pt")
    assert run(tmp_path / "evil.pt", "-o", tmp_path / "evil.q8") == EXIT_INPUT
    err = capsys.readouterr().err
    assert str(tmp_path / "evil.pt") in err and "refused" in err and "NotAStateDict" in err
    assert not (tmp_path / "evil.q8").exists()


def test_failed_conversion_leaves_nothing(gpt2, tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.safetensors").write_bytes((gpt2[0] / "model.safetensors").read_bytes())
    torch.save({"x": NotAStateDict()}, src / "optimizer.pt")  # fails after the weights were written
    assert run(src, "-o", tmp_path / "out", "-q") == EXIT_INPUT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # an existing output is neither overwritten without --overwrite nor damaged by a failure
    (tmp_path / "out.q8").write_bytes(b"previous")
    assert run(src / "optimizer.pt", "-o", tmp_path / "out.q8", "--overwrite", "-q") == EXIT_INPUT
    assert run(src / "model.safetensors", "-o", tmp_path / "out.q8", "-q") == EXIT_OUTPUT
    assert (tmp_path / "out.q8").read_bytes() == b"previous"


_HANGING_CONVERT = """
import sys, time
import q8.tools.convert as c

def hang(*args):  # the conversion stops here, its temporary folder already made
    print("ready", flush=True)
    time.sleep(120)

c._run_convert = hang
sys.exit(c.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [
        (signal.SIGINT, EXIT_INTERRUPTED, "q8convert: interrupted"),
        (signal.SIGTERM, EXIT_TERMINATED, "q8convert: terminated"),
        (signal.SIGKILL, -signal.SIGKILL, None),  # no chance to clean up: the next run does
    ],
)
def test_signals_stop_cleanly_and_the_next_run_removes_what_a_kill_left(tmp_path, sig, code, line):
    src, dst = tmp_path / "m.safetensors", tmp_path / "out.q8"
    st_save({"w": torch.randn(64, 64)}, src)
    child = subprocess.Popen(
        [sys.executable, "-c", _HANGING_CONVERT, str(src), "-o", str(dst), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # a shell's background job ignores SIGINT, and so would q8convert as it should
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert child.stdout.readline() == b"ready\n"
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == code
    if line is not None:
        assert err.decode().splitlines() == [line]  # one line, no traceback
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert run(src, "-o", dst, "-q") == EXIT_OK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out.q8"]


def test_bad_inputs_name_the_file(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 100)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "junk.safetensors").read_bytes()[:4])
    cases = {
        tmp_path / "missing.safetensors": "no such file",
        tmp_path / "junk.safetensors": "not a safetensors file",
        tmp_path / "trunc.safetensors": "not a safetensors file",
        tmp_path / "notes.txt": "unknown checkpoint type",
        tmp_path: "no checkpoint found",
    }
    for path, message in cases.items():
        assert run(path, "-o", tmp_path / "out.q8") == EXIT_INPUT, path
        err = capsys.readouterr().err
        assert str(path) in err and message in err, err
    assert run(tmp_path / "x.safetensors", "--blocksize", "100") == EXIT_USAGE
    assert "power of two" in capsys.readouterr().err
    assert run("verify", tmp_path / "notes.txt") == EXIT_CORRUPT
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'notes.txt'}: FAILED") and "q8 file" in out


def test_info_and_verify(gpt2_converted, tmp_path, capsys):
    converted = gpt2_converted[0]
    assert run("info", converted / "model.q8") == EXIT_OK
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn.weight" in out and "blockwise linear" in out and "total:" in out
    assert run("info", converted, "--json") == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    rows = doc["files"][str(converted / "optimizer.q8")]
    row = next(r for r in rows if r["name"] == "state.0.exp_avg_sq")
    assert row["code"] == "udynamic" and 0 < row["rel_l2"] < 0.05 and row["extra"]["q8convert"] == "Adam exp_avg_sq"
    assert doc["totals"]["ratio"] > 3.9
    assert run("verify", converted) == EXIT_OK
    # flip one byte inside a tensor's data: verify fails with exit code 1, naming the file
    bad = tmp_path / "bad.q8"
    data = bytearray((converted / "model.q8").read_bytes())
    data[len(data) // 3] ^= 0xFF
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    assert run("verify", bad) == EXIT_CORRUPT
    assert str(bad) in capsys.readouterr().out
    assert run("decode", bad, "-o", tmp_path / "bad.safetensors") == EXIT_CORRUPT
    assert not (tmp_path / "bad.safetensors").exists()


def test_installed_script_smoke(gpt2, tmp_path):
    script = Path(sys.executable).with_name("q8convert")
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "examples:" in proc.stdout and "exit codes" in proc.stdout
    cmd = [script, gpt2[0] / "model.safetensors", "-o", tmp_path / "m.q8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "quantized linear" in proc.stdout and "wrote" in proc.stdout


def test_decode_q8_files_written_by_the_api(tmp_path, capsys):
    w = torch.randn(64, 128)
    q8.save_file({"w": w, "b": torch.zeros(4)}, tmp_path / "flat.q8", quantize=True)
    assert run("decode", tmp_path / "flat.q8", "-o", tmp_path / "flat.safetensors", "-q") == EXIT_OK
    back = st_load(tmp_path / "flat.safetensors")
    assert q8.quant_error(w, back["w"]).rel_l2 < 0.02 and torch.equal(back["b"], torch.zeros(4))
    assert run("decode", tmp_path / "flat.q8", "-o", tmp_path / "flat.txt") == EXIT_USAGE
    assert "*.safetensors" in capsys.readouterr().err
    state = {"step": 3, "state": {0: {"exp_avg": q8.quantize(w, "dynamic")}}, "groups": [{"lr": 0.1}]}
    q8.save(state, tmp_path / "nested.q8")
    assert run("decode", tmp_path / "nested.q8", "-o", tmp_path / "nested.pt", "-q") == EXIT_OK
    got = torch.load(tmp_path / "nested.pt", weights_only=True)
    assert got["step"] == 3 and got["groups"] == [{"lr": 0.1}]
    assert torch.equal(got["state"][0]["exp_avg"], q8.dequantize(state["state"][0]["exp_avg"]))


def test_info_shows_the_row_layout(tmp_path, capsys):
    """8-bit optimizer state whose rows cut blocks: `info` names the row length."""
    opt = q8.optim.AdamW8bit([torch.nn.Parameter(torch.randn(64, 100))], blocksize=64)
    opt.param_groups[0]["params"][0].grad = torch.randn(64, 100)
    opt.step()
    q8.save_optimizer(opt, tmp_path / "opt.q8")
    capsys.readouterr()
    assert run("info", tmp_path / "opt.q8", "--json") == EXIT_OK
    (rows,) = json.loads(capsys.readouterr().out)["files"].values()
    assert {(r["name"], r["row_length"]) for r in rows} == {("state.0.exp_avg", 100), ("state.0.exp_avg_sq", 100)}
    assert run("info", tmp_path / "opt.q8") == EXIT_OK
    assert "blockwise dynamic/64, rows of 100" in capsys.readouterr().out
