"""q8.optim: training parity with 32-bit optimizers, the fused CPU path against the reference
rule, state dicts (round trip, validation, torch and bitsandbytes interop), edge cases."""

import copy
import io
import math
import os
import re
import statistics
import subprocess
import sys
import warnings

import optim_vectors
import pytest
import q8
import torch
from q8.optim import (
    Adagrad8bit,
    Adam8bit,
    AdamW8bit,
    LAMB8bit,
    LARS8bit,
    Lion8bit,
    RMSprop8bit,
    SGD8bit,
    StableEmbedding,
    override_32bit,
)

FP32 = {"min_8bit_size": 10**12}  # the same q8 optimizer with every state entry in fp32


@pytest.fixture
def one_thread():
    """Training loops of tiny models run fastest (and least noisily) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- training parity ---------------------------------------------------------------------


def markov_text(n: int = 20000, letters: int = 24, seed: int = 0) -> torch.Tensor:
    """Byte tokens from a fixed random first-order Markov chain with peaked transitions: a
    language a tiny GPT-2 learns to its entropy in a couple of hundred steps."""
    g = torch.Generator().manual_seed(seed)
    cdf = (torch.randn(letters, letters, generator=g) * 2.5).softmax(-1).cumsum(-1)
    u = torch.rand(n, generator=g)
    out = [0]
    for i in range(n):
        out.append(min(int(torch.searchsorted(cdf[out[-1]], u[i])), letters - 1))
    return torch.tensor(out) + ord("a")


def train_gpt2(make_opt, steps: int = 200, seq: int = 32, batch: int = 8) -> float:
    """Mean loss of the last 20 steps of a 2-layer GPT-2 trained on `markov_text`."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    override_32bit(model.transformer.wte.weight)  # the paper's recipe: 32-bit state for embeddings
    opt = make_opt(model.parameters())
    data = markov_text()
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        start = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        tokens = torch.stack([data[i : i + seq + 1] for i in start])
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


PARITY = {
    # name: (32-bit reference, 8-bit optimizer); torch.optim where it exists, else the same
    # algorithm with fp32 state.
    "AdamW": (lambda p: torch.optim.AdamW(p, lr=3e-3), lambda p: AdamW8bit(p, lr=3e-3)),
    "Adam": (lambda p: torch.optim.Adam(p, lr=3e-3), lambda p: Adam8bit(p, lr=3e-3)),
    "SGD": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda p: SGD8bit(p, lr=0.1, momentum=0.9, nesterov=True),
    ),
    "RMSprop": (
        lambda p: torch.optim.RMSprop(p, lr=3e-4, alpha=0.9, centered=True),
        lambda p: RMSprop8bit(p, lr=3e-4, alpha=0.9, centered=True),
    ),
    # Adagrad from a zero accumulator (lr 3e-2) is chaotic on this task: torch's own final loss
    # spreads by 18% of its mean over four seeds; test_parity_over_seeds covers it.
    "Adagrad": (
        lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.01),
        lambda p: Adagrad8bit(p, lr=1e-2, initial_accumulator_value=0.01),
    ),
    "Lion": (
        lambda p: Lion8bit(p, lr=1e-3, weight_decay=0.1, **FP32),
        lambda p: Lion8bit(p, lr=1e-3, weight_decay=0.1),
    ),
    "LAMB": (
        lambda p: LAMB8bit(p, lr=2e-2, weight_decay=0.01, **FP32),
        lambda p: LAMB8bit(p, lr=2e-2, weight_decay=0.01),
    ),
    "LARS": (lambda p: LARS8bit(p, lr=20.0, **FP32), lambda p: LARS8bit(p, lr=20.0)),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_gpt2_parity(name, one_thread):
    make_ref, make_q8 = PARITY[name]
    ref, ours = train_gpt2(make_ref), train_gpt2(make_q8)
    assert ref < 3.1  # the reference really learned (uniform over 24 letters is 3.18)
    assert abs(ours - ref) <= 0.02 * ref, f"{name}: 8-bit final loss {ours:.4f} vs 32-bit {ref:.4f}"


def test_mlp_regression_parity(one_thread):
    """A small MLP regression: the 8-bit optimizers end no worse than 5% above 32-bit, in the
    median over eight initialisations: the final loss of one run moves by tens of percent
    with any change of rounding, 32-bit too. (LAMB's swings by +-40% between seeds in 32 and
    8 bits alike, here; its parity is test_gpt2_parity's.)"""
    torch.manual_seed(0)
    x = torch.randn(1024, 32)
    y = torch.sin(x @ torch.randn(32, 1) / 4) + 0.1 * torch.randn(1024, 1)

    def train(make_opt, seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
        )
        opt = make_opt(model.parameters())
        for _ in range(150):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    start = torch.nn.functional.mse_loss(torch.zeros_like(y), y).item()
    sgd = (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), lambda p: SGD8bit(p, lr=0.05, momentum=0.9))
    for make_ref, make_q8 in (PARITY["AdamW"], PARITY["Lion"], sgd):
        ratios = []
        for seed in range(1, 9):
            ref, ours = train(make_ref, seed), train(make_q8, seed)
            assert ref < 0.2 * start
            ratios.append(ours / ref)
        assert statistics.median(ratios) <= 1.05, ratios


VOCAB, BAG = 1024, 16
ZIPF = 1.0 / torch.arange(1, VOCAB + 1).float() ** 1.1  # rare words: gradients over decades
WORD_CLASS = torch.randn(VOCAB, 10, generator=torch.Generator().manual_seed(0)) * 2


def word_bags(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of Zipf-distributed words; the class is the argmax of their summed votes plus noise."""
    words = torch.multinomial(ZIPF, n * BAG, replacement=True, generator=g).view(n, BAG)
    return words, (WORD_CLASS[words].mean(1) + torch.randn(n, 10, generator=g) * 0.3).argmax(1)


def train_bags(make_opt, seed: int, steps: int = 150) -> float:
    """Held-out loss of an EmbeddingBag classifier (its 32K-element embedding 8-bit)."""
    eval_x, eval_y = word_bags(1024, torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.EmbeddingBag(VOCAB, 32, mode="mean"),
        torch.nn.Linear(32, 128),
        torch.nn.GELU(),
        torch.nn.Linear(128, 10),
    )
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        x, y = word_bags(64, g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(eval_x), eval_y).item()


SEEDED_PARITY = {
    "Adam": (lambda p: torch.optim.Adam(p, lr=1e-3), lambda p: Adam8bit(p, lr=1e-3)),
    "AdamW": (lambda p: torch.optim.AdamW(p, lr=1e-3), lambda p: AdamW8bit(p, lr=1e-3)),
    "SGD": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), lambda p: SGD8bit(p, lr=0.05, momentum=0.9)),
    "Lion": (
        lambda p: Lion8bit(p, lr=1e-3, weight_decay=0.1, **FP32),
        lambda p: Lion8bit(p, lr=1e-3, weight_decay=0.1),
    ),
    "RMSprop": (lambda p: torch.optim.RMSprop(p, lr=3e-4), lambda p: RMSprop8bit(p, lr=3e-4)),
    "Adagrad, zero accumulator": (lambda p: torch.optim.Adagrad(p, lr=1e-2), lambda p: Adagrad8bit(p, lr=1e-2)),
    "LAMB": (lambda p: LAMB8bit(p, lr=5e-3, **FP32), lambda p: LAMB8bit(p, lr=5e-3)),
    "LARS": (lambda p: LARS8bit(p, lr=5.0, **FP32), lambda p: LARS8bit(p, lr=5.0)),
}


@pytest.mark.parametrize("name", list(SEEDED_PARITY))
def test_parity_over_seeds(name, one_thread):
    """The issue's criterion over three seeds (init and batch order): the 8-bit mean final
    loss within 1% of the 32-bit mean (or its seed-to-seed std where larger), the spread
    no wider than 32-bit's (10% allowance for a three-sample std)."""
    make_ref, make_q8 = SEEDED_PARITY[name]
    ref = torch.tensor([train_bags(make_ref, seed) for seed in range(3)])
    ours = torch.tensor([train_bags(make_q8, seed) for seed in range(3)])
    assert ref.mean() < 2.0  # learned (uniform over 10 classes is 2.30)
    assert abs(ours.mean() - ref.mean()) <= max(0.01 * ref.mean(), ref.std()), (ours.tolist(), ref.tolist())
    assert ours.std() <= 1.1 * ref.std(), (ours.tolist(), ref.tolist())


# --- the fused CPU path against the reference rule ----------------------------------------


@pytest.mark.parametrize("simd", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize("name", list(optim_vectors.OPTIMIZERS))
def test_fused_cpu_kernels_match_the_reference(name, simd, monkeypatch):
    """The shared vectors (tests/optim_vectors.py): the C kernels of every rule, in one call
    over all the parameters, give the generic path's bytes, in both builds."""
    from q8.optim import _native

    reference = optim_vectors.run(name, generic=True)
    before = _native.set_simd(simd)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(q8.optim.fused, "generic_update", None)  # the kernels, nothing else
            fused = optim_vectors.run(name)
    finally:
        _native.set_simd(before)
    optim_vectors.assert_same(fused, reference)


def test_fused_cpu_kernels_on_large_parameters_use_threads():
    """The blocks of one large parameter split over threads: the generic path's bytes."""
    runs = []
    for rule in ("adam", None):
        p = torch.nn.Parameter(torch.randn(1024, 600, generator=torch.Generator().manual_seed(1)))
        opt = AdamW8bit([p], lr=1e-3)
        opt.rule = rule
        for step in range(2):
            p.grad = torch.randn(1024, 600, generator=torch.Generator().manual_seed(step)) * 1e-3
            opt.step()
        runs.append((opt, [p]))
    optim_vectors.assert_same(*runs)


# --- the rule: bounded updates, no stale state (docs/OPTIMIZER_STATE.md) -------------------------


def adversarial_gradients(n: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Gradients whose magnitudes span twelve decades inside every block, with elements that
    go silent (exact zeros) after a few steps: a second moment 1e-8 or less of its block's
    largest, beside a first moment that is not yet small."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(n, generator=g) * 6).clamp(1e-12, 1e3)
    out = []
    for step in range(steps):
        x = torch.randn(n, generator=g) * scale
        if step >= 2:
            x[torch.rand(n, generator=g) < 0.5] = 0.0
        out.append(x)
    return out


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit])
def test_adam_steps_stay_within_the_exact_bound(cls, path, monkeypatch):
    """No element moves by more than K_t * bc2 / bc1 learning rates in one step (at most
    ~7.3 for betas (0.9, 0.999)), the bound exact Adam satisfies, on adversarial state;
    before the fix, elements whose v rounded to 0 moved by thousands of lr."""
    if path == "generic":
        monkeypatch.setattr(cls, "rule", None)
    lr = 1e-3
    p = torch.nn.Parameter(torch.zeros(64, 128))
    opt = cls([p], lr=lr, weight_decay=0.0)
    worst = 0.0
    for step, grad in enumerate(adversarial_gradients(8192, 12), start=1):
        before = p.detach().clone()
        p.grad = grad.view(64, 128)
        opt.step()
        bound = q8.optim.fused.moment_bound((0.9, 0.999), step) * math.sqrt(1 - 0.999**step) / (1 - 0.9**step)
        worst = max(worst, ((p - before).abs().max() / lr / bound).item())
    assert isinstance(opt.state[p]["exp_avg_sq"], q8.QTensor)
    assert worst <= 1.0001


def test_torch_adam_never_exceeds_the_bound():
    """The bound is a property of exact Adam (it never binds there)."""
    lr, p = 1e-3, torch.nn.Parameter(torch.zeros(8192))
    opt = torch.optim.Adam([p], lr=lr)
    for step, grad in enumerate(adversarial_gradients(8192, 12), start=1):
        before = p.detach().clone()
        p.grad = grad
        opt.step()
        bound = q8.optim.fused.moment_bound((0.9, 0.999), step) * math.sqrt(1 - 0.999**step) / (1 - 0.9**step)
        assert (p - before).abs().max() / lr <= bound / 1.001 * (1 + 1e-5)


def test_adagrad_sum_keeps_growing():
    """Staleness: an increment below half a quantization step used to round back, so the
    8-bit sum of a constant gradient stopped growing; stochastic rounding keeps it on
    t * g^2 on average."""
    g = torch.exp(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 2)
    p = torch.nn.Parameter(torch.zeros(64, 128))
    opt = Adagrad8bit([p], lr=1e-3)
    for _ in range(300):
        p.grad = g
        opt.step()
    ratio = opt.state[p]["sum"].dequantize() / (300 * g * g)
    assert abs(ratio.mean().item() - 1) < 0.01 and abs(ratio.median().item() - 1) < 0.02


def test_second_moment_decays_when_its_gradient_stops():
    """Staleness of an EMA: v * beta2 moves v by 0.1% a step, under half a step of the table,
    so nearest rounding froze the v of elements whose gradient stopped while their block's
    absmax held up. After 500 silent steps v must be 0.999**500 (0.61) of what it was."""
    n = 8192
    g = torch.ones(n).view(64, 128)
    p = torch.nn.Parameter(torch.zeros(64, 128))
    opt = AdamW8bit([p], lr=1e-6, weight_decay=0.0)
    for _ in range(20):
        p.grad = g
        opt.step()
    v0 = opt.state[p]["exp_avg_sq"].dequantize().clone()
    silent = (torch.arange(n) % 2 == 1).view(64, 128)
    for _ in range(500):
        p.grad = torch.where(silent, 0.0, g)
        opt.step()
    ratio = opt.state[p]["exp_avg_sq"].dequantize()[silent] / v0[silent]
    assert abs(ratio.mean().item() / 0.999**500 - 1) < 0.02


def test_older_second_moments_load_and_are_re_encoded_at_the_next_step():
    """A second moment saved in the unsigned dynamic table (q8 before the squared table, or
    bitsandbytes) loads as it is, decodes to the same values, and the next step re-encodes
    it in the optimizer's table with the same bytes on the fused and the generic path."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(32, 256, generator=g) * torch.exp(torch.randn(32, 256, generator=g)) for _ in range(3)]
    p = torch.nn.Parameter(torch.randn(32, 256, generator=g))
    opt = AdamW8bit([p])
    for grad in grads[:2]:
        p.grad = grad
        opt.step()
    sd = opt.state_dict()
    old = q8.quantize(opt.state[p]["exp_avg_sq"].dequantize(), "udynamic", 256)
    sd["state"][0] |= {"exp_avg_sq": old.codes.view(32, 256), "exp_avg_sq.absmax": old.absmax.view(32, 1)}
    sd["state"][0] |= {"exp_avg_sq.code": "udynamic"}
    sd["state"][0].pop("seed")  # older states have none: the parameter's index
    runs = []
    for rule in ("adam", None):
        p2 = torch.nn.Parameter(p.detach().clone())
        opt2 = AdamW8bit([p2])
        opt2.rule = rule
        opt2.load_state_dict(copy.deepcopy(sd))  # loading shares the tensors, steps update them
        loaded = opt2.state[p2]["exp_avg_sq"]
        assert loaded.code.name == "udynamic" and torch.equal(loaded.dequantize(), old.dequantize())
        assert opt2.state[p2]["seed"] == 0
        p2.grad = grads[2]
        opt2.step()
        runs.append((p2.detach(), opt2.state[p2]["exp_avg_sq"]))
    (w1, v1), (w2, v2) = runs
    assert v1.code.name == v2.code.name == "udynamic_sq"
    assert torch.equal(w1, w2) and torch.equal(v1.codes, v2.codes) and torch.equal(v1.absmax, v2.absmax)


def test_first_moment_keeps_its_sign():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(8192))
    opt = AdamW8bit([p], betas=(0.0, 0.999))  # beta1 = 0: the first moment is exactly the gradient
    g = torch.randn(8192) * torch.logspace(-8, 0, 8192)
    p.grad = g
    opt.step()
    m = opt.state[p]["exp_avg"].dequantize()
    assert ((m == 0) | (torch.sign(m) == torch.sign(g))).all()
    assert (torch.sign(m) == torch.sign(g)).float().mean() > 0.9


# --- state dicts ---------------------------------------------------------------------------


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))


def train_steps(model, opt, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for key, value in sa["state"][i].items():
            other = sb["state"][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (i, key)


ALL = [
    (AdamW8bit, {}),
    (Adam8bit, {"weight_decay": 0.01}),
    (SGD8bit, {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    (Lion8bit, {}),
    (RMSprop8bit, {"momentum": 0.5, "centered": True}),
    (Adagrad8bit, {"initial_accumulator_value": 0.1}),
    (LAMB8bit, {"weight_decay": 0.01}),
    (LARS8bit, {"lr": 1.0, "weight_decay": 1e-4}),
]


@pytest.mark.parametrize("cls,kwargs", ALL, ids=[c.__name__ for c, _ in ALL])
def test_state_dict_round_trip_resumes_bit_exactly(cls, kwargs):
    model = mlp()
    opt = cls(model.parameters(), **kwargs)
    train_steps(model, opt, 3, seed=0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    sd = saved["opt"]["state"][0]
    if "momentum_buffer" in sd or "exp_avg" in sd or "sum" in sd or "square_avg" in sd:
        key = next(k for k in sd if k.endswith(".code"))
        assert (
            sd[key.removesuffix(".code")].dtype == torch.uint8 and sd[f"{key.removesuffix('.code')}.blocksize"] == 256
        )

    model2 = mlp(seed=1)
    model2.load_state_dict(saved["model"])
    opt2 = cls(model2.parameters(), **kwargs)
    opt2.load_state_dict(saved["opt"])
    assert_same_state(opt, opt2)
    train_steps(model, opt, 3, seed=1)
    train_steps(model2, opt2, 3, seed=1)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_same_state(opt, opt2)


def test_load_state_dict_never_casts_codes():
    model = mlp()
    opt = AdamW8bit(model.parameters())
    train_steps(model, opt, 2, seed=0)
    opt2 = AdamW8bit(mlp().parameters())
    opt2.load_state_dict(opt.state_dict())
    qt = opt2.state[next(iter(opt2.param_groups[0]["params"]))]["exp_avg"]
    assert isinstance(qt, q8.QTensor) and qt.codes.dtype == torch.uint8 and qt.absmax.dtype == torch.float32


def test_load_state_dict_validation_errors():
    model = mlp()
    opt = AdamW8bit(model.parameters())
    train_steps(model, opt, 1, seed=0)
    good = opt.state_dict()

    def broken(edit):
        sd = {
            "state": {i: dict(s) for i, s in good["state"].items()},
            "param_groups": [dict(g) for g in good["param_groups"]],
        }
        edit(sd)
        return sd

    cases = [
        (lambda sd: sd["state"][0].update({"exp_avg": sd["state"][0]["exp_avg"][:-1]}), "codes must be uint8 shaped"),
        (lambda sd: sd["state"][0].update({"exp_avg": sd["state"][0]["exp_avg"].float()}), "codes must be uint8"),
        (lambda sd: sd["state"][0].update({"exp_avg": sd["state"][0]["exp_avg"].view(64, 128)}), "got (64, 128)"),
        (lambda sd: sd["state"][0].update({"exp_avg.absmax": torch.zeros(128, 2)}), "absmax must have shape (128, 1)"),
        (lambda sd: sd["state"][0].update({"exp_avg.absmax": torch.zeros(127)}), "127 absmax values"),
        (lambda sd: sd["state"][0].update({"exp_avg.blocksize": 100}), "blocksize must be one of"),
        (lambda sd: sd["state"][0].update({"exp_avg.code": "udynamic"}), "this optimizer uses 'dynamic'"),
        (lambda sd: sd["state"][0].update({"exp_avg.code": "mystery"}), "unknown code"),
        (lambda sd: sd["state"][0].update({"exp_avg.absmax": sd["state"][0]["exp_avg.absmax"].bfloat16()}), "float32"),
        (lambda sd: sd["state"][0].pop("exp_avg_sq"), "missing state entry 'exp_avg_sq'"),
        (lambda sd: sd["state"][1].update({"exp_avg": torch.zeros(3)}), "shape (3,)"),
        (lambda sd: sd["param_groups"].insert(0, dict(sd["param_groups"][0])), "2 parameter groups saved"),
        (lambda sd: sd["param_groups"][0].update({"params": [0, 1]}), "2 parameters saved"),
        (lambda sd: sd["state"].update({99: {}}), "unknown parameter index 99"),
    ]
    before = opt.state_dict()
    for edit, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            opt.load_state_dict(broken(edit))
    assert_same_state(opt, opt)  # still usable and unchanged
    after = opt.state_dict()
    assert torch.equal(before["state"][0]["exp_avg"], after["state"][0]["exp_avg"])


def test_torch_adam_state_converts_to_8bit_and_back():
    model = mlp()
    ref = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, ref, 3, seed=0)
    opt = AdamW8bit(model.parameters())
    opt.load_state_dict(ref.state_dict())
    w = model[0].weight
    for key, code in (("exp_avg", "dynamic"), ("exp_avg_sq", "udynamic_sq")):
        qt = opt.state[w][key]
        expected = q8.quantize(ref.state[w][key], code, 256, row_length=w.shape[1])  # rows of 64: a block each
        assert qt.absmax.numel() == w.shape[0]
        assert torch.equal(qt.codes, expected.codes) and torch.equal(qt.absmax, expected.absmax)
    assert opt.state[w]["step"] == 3
    assert torch.equal(opt.state[model[0].bias]["exp_avg"], ref.state[model[0].bias]["exp_avg"])  # small: fp32

    back = torch.optim.AdamW(model.parameters(), lr=1e-3)
    back.load_state_dict(opt.to_torch_state_dict())
    assert torch.equal(back.state[w]["exp_avg"], opt.state[w]["exp_avg"].dequantize())
    assert float(back.state[w]["step"]) == 3.0
    train_steps(model, back, 1, seed=1)  # torch's optimizer runs on it


def test_bitsandbytes_state_loads_losslessly():
    """bitsandbytes' flat blocks are q8's row blocks where rows are whole blocks (rows of 512:
    codes and absmax as they are); where rows cut them (rows of 100) they are decoded and
    re-encoded in rows, one more rounding; its 8-bit state of a 1-D parameter is decoded."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 100), torch.nn.Linear(100, 60), torch.nn.Linear(60, 5000))
    ref = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    train_steps_in(model, ref, 512)
    opt = AdamW8bit(model.parameters())
    opt.load_state_dict(ref.state_dict())
    whole, cut, vector = model[0].weight, model[1].weight, model[2].bias
    for i, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
        bnb_table = q8.codec.get_code("dynamic" if i == 1 else "udynamic")  # kept until the next step
        qt, bnb_state = opt.state[whole][key], ref.state[whole]
        assert qt.blocksize == 256 and qt.code == bnb_table
        assert torch.equal(qt.codes, bnb_state[f"state{i}"].reshape(-1))
        assert torch.equal(qt.absmax, bnb_state[f"absmax{i}"])
        qt, bnb_state = opt.state[cut][key], ref.state[cut]
        codes, absmax = bnb_state[f"state{i}"].reshape(-1), bnb_state[f"absmax{i}"]
        flat = q8.QTensor(codes, absmax, bnb_table, 256, cut.shape, qt.dtype)
        again = q8.quantize(flat.dequantize(), qt.code, 256, row_length=100)  # in the optimizer's table
        assert qt.row_length == 100 and torch.equal(qt.codes, again.codes) and torch.equal(qt.absmax, again.absmax)
        b8 = ref.state[vector]
        assert b8[f"state{i}"].dtype == torch.uint8  # bitsandbytes keeps this 5000-element bias in 8 bits
        decoded = q8.QTensor(b8[f"state{i}"], b8[f"absmax{i}"], bnb_table, 256, vector.shape, torch.float32)
        assert torch.equal(opt.state[vector][key], decoded.dequantize())
    assert opt.state[whole]["step"] == ref.state[whole]["step"] == 2
    assert torch.equal(opt.state[model[0].bias]["exp_avg"], ref.state[model[0].bias]["state1"])
    train_steps_in(model, opt, 512)


def train_steps_in(model, opt, dim):
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss = model(torch.randn(16, dim, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


# --- behaviour -------------------------------------------------------------------------------


def test_non_finite_gradient_skips_that_parameter():
    model = mlp()
    opt = AdamW8bit(model.parameters())
    train_steps(model, opt, 2, seed=0)
    w, b = model[0].weight, model[0].bias
    w_before, b_before = w.detach().clone(), b.detach().clone()
    codes_before = opt.state[w]["exp_avg"].codes.clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    w.grad[3, 5] = math.nan
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert torch.equal(w, w_before) and torch.equal(opt.state[w]["exp_avg"].codes, codes_before)
    assert opt.state[w]["step"] == 2 and opt.state[b]["step"] == 3
    assert not torch.equal(b, b_before)
    w.grad.fill_(math.inf)
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_params(dtype):
    model = mlp().to(dtype)
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    x = torch.randn(32, 64).to(dtype)
    first = None
    for _ in range(10):
        loss = model(x).float().pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert all(p.dtype == dtype for p in model.parameters())
    qt = opt.state[model[0].weight]["exp_avg"]
    assert isinstance(qt, q8.QTensor) and qt.absmax.dtype == torch.float32
    assert opt.state[model[0].bias]["exp_avg"].dtype == torch.float32


def test_which_state_is_8bit():
    model = mlp()
    override = torch.nn.Linear(64, 128)
    override_32bit(override.weight)
    opt = AdamW8bit(
        [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "optim_bits": 32},
            {"params": override.parameters()},
        ],
        min_8bit_size=4096,
    )
    for p in [*model.parameters(), *override.parameters()]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert isinstance(opt.state[model[0].weight]["exp_avg"], q8.QTensor)  # 8192 elements
    assert not isinstance(opt.state[model[0].bias]["exp_avg"], q8.QTensor)  # 128 < min_8bit_size
    assert not isinstance(opt.state[model[2].weight]["exp_avg"], q8.QTensor)  # optim_bits=32 group
    assert not isinstance(opt.state[override.weight]["exp_avg"], q8.QTensor)  # override_32bit
    n8 = model[0].weight.numel()
    fp32 = sum(p.numel() for p in [model[0].bias, *model[2].parameters(), *override.parameters()])
    assert opt.state_nbytes() == 2 * (n8 + 4 * 128) + 2 * 4 * fp32  # rows of 64: one block (absmax) each
    with pytest.raises(ValueError, match="optim_bits must be 8 or 32"):
        p = torch.nn.Parameter(torch.ones(5000))
        p.grad = torch.ones(5000)
        AdamW8bit([{"params": [p], "optim_bits": 16}]).step()


def test_bad_hyperparameters_are_named():
    params = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="lr"):
        AdamW8bit(params, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        Adam8bit(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="blocksize"):
        AdamW8bit(params, blocksize=100)
    with pytest.raises(ValueError, match="nesterov"):
        SGD8bit(params, nesterov=True)
    with pytest.raises(ValueError, match="min_8bit_size"):
        Lion8bit(params, min_8bit_size=-1)


def test_defaults_match_torch():
    p = [torch.nn.Parameter(torch.ones(3))]
    pairs = [
        (Adam8bit, torch.optim.Adam),
        (AdamW8bit, torch.optim.AdamW),
        (SGD8bit, torch.optim.SGD),
        (RMSprop8bit, torch.optim.RMSprop),
        (Adagrad8bit, torch.optim.Adagrad),
    ]
    for ours, theirs in pairs:
        mine, ref = ours(p).defaults, theirs(p).defaults
        shared = {k: v for k, v in mine.items() if k in ref}
        assert shared == {k: ref[k] for k in shared} and len(shared) == len(mine) - 1, ours.__name__
    assert AdamW8bit(p).defaults["weight_decay"] == 1e-2


def test_grads_none_param_groups_scheduler_and_compiled_model():
    model = mlp()
    compiled = torch.compile(model, backend="aot_eager")
    opt = AdamW8bit(model[0].parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(8, 64)
    for _ in range(2):
        loss = compiled(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    opt.add_param_group({"params": model[2].parameters(), "lr": 1e-3})
    model[2].bias.grad = None
    model[2].weight.grad = torch.ones_like(model[2].weight)
    opt.step()
    assert opt.state[model[2].weight]["step"] == 1 and model[2].bias not in opt.state
    restored = AdamW8bit([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    restored.load_state_dict(opt.state_dict())
    assert restored.param_groups[1]["lr"] == 1e-3 and restored.param_groups[0]["initial_lr"] == 1e-2


def test_lamb_and_lars_trust_ratio_scales_the_step():
    for cls, kwargs in ((LAMB8bit, {"lr": 0.1}), (LARS8bit, {"lr": 0.1, "momentum": 0.0})):
        steps = []
        for scale in (1.0, 10.0):  # 10x larger weights: a 10x larger step
            p = torch.nn.Parameter(torch.ones(5000) * scale)
            opt = cls([p], **kwargs)
            p.grad = torch.linspace(-1, 1, 5000)
            opt.step()
            steps.append((p.detach() - scale).norm().item())
        assert steps[1] == pytest.approx(10 * steps[0], rel=1e-4), cls.__name__


def test_stable_embedding():
    torch.manual_seed(0)
    emb = StableEmbedding(1000, 64, padding_idx=0)
    bound = math.sqrt(6 / (1000 + 64))
    assert emb.weight.abs().max() <= bound and emb.weight.abs().max() > 0.9 * bound
    assert torch.equal(emb.weight[0], torch.zeros(64))
    out = emb(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 64)
    assert torch.allclose(out.mean(-1), torch.zeros(1, 3), atol=1e-5)
    opt = AdamW8bit(emb.parameters())
    out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert emb.weight.numel() >= 4096 and not isinstance(opt.state[emb.weight]["exp_avg"], q8.QTensor)


def test_a_new_optimizer_needs_only_its_rule():
    """The README's extension point: a subclass of Optimizer8bit names its state and writes
    the fp32 rule; storage in 8 bits, state dicts and files come from the base class."""

    class HeavyBall8bit(q8.optim.Optimizer8bit):
        def __init__(self, params, lr=0.1, momentum=0.9):
            super().__init__(params, {"lr": lr, "momentum": momentum})

        def state_codes(self, group):
            return {"velocity": "dynamic"}

        def update(self, p, grad, state, group, step):
            state["velocity"].mul_(group["momentum"]).add_(grad)
            p.add_(state["velocity"], alpha=-group["lr"])

    torch.manual_seed(0)
    target = torch.randn(100, 64)
    w = torch.nn.Parameter(torch.zeros(100, 64))
    opt = HeavyBall8bit([w], lr=0.05)
    for _ in range(50):
        loss = 0.5 * (w - target).pow(2).sum()  # gradient w - target
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (w - target).pow(2).mean() < 0.01 * target.pow(2).mean()
    velocity = opt.state[w]["velocity"]
    assert isinstance(velocity, q8.QTensor) and velocity.code.name == "dynamic"
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    again = HeavyBall8bit([torch.nn.Parameter(w.detach().clone())], lr=0.05)
    again.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert torch.equal(again.state[again.param_groups[0]["params"][0]]["velocity"].codes, velocity.codes)


# -- the seams with torch.optim and bitsandbytes ------------------------------------------


def test_constructor_arguments_of_bitsandbytes_and_torch():
    model = mlp()
    opt = AdamW8bit(model.parameters(), optim_bits=32)  # bitsandbytes' way to ask for 32-bit state
    train_steps(model, opt, 1, seed=0)
    assert not any(isinstance(v, q8.QTensor) for s in opt.state.values() for v in s.values())
    assert isinstance(AdamW8bit(model.parameters(), optim_bits=8, is_paged=False, amsgrad=False), AdamW8bit)
    for kwargs, message in [
        ({"is_paged": True}, "CPUOffloadPolicy"),
        ({"amsgrad": True}, "torch.optim.Adam/AdamW(amsgrad=True)"),
        ({"percentile_clipping": 5}, "clip_grad_norm_"),
        ({"block_wise": False}, "always blockwise"),
        ({"fused": True}, "chooses its kernels"),
        ({"nonsense": 1}, "unexpected keyword argument 'nonsense'"),
    ]:
        with pytest.raises(TypeError, match=re.escape(message)):
            Lion8bit(model.parameters(), **kwargs)
    with pytest.raises(ValueError, match="optim_bits must be 8 or 32"):
        SGD8bit(model.parameters(), optim_bits=16)


@pytest.mark.parametrize("cls,kwargs", ALL[:4], ids=[c.__name__ for c, _ in ALL[:4]])
def test_maximize_is_minimizing_the_negated_objective(cls, kwargs):
    """Bit for bit: maximize=True on f takes exactly the steps of minimizing -f."""
    runs = []
    for maximize in (False, True):
        model = mlp()
        opt = cls(model.parameters(), maximize=maximize, **kwargs)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            loss = model(torch.randn(32, 64, generator=g)).pow(2).mean()
            opt.zero_grad()
            (loss if maximize else -loss).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    if cls.torch_class is not None:  # and as torch.optim does it, in fp32 state
        model, ref_model = mlp(), mlp()
        opt = cls(model.parameters(), maximize=True, **FP32, **kwargs)
        ref = cls.torch_class(ref_model.parameters(), maximize=True, **kwargs)
        train_steps(model, opt, 3, seed=1)
        train_steps(ref_model, ref, 3, seed=1)
        for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_8bit_state_dict_is_refused_by_torch_and_bitsandbytes_but_loads_in_q8():
    model = mlp()
    opt = AdamW8bit(model.parameters())
    train_steps(model, opt, 1, seed=0)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    sd = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # plain data: the Trainer's way to load
    assert sd["param_groups"][-1]["q8_optimizer"] == "AdamW8bit" and sd["param_groups"][-1]["params"] == []
    ref = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="different number of parameter groups"):
        ref.load_state_dict(sd)
    assert not ref.state  # nothing loaded
    bnb = pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="different number of parameter groups"):
        bnb.optim.AdamW8bit(model.parameters()).load_state_dict(sd)
    again = AdamW8bit(model.parameters())
    again.load_state_dict(sd)
    assert_same_state(opt, again)
    ref.load_state_dict(opt.to_torch_state_dict())  # the export torch does take


def test_another_optimizers_state_is_refused():
    model = mlp()
    adam = Adam8bit(model.parameters())
    train_steps(model, adam, 1, seed=0)
    torch_adam = torch.optim.Adam(model.parameters())
    train_steps(model, torch_adam, 1, seed=0)
    cases = [
        (Lion8bit, adam.state_dict(), "the state of a q8 Adam8bit, not of a Lion8bit"),
        (AdamW8bit, adam.state_dict(), "the state of a q8 Adam8bit, not of a AdamW8bit"),
        (Lion8bit, torch_adam.state_dict(), "'exp_avg_sq' is not an entry of Lion8bit's state (exp_avg)"),
        (SGD8bit, torch_adam.state_dict(), "is not an entry of SGD8bit's state (none)"),
    ]
    for cls, sd, message in cases:
        opt = cls(model.parameters())
        with pytest.raises(ValueError, match=re.escape(message)):
            opt.load_state_dict(sd)
        assert not opt.state


def test_step_inside_a_compiled_training_step():
    """opt.step() inside a torch.compile'd function runs eagerly (a graph break): the same
    bits as the uncompiled loop."""
    runs = []
    for compiled in (False, True):
        model = mlp()
        opt = AdamW8bit(model.parameters(), lr=1e-2)

        def train_step(x, model=model, opt=opt):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        step = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        g = torch.Generator().manual_seed(0)
        losses = [step(torch.randn(32, 64, generator=g)).item() for _ in range(3)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    # ... and importing q8 does not import torch._dynamo (150 MB: q8convert's memory bound)
    code = "import sys, q8; assert 'torch._dynamo' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONSAFEPATH": "1"}, timeout=120)


@pytest.mark.parametrize(
    ("value", "code"), [(0.0, "dynamic"), (-2.5, "dynamic"), (0.0, "udynamic_sq"), (0.1, "udynamic_sq")]
)
def test_new_state_is_the_quantized_filled_tensor(value, code):
    """The state a first step creates without encoding (`filled`, no device work) is what
    quantizing the filled fp32 tensor gives, in the row layout too."""
    from q8.optim.optimizer import filled

    for shape, row_length in (((7, 300), 300), ((5, 256), 1280), ((0, 3), 3)):
        want = q8.quantize(torch.full(shape, value), code, 256, row_length=row_length)
        got = filled(value, code, 256, torch.Size(shape), row_length, "cpu")
        assert (got.shape, got.row_length, got.code) == (want.shape, want.row_length, want.code)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.absmax, want.absmax)


@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd-nesterov"])
def test_an_empty_parameter_steps(name):
    """A parameter with no elements (what an FSDP2 rank holds of a parameter with fewer rows
    than ranks) takes its step with the others: nothing to update, the step counted."""
    cls, kwargs = optim_vectors.OPTIMIZERS[name]
    empty, p = torch.nn.Parameter(torch.zeros(0, 300)), torch.nn.Parameter(torch.ones(4, 300))
    opt = cls([empty, p], **kwargs, **optim_vectors.OPTIONS)
    for _ in range(2):
        empty.grad, p.grad = torch.zeros(0, 300), torch.ones(4, 300)
        opt.step()
    assert opt.state[empty]["step"] == opt.state[p]["step"] == 2
    assert isinstance(opt.state[empty][opt.slots(opt.param_groups[0])[0]], q8.QTensor)
