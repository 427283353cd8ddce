"""Shared test vectors of the fused optimizer rules: every optimizer in the variants its rule
branches on, over parameters in the row layout (partial blocks), the flat layout, rows
shorter than a block and a vector (fp32 state), in fp32, bf16 and fp16, with gradients that
span many decades (the update bound binds), hold zero blocks, exact zeros and subnormals.
Each optimizer takes all the parameters together (one fused call) for STEPS steps from zero
state (the first step included); non-negative state takes stochastic rounding.

tests/test_optim.py checks the C kernels (AVX-512 and portable builds) against the generic
path (the torch reference), tests/test_kernels_optim.py the Triton kernels against the C
kernels: all bytes of parameters and state must match.
"""

import q8
import torch
from q8.optim import Adagrad8bit, Adam8bit, AdamW8bit, LAMB8bit, LARS8bit, Lion8bit, RMSprop8bit, SGD8bit

OPTIMIZERS = {
    "adamw": (AdamW8bit, {"lr": 1e-2, "weight_decay": 0.1}),
    "adam-l2-maximize": (Adam8bit, {"lr": 1e-2, "weight_decay": 0.1, "maximize": True}),
    "adam-beta1-0": (Adam8bit, {"lr": 1e-3, "betas": (0.0, 0.99)}),
    "sgd-nesterov": (SGD8bit, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    "sgd-dampening": (SGD8bit, {"lr": 0.05, "momentum": 0.5, "dampening": 0.3}),
    "sgd-no-momentum": (SGD8bit, {"lr": 0.05}),
    "lion": (Lion8bit, {"lr": 1e-3, "weight_decay": 0.1}),
    "rmsprop-centered-momentum": (RMSprop8bit, {"lr": 1e-3, "momentum": 0.5, "centered": True, "weight_decay": 0.01}),
    "rmsprop": (RMSprop8bit, {"lr": 1e-3}),
    "adagrad": (Adagrad8bit, {"lr": 1e-2, "lr_decay": 0.1, "initial_accumulator_value": 0.1, "weight_decay": 0.01}),
    "lamb": (LAMB8bit, {"lr": 1e-2, "weight_decay": 0.01}),
    "lars": (LARS8bit, {"lr": 1.0, "weight_decay": 1e-4, "nesterov": True}),
}
PARAMETERS = [  # shape, dtype
    ((5, 2 * 64 + 17), torch.float32),  # rows of two full blocks and a partial one
    ((3, 128), torch.bfloat16),  # rows of whole blocks: the flat layout
    ((7, 50), torch.float16),  # rows shorter than a block
    ((40,), torch.float32),  # a vector: fp32 state
]
OPTIONS = {"blocksize": 64, "min_8bit_size": 0}
STEPS = 3


def gradient(shape: tuple[int, ...], dtype: torch.dtype, step: int, seed: int) -> torch.Tensor:
    """Magnitudes over many decades (an outlier makes the update bound bind), a zero block,
    exact zeros and an fp32 subnormal; finite in fp16."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    n = torch.Size(shape).numel()
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)
    x[::29] = 0.0
    x[5::31] = 1e-39
    if step == 2:
        x[:64] = 0.0  # a block without gradient after the first step
    if step == 3:
        x[-1] = 3e4
    return x.clamp(-6e4, 6e4).view(shape).to(dtype)


def make(name: str, device: str = "cpu") -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    cls, kwargs = OPTIMIZERS[name]
    g = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype).to(device)) for s, dtype in PARAMETERS]
    return cls(params, **kwargs, **OPTIONS), params


def run(name: str, device: str = "cpu", generic: bool = False) -> tuple[torch.optim.Optimizer, list]:
    """STEPS steps of optimizer `name` on PARAMETERS (on `device`), all in one optimizer;
    `generic`: through the generic path (the reference) instead of the fused kernels."""
    opt, params = make(name, device)
    if generic:
        opt.rule = None
    for step in range(1, STEPS + 1):
        for i, p in enumerate(params):
            p.grad = gradient(p.shape, p.dtype, step, seed=i).to(device)
        opt.step()
    return opt, params


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8).cpu()


def assert_same(a: tuple, b: tuple) -> None:
    """Two runs end with identical parameters and state, byte for byte."""
    (opt_a, params_a), (opt_b, params_b) = a, b
    for i, (pa, pb) in enumerate(zip(params_a, params_b, strict=True)):
        assert torch.equal(bits(pa), bits(pb)), f"parameter {i} differs"
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys() and int(sa["step"]) == int(sb["step"]) > 0
        for key in sa.keys() - {"step", "seed"}:
            x, y = sa[key], sb[key]
            if isinstance(x, q8.QTensor):
                assert x.code == y.code, f"parameter {i}, {key}: tables differ"
                assert torch.equal(x.codes.cpu(), y.codes.cpu()), f"parameter {i}, {key}: codes differ"
                assert torch.equal(bits(x.absmax), bits(y.absmax)), f"parameter {i}, {key}: absmax differs"
            else:
                assert torch.equal(bits(x), bits(y)), f"parameter {i}, {key} (fp32) differs"
