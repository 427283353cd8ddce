"""Q8Trainer and q8 optimizers in transformers.Trainer: exact resume, smaller checkpoints, loud failures.

A tiny GPT-2 built from a config trains on text generated here (bytes as tokens), on CPU, deterministically
(seeded data order, no dropout), so a resumed run must match the uninterrupted one bit for bit.
"""

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import q8
import safetensors.torch
import torch

transformers = pytest.importorskip("transformers")
from q8.integrations.hf import (  # noqa: E402
    OPTIMIZER_FILE,
    Q8Trainer,
    load_optimizer_state,
    q8_optimizer_cls_and_kwargs,
)
from q8.tools.convert import TRAINING_WEIGHTS  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

STEPS, SAVE_EVERY, BATCH, SEQ = 20, 10, 4, 32
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing frogs".split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster, and far faster on a busy machine (no OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=4, n_embd=256, n_head=4, vocab_size=256, n_positions=SEQ, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    return GPT2LMHeadModel(config)


class ByteText(torch.utils.data.Dataset):
    """Generated sentences, UTF-8 bytes as token ids, cut into SEQ-token samples."""

    def __init__(self, samples: int = STEPS * BATCH) -> None:
        rng = random.Random(0)
        text = " ".join(rng.choice(WORDS) for _ in range(samples * SEQ)).encode()
        self.ids = torch.tensor(list(text[: samples * SEQ])).view(samples, SEQ)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(output_dir, **overrides) -> TrainingArguments:
    kwargs = dict(
        max_steps=STEPS,
        save_steps=SAVE_EVERY,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        weight_decay=0.01,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(str(output_dir), **{**kwargs, **overrides})


def train(output_dir, trainer_cls=Q8Trainer, resume=None, model=None, args=None, **trainer_kwargs):
    trainer = trainer_cls(
        model or make_model(), args or training_args(output_dir), train_dataset=ByteText(), **trainer_kwargs
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer


def loss_at(trainer, step: int) -> float:
    return next(e["loss"] for e in trainer.state.log_history if e.get("step") == step and "loss" in e)


def test_optimizer_from_training_args(tmp_path):
    args = training_args(tmp_path, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6, weight_decay=0.05)
    model = make_model()
    cls_and_kwargs = q8_optimizer_cls_and_kwargs("AdamW8bit", args, model)
    opt = Trainer(model, args, optimizer_cls_and_kwargs=cls_and_kwargs).create_optimizer()
    assert type(opt) is q8.optim.AdamW8bit
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(p is model.transformer.h[0].ln_1.bias for p in no_decay["params"])
    for group in opt.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (1e-3, (0.8, 0.99), 1e-6)


def test_embeddings_keep_32bit_state(tmp_path):
    for embeddings_32bit, wte_state in ((True, torch.Tensor), (False, q8.QTensor)):
        model = make_model()
        cls, kwargs = q8_optimizer_cls_and_kwargs(
            "adamw8bit", training_args(tmp_path), model, embeddings_32bit=embeddings_32bit
        )
        opt = cls(model.parameters(), **kwargs)
        model(**ByteText()[0:BATCH]).loss.backward()
        opt.step()
        assert type(opt.state[model.transformer.wte.weight]["exp_avg"]) is wte_state
        assert type(opt.state[model.transformer.h[0].mlp.c_fc.weight]["exp_avg"]) is q8.QTensor


def test_every_optimizer_name(tmp_path):
    model = make_model()
    for name, class_name in q8.integrations.hf.OPTIMIZERS.items():
        cls, kwargs = q8_optimizer_cls_and_kwargs(name, training_args(tmp_path), model)
        assert cls is getattr(q8.optim, class_name)
        cls(model.parameters(), **kwargs)  # the kwargs fit the optimizer
        assert ("betas" in kwargs) == (name in ("adam8bit", "adamw8bit", "lamb8bit", "lion8bit"))
        assert ("eps" in kwargs) == (name in ("adam8bit", "adamw8bit", "lamb8bit"))
    args = training_args(tmp_path, optim_args="momentum=0.5, nesterov=true, blocksize=128")
    _, kwargs = q8_optimizer_cls_and_kwargs("sgd8bit", args, model)
    assert (kwargs["momentum"], kwargs["nesterov"], kwargs["blocksize"]) == (0.5, True, 128)
    with pytest.raises(ValueError, match=r"betas=0\.9.*SGD8bit"):
        q8_optimizer_cls_and_kwargs("sgd8bit", training_args(tmp_path, optim_args="betas=0.9"), model)
    with pytest.raises(ValueError, match="unknown q8 optimizer 'adamw32bit'"):
        q8_optimizer_cls_and_kwargs("adamw32bit", training_args(tmp_path), model)


def test_q8_optim_is_checked_at_construction_and_logged(tmp_path, caplog):
    for q8_optim, optim_args, message in [
        ("adamw9bit", None, "unknown q8_optim 'adamw9bit'"),
        ("adamw8bit", "nonsense=1", "optim_args: 'nonsense=1'"),
    ]:
        with pytest.raises(ValueError, match=message):
            Q8Trainer(make_model(), training_args(tmp_path, optim_args=optim_args), q8_optim=q8_optim)
    args = training_args(tmp_path, optim_args="optim_bits=8,blocksize=128,maximize=false")
    trainer = Q8Trainer(make_model(), args, train_dataset=ByteText(), q8_optim="adamw8bit")
    with caplog.at_level(logging.INFO, logger="q8"):
        opt = trainer.create_optimizer()
    assert opt.blocksize == 128
    trainer.model(**ByteText()[0:BATCH]).loss.backward()
    opt.step()  # now every parameter has its state
    # 4 layers x 4 matrices in 8 bits; embeddings (32-bit state), norms and biases in fp32
    expected = f"optimizer: q8 AdamW8bit, 8-bit state for 16 of 52 parameters, {opt.state_nbytes() / 1e6:.1f} MB"
    assert expected in caplog.text


OPTIMIZERS = {"adamw_torch": {}, "adamw8bit": {"q8_optim": "adamw8bit"}}


@pytest.fixture(scope="module")
def run_of(tmp_path_factory):
    """name -> an uninterrupted 20-step Q8Trainer run with checkpoints at steps 10 and 20 (made once)."""
    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(name)
            runs[name] = train(out, **OPTIMIZERS[name]), out, name
        return runs[name]

    return get


@pytest.fixture(params=list(OPTIMIZERS))
def full_run(request, run_of):
    return run_of(request.param)


@pytest.fixture
def fp32_run(run_of):
    return run_of("adamw_torch")


def test_resume_is_bit_exact(full_run, tmp_path):
    trainer, out, name = full_run
    resumed = train(tmp_path, resume=out / f"checkpoint-{SAVE_EVERY}", **OPTIMIZERS[name])
    assert loss_at(resumed, STEPS) == loss_at(trainer, STEPS)
    for (key, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    # the optimizer state itself came back exactly: the resumed run's final state equals the full run's
    with q8.safe_open(str(out / f"checkpoint-{STEPS}" / OPTIMIZER_FILE)) as full:
        with q8.safe_open(str(tmp_path / f"checkpoint-{STEPS}" / OPTIMIZER_FILE)) as again:
            assert full.metadata() == again.metadata() and full.keys() == again.keys()
            for name in full.keys():
                assert torch.equal(full.get_tensor(name), again.get_tensor(name)), name


def test_checkpoint_layout(full_run):
    _, out, _ = full_run
    files = set(os.listdir(out / f"checkpoint-{SAVE_EVERY}"))
    assert {OPTIMIZER_FILE, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    assert "model.safetensors" in files
    assert os.path.getsize(out / f"checkpoint-{SAVE_EVERY}" / "optimizer.pt") < 2048  # only the placeholder
    q8.verify(str(out / f"checkpoint-{SAVE_EVERY}" / OPTIMIZER_FILE))


def test_fp32_state_is_lossless(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**ByteText()[0:4]).loss.backward()
    opt.step()
    path = str(tmp_path / OPTIMIZER_FILE)
    q8.integrations.hf.save_optimizer_state(opt, path)
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3)
    load_optimizer_state(restored, path)
    for p in model.parameters():
        for key, t in opt.state[p].items():
            assert torch.equal(t, restored.state[p][key]), key
    assert restored.param_groups == opt.param_groups


def test_plain_trainer_refuses_a_q8_checkpoint(fp32_run, tmp_path):
    _, out, _ = fp32_run
    with pytest.raises(RuntimeError, match=r"optimizer\.q8.*Q8Trainer"):
        train(tmp_path, trainer_cls=Trainer, resume=out / f"checkpoint-{SAVE_EVERY}")


def test_placeholder_fails_without_q8_imported(fp32_run):
    """A process that never imported q8 (a plain transformers script) cannot load the placeholder either."""
    _, out, _ = fp32_run
    code = (
        "import sys, torch\n"
        "try:\n"
        "    torch.load(sys.argv[1], weights_only=True)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
        "assert 'q8' not in sys.modules\n"
    )
    path = str(out / f"checkpoint-{SAVE_EVERY}" / "optimizer.pt")
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    result = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=env, check=True)
    assert "UnpicklingError" in result.stdout and "resume_requires_q8trainer" in result.stdout


def test_import_q8_does_not_import_transformers():
    code = "import sys, q8, q8.integrations; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONSAFEPATH": "1"}, check=True)


@pytest.mark.parametrize(
    ("remove", "error", "match"),
    [
        ((OPTIMIZER_FILE, "optimizer.pt"), FileNotFoundError, "no optimizer state"),
        (("scheduler.pt",), FileNotFoundError, "scheduler.pt is missing"),
        ((OPTIMIZER_FILE,), RuntimeError, r"optimizer\.q8.*Q8Trainer"),  # the placeholder alone
    ],
)
def test_resume_without_optimizer_state_raises(full_run, tmp_path, remove, error, match):
    _, out, name = full_run
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(out / f"checkpoint-{SAVE_EVERY}", checkpoint)
    for file in remove:
        os.remove(checkpoint / file)
    with pytest.raises(error, match=match):
        train(tmp_path / "out", resume=checkpoint, **OPTIMIZERS[name])


def test_resume_with_other_parameters_raises(full_run, tmp_path):
    _, out, name = full_run
    model = make_model()
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)  # one parameter fewer in the optimizer
    with pytest.raises(ValueError, match=f"{OPTIMIZER_FILE}: .*parameters"):
        train(tmp_path, resume=out / f"checkpoint-{SAVE_EVERY}", model=model, **OPTIMIZERS[name])


def test_resume_with_another_optimizer_raises(full_run, tmp_path):
    _, out, name = full_run
    other = OPTIMIZERS["adamw8bit" if name == "adamw_torch" else "adamw_torch"]
    with pytest.raises(ValueError, match=f"{OPTIMIZER_FILE}: (state of a|holds a q8 optimizer)"):
        train(tmp_path, resume=out / f"checkpoint-{SAVE_EVERY}", **other)


def test_quantized_fp32_state(fp32_run, tmp_path, caplog):
    """quantize_optimizer_state=True: ~4x smaller fp32 state, a logged one-time error, and a working resume."""
    _, out, _ = fp32_run
    with caplog.at_level(logging.WARNING, logger="q8"):
        train(tmp_path, quantize_optimizer_state=True)
    assert "max relative L2 error" in caplog.text
    lossless = os.path.getsize(out / f"checkpoint-{SAVE_EVERY}" / OPTIMIZER_FILE)
    quantized = tmp_path / f"checkpoint-{SAVE_EVERY}" / OPTIMIZER_FILE
    assert lossless / os.path.getsize(quantized) > 3.0
    with q8.safe_open(str(quantized)) as f:
        assert float(f.metadata()["quantized_rel_l2_max"]) < 0.05

    exact = Q8Trainer(make_model(), training_args(tmp_path)).create_optimizer()
    load_optimizer_state(exact, str(out / f"checkpoint-{SAVE_EVERY}" / OPTIMIZER_FILE))
    approx = Q8Trainer(make_model(), training_args(tmp_path)).create_optimizer()
    load_optimizer_state(approx, str(quantized))
    for p, r in zip(exact.param_groups[0]["params"], approx.param_groups[0]["params"], strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert q8.quant_error(exact.state[p][key], approx.state[r][key]).rel_l2 < 0.05
        assert exact.state[p]["exp_avg"].dtype == approx.state[r]["exp_avg"].dtype == torch.float32
    resumed = train(tmp_path / "resumed", resume=quantized.parent)
    assert abs(loss_at(resumed, STEPS) - loss_at(fp32_run[0], STEPS)) < 0.05


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The same 20 steps with a plain Trainer and torch AdamW: checkpoints with optimizer.pt."""
    out = tmp_path_factory.mktemp("plain")
    return train(out, trainer_cls=Trainer), out


def test_optimizer_file_is_3_6x_smaller_than_torch_4x_entropy_coded(run_of, plain_run, tmp_path):
    """AdamW8bit's checkpoint optimizer state (optimizer.q8 plus the placeholder optimizer.pt) against the
    optimizer.pt of a plain Trainer with torch AdamW, for the same model: as Q8Trainer writes it (8-bit
    state as it is: codes + absmax), and entropy-coded (compress_optimizer_codes=True), which resumes alike."""
    torch_bytes = os.path.getsize(plain_run[1] / f"checkpoint-{SAVE_EVERY}" / "optimizer.pt")
    checkpoint = run_of("adamw8bit")[1] / f"checkpoint-{SAVE_EVERY}"
    placeholder = os.path.getsize(checkpoint / "optimizer.pt")
    q8_bytes = os.path.getsize(checkpoint / OPTIMIZER_FILE) + placeholder
    trainer = train(tmp_path, compress_optimizer_codes=True, **OPTIMIZERS["adamw8bit"])
    coded_file = tmp_path / f"checkpoint-{SAVE_EVERY}" / OPTIMIZER_FILE
    coded = os.path.getsize(coded_file) + placeholder
    for path, compressed in ((checkpoint / OPTIMIZER_FILE, False), (coded_file, True)):  # the 8-bit codes
        with q8.safe_open(str(path)) as f:
            codes = [f.record(n)["segments"][0] for n in f.keys() if f.info(n)["encoding"] == "blockwise"]
            assert codes and any(seg[3] for seg in codes) == compressed
    assert loss_at(trainer, STEPS) == loss_at(run_of("adamw8bit")[0], STEPS)
    print(f"optimizer state: torch {torch_bytes:,} B, q8 {q8_bytes:,} B ({torch_bytes / q8_bytes:.2f}x), "
          f"entropy-coded {coded:,} B ({torch_bytes / coded:.2f}x)")  # fmt: skip
    assert torch_bytes / q8_bytes >= 3.6 and torch_bytes / coded >= 3.9


def test_resume_plain_checkpoint_and_q8convert_output(fp32_run, plain_run, tmp_path):
    """Q8Trainer resumes a plain Trainer's checkpoint, and the same checkpoint after `q8convert --lossless`
    (model.q8 + optimizer.q8), exactly; a plain Trainer run ends where Q8Trainer's does."""
    from q8.tools.convert import main as q8convert

    checkpoint = plain_run[1] / f"checkpoint-{SAVE_EVERY}"
    assert q8convert([str(checkpoint), "-o", str(tmp_path / "converted"), "--lossless", "--quiet"]) == 0
    for source in (checkpoint, tmp_path / "converted"):
        resumed = train(tmp_path / source.name, resume=source)
        assert loss_at(resumed, STEPS) == loss_at(fp32_run[0], STEPS) == loss_at(plain_run[0], STEPS)
        for a, b in zip(resumed.model.parameters(), fp32_run[0].model.parameters(), strict=True):
            assert torch.equal(a, b)
    # into AdamW8bit: the fp32 moments are quantized on load
    trainer = Q8Trainer(make_model(), training_args(tmp_path), q8_optim="adamw8bit")
    trainer.create_optimizer_and_scheduler(num_training_steps=STEPS)
    trainer._load_optimizer_and_scheduler(str(checkpoint))
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        state = trainer.optimizer.state[p]
        assert state["step"] == SAVE_EVERY
        for key in ("exp_avg", "exp_avg_sq"):
            loaded = state[key].dequantize() if isinstance(state[key], q8.QTensor) else state[key]
            assert q8.quant_error(saved[index][key], loaded).rel_l2 < 0.05, (index, key)


def test_model_weights_in_q8(tmp_path):
    """model_weights="q8": checkpoints hold model.q8 (lossless, tied weights once), resume is exact, and
    load_best_model_at_end reads it."""
    args = training_args(tmp_path / "full", eval_strategy="steps", eval_steps=SAVE_EVERY, load_best_model_at_end=True)
    trainer = Q8Trainer(
        make_model(), args, train_dataset=ByteText(), eval_dataset=ByteText(samples=8), model_weights="q8"
    )
    trainer.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_EVERY}"
    assert "model.q8" in os.listdir(checkpoint) and "model.safetensors" not in os.listdir(checkpoint)
    with q8.safe_open(str(checkpoint / "model.q8")) as f:
        assert "transformer.wte.weight" in f.keys() and "lm_head.weight" not in f.keys()  # tied: stored once
    best = q8.load_file(trainer.state.best_model_checkpoint + "/model.q8")
    for name, t in best.items():
        assert torch.equal(trainer.model.state_dict()[name], t), name

    resumed = train(tmp_path / "resumed", resume=checkpoint, model_weights="q8")
    final = q8.load_file(str(tmp_path / "full" / f"checkpoint-{STEPS}" / "model.q8"))
    for name, t in final.items():
        assert torch.equal(resumed.model.state_dict()[name], t), name
    with pytest.raises(ValueError, match="Can't find a valid checkpoint"):  # a plain Trainer fails loudly too
        train(tmp_path / "plain", trainer_cls=Trainer, resume=checkpoint)


def test_model_weights_in_q8_8bit(fp32_run, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="q8"):
        train(tmp_path, model_weights="q8-8bit")  # trains exactly as fp32_run: only the files differ
    assert "model weights stored as 8-bit codes" in caplog.text
    checkpoint = tmp_path / f"checkpoint-{SAVE_EVERY}"
    safetensors_bytes = os.path.getsize(fp32_run[1] / f"checkpoint-{SAVE_EVERY}" / "model.safetensors")
    assert safetensors_bytes / os.path.getsize(checkpoint / "model.q8") > 3.5
    model = make_model()
    q8.integrations.hf.load_model_weights(model, str(checkpoint / "model.q8"))
    exact = safetensors.torch.load_file(fp32_run[1] / f"checkpoint-{SAVE_EVERY}" / "model.safetensors")
    for name, t in exact.items():
        assert q8.quant_error(t, model.state_dict()[name]).rel_l2 < 0.05, name
    with q8.safe_open(str(checkpoint / "model.q8")) as f:
        assert 0 < float(f.metadata()["quantized_rel_l2_max"]) < 0.05
    bad = make_model()
    bad.transformer.wpe = torch.nn.Embedding(SEQ + 1, bad.config.n_embd)
    with pytest.raises(ValueError, match=r"model\.q8: model weights do not match"):
        q8.integrations.hf.load_model_weights(bad, str(checkpoint / "model.q8"))


# -- round trips through q8convert -------------------------------------------------------


def q8convert(*argv) -> int:
    from q8.tools.convert import main

    return main([str(a) for a in argv])


def same_tree(a, b) -> bool:
    """Equal nested state (tensors bit for bit, same dtypes)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_tree, a, b))
    return a == b


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_q8trainer_checkpoint_through_q8convert_resumes_in_a_plain_trainer(run_of, name, tmp_path):
    """Q8Trainer checkpoint -> q8convert -> decode -> a plain transformers.Trainer resumes it and ends
    where the uninterrupted Q8Trainer run did, bit for bit: the weights of a training checkpoint stay
    exact, optimizer.q8 is carried over as is, and decode gives the optimizer's own state_dict()."""
    trainer, out, _ = run_of(name)
    checkpoint = out / f"checkpoint-{SAVE_EVERY}"
    assert q8convert(checkpoint, "-o", tmp_path / "c.q8", "-q") == 0
    assert (tmp_path / "c.q8" / OPTIMIZER_FILE).read_bytes() == (checkpoint / OPTIMIZER_FILE).read_bytes()
    with q8.safe_open(tmp_path / "c.q8" / "model.q8") as f:
        assert {f.info(k)["encoding"] for k in f} <= {"raw", "planes"}
    assert q8convert("decode", tmp_path / "c.q8", "-o", tmp_path / "restored", "-q") == 0
    restored = tmp_path / "restored"
    assert "optimizer.safetensors" not in os.listdir(restored)
    for carried in ("scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
        assert (restored / carried).read_bytes() == (checkpoint / carried).read_bytes(), carried
    optimizer = torch.load(restored / "optimizer.pt", weights_only=True)  # the Trainer's way to read it
    assert optimizer["param_groups"][-1].get("q8_optimizer") == ("AdamW8bit" if name == "adamw8bit" else None)

    model, args = make_model(), training_args(tmp_path / "plain")
    kwargs = {}
    if name != "adamw_torch":  # the q8 optimizer, through the plain Trainer's own argument
        kwargs["optimizer_cls_and_kwargs"] = q8_optimizer_cls_and_kwargs(name, args, model)
    resumed = train(tmp_path / "plain", trainer_cls=Trainer, resume=restored, model=model, args=args, **kwargs)
    assert loss_at(resumed, STEPS) == loss_at(trainer, STEPS)
    for (key, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


@pytest.fixture(scope="module")
def plain_q8_run(tmp_path_factory):
    """A plain Trainer with AdamW8bit through optimizer_cls_and_kwargs: 8-bit state in optimizer.pt."""
    out = tmp_path_factory.mktemp("plain-q8")
    model, args = make_model(), training_args(out)
    cls_and_kwargs = q8_optimizer_cls_and_kwargs("adamw8bit", args, model)
    return train(out, trainer_cls=Trainer, model=model, args=args, optimizer_cls_and_kwargs=cls_and_kwargs), out


def test_q8_state_in_a_plain_trainer_checkpoint_is_kept_as_is(plain_q8_run, tmp_path, capsys):
    """A plain Trainer's optimizer.pt holding a q8 optimizer's state dict: q8convert recognizes it and
    stores every tensor exactly (codes never quantized again, the 32-bit embedding moments neither), and
    decode gives back the same optimizer.pt and weights; the report says what it did."""
    checkpoint = plain_q8_run[1] / f"checkpoint-{SAVE_EVERY}"
    capsys.readouterr()
    assert q8convert(checkpoint, "-o", tmp_path / "c.q8", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    by_file = {f["source"]: f["tensors"] for f in report["files"]}
    assert {t["reason"] for t in by_file["model.safetensors"]} == {TRAINING_WEIGHTS}
    optimizer = by_file["optimizer.pt"]
    assert {t["reason"] for t in optimizer} == {"q8 AdamW8bit state"}
    assert {t["encoding"] for t in optimizer if t["dtype"] == "uint8"} == {"8-bit as is"}
    assert {t["encoding"] for t in optimizer if t["dtype"] != "uint8"} == {"exact"}
    assert q8convert("decode", tmp_path / "c.q8", "-o", tmp_path / "restored", "-q") == 0
    original = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert same_tree(torch.load(tmp_path / "restored" / "optimizer.pt", weights_only=True), original)
    a = safetensors.torch.load_file(checkpoint / "model.safetensors")
    assert same_tree(safetensors.torch.load_file(tmp_path / "restored" / "model.safetensors"), a)
    assert q8convert(checkpoint, "-o", tmp_path / "w.q8", "--quantize-weights", "-q") == 0  # one flag away
    with q8.safe_open(tmp_path / "w.q8" / "model.q8") as f:
        assert f.info("transformer.h.0.mlp.c_fc.weight")["encoding"] == "blockwise"


class CheckpointsSeenOnSave(transformers.TrainerCallback):
    """At each save, which checkpoint folders exist, and whether each visible one is complete."""

    def __init__(self, out) -> None:
        self.out, self.seen = out, []

    def on_save(self, args, state, control, **kwargs):
        visible = sorted(p for p in os.listdir(self.out) if p.startswith("checkpoint-"))
        complete = all(
            {"optimizer.q8", "trainer_state.json", "model.q8"} <= set(os.listdir(self.out / p)) for p in visible
        )
        self.seen.append((state.global_step, visible, complete))


def test_async_checkpoints_are_the_synchronous_ones_written_later(tmp_path, monkeypatch):
    """async_save=True: the checkpoint call returns before model.q8 and optimizer.q8 are written (their
    writer is slowed down here), only complete checkpoints are ever visible, rotation keeps the last
    one, and the files equal those of a synchronous run; a resume from them is exact."""
    write = q8.save_model

    def slow_write(*args, **kwargs):
        time.sleep(0.5)
        write(*args, **kwargs)

    monkeypatch.setattr(q8, "save_model", slow_write)
    seen = CheckpointsSeenOnSave(tmp_path / "async")
    trainer = train(
        tmp_path / "async",
        args=training_args(tmp_path / "async", save_total_limit=1),
        q8_optim="adamw8bit",
        model_weights="q8",
        async_save=True,
        callbacks=[seen],
    )
    assert seen.seen == [(10, [], True), (20, ["checkpoint-10"], True)]  # checkpoint-20 still being written
    assert sorted(os.listdir(tmp_path / "async")) == [f"checkpoint-{STEPS}"]  # rotated once complete, no debris

    monkeypatch.setattr(q8, "save_model", write)
    sync = train(tmp_path / "sync", q8_optim="adamw8bit", model_weights="q8")
    for name in ("optimizer.q8", "model.q8"):
        a = q8.load(tmp_path / "async" / f"checkpoint-{STEPS}" / name)
        b = q8.load(tmp_path / "sync" / f"checkpoint-{STEPS}" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    for name in ("scheduler.pt", "rng_state.pth"):
        assert (tmp_path / "async" / f"checkpoint-{STEPS}" / name).read_bytes() == (
            tmp_path / "sync" / f"checkpoint-{STEPS}" / name
        ).read_bytes()
    assert loss_at(trainer, STEPS) == loss_at(sync, STEPS)
    resumed = train(
        tmp_path / "resumed", resume=tmp_path / "sync" / f"checkpoint-{SAVE_EVERY}", q8_optim="adamw8bit",
        model_weights="q8", async_save=True,
    )  # fmt: skip
    assert loss_at(resumed, STEPS) == loss_at(sync, STEPS)


def test_async_checkpoint_with_the_trainers_safetensors(tmp_path):
    train(tmp_path, q8_optim="adamw8bit", async_save=True)
    checkpoint = tmp_path / f"checkpoint-{SAVE_EVERY}"
    assert {"model.safetensors", "config.json", "optimizer.q8", "scheduler.pt", "trainer_state.json"} <= set(
        os.listdir(checkpoint)
    )
    model = GPT2LMHeadModel.from_pretrained(str(checkpoint))
    assert model.transformer.wte.weight is model.lm_head.weight  # tied weights stored once, as the Trainer does
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_a_failed_async_checkpoint_raises_and_leaves_no_folder(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(q8, "save_model", fail)
    with pytest.raises(RuntimeError, match=r"asynchronous save of .*checkpoint-10 failed: disk full"):
        train(tmp_path, q8_optim="adamw8bit", model_weights="q8", async_save=True)
    assert os.listdir(tmp_path) == []


def test_async_save_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="async_save=True needs a single process without push_to_hub"):
        Q8Trainer(make_model(), training_args(tmp_path, push_to_hub=True, hub_model_id="x/y"), async_save=True)
