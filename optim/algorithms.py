"""The q8 optimizers: each declares its state entries and writes its update rule once, in
fp32 torch ops. How the state is stored (8-bit or fp32) is the base class's business, and so
are the keyword arguments every optimizer takes (`blocksize`, `min_8bit_size`, `optim_bits`,
`maximize`: `Optimizer8bit`).

Hyperparameters and defaults follow the torch.optim counterpart (Adam, AdamW, SGD,
RMSprop, Adagrad) or the paper (Lion: Chen et al. 2023; LAMB: You et al. 2019; LARS: You
et al. 2017).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .fused import adam_hyper, moment_bound, sqrt_rn
from .optimizer import Optimizer8bit

__all__ = [
    "Adagrad8bit",
    "Adam8bit",
    "AdamW8bit",
    "LAMB8bit",
    "LARS8bit",
    "Lion8bit",
    "RMSprop8bit",
    "SGD8bit",
]

SIGNED, NON_NEGATIVE = "dynamic", "udynamic_sq"
"""Codes of 8-bit state: signed entries round to the nearest "dynamic" entry; non-negative
ones (second moments, Adagrad's sum) take the squared table with stochastic rounding
(optim/fused.py; docs/OPTIMIZER_STATE.md)."""


def _check(cls: str, **values: tuple[float, bool]) -> None:
    for name, (value, ok) in values.items():
        if not ok:
            raise ValueError(f"{cls}: invalid {name} {value!r}")


def _check_betas(cls: str, betas: tuple[float, float]) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{cls}: betas must be two values in [0, 1), got {betas!r}")


def _adam_defaults(cls: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> dict:
    """Validated hyperparameters of the Adam family (Adam, AdamW, LAMB)."""
    _check(cls, lr=(lr, lr >= 0), eps=(eps, eps >= 0), weight_decay=(weight_decay, weight_decay >= 0))
    _check_betas(cls, betas)
    return {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}


def _sgd_defaults(cls: str, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool) -> dict:
    """Validated hyperparameters of SGD with momentum (SGD, LARS)."""
    _check(cls, lr=(lr, lr >= 0), momentum=(momentum, momentum >= 0), weight_decay=(weight_decay, weight_decay >= 0))
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{cls}: nesterov momentum requires a momentum and zero dampening")
    return {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay, "nesterov": nesterov}


def clamp_moment(m: torch.Tensor, sqrt_v: torch.Tensor, bound: float) -> torch.Tensor:
    """m with |m| capped at bound * sqrt(v) (`moment_bound`: exact Adam never exceeds it),
    as optim/_native.c writes it: an element within the bound keeps its own bits."""
    b = sqrt_v * bound
    return torch.where(m.abs() > b, torch.where(m < 0, -b, b), m)


def _with_weight_decay(p: torch.Tensor, grad: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """grad + weight_decay * p (L2 regularisation, as torch.optim does it)."""
    return grad if weight_decay == 0 else grad + p * weight_decay


class Adam8bit(Optimizer8bit):
    """Adam with 8-bit moments (L2 weight decay added to the gradient, as torch.optim.Adam).

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as torch.optim.Adam (1e-3, (0.9, 0.999), 1e-8, 0).
        options: `blocksize` (256), `min_8bit_size` (4096), `optim_bits` (8), `maximize`
            (False), as every q8 optimizer (`Optimizer8bit`).

    Example:
        >>> opt = q8.optim.Adam8bit(model.parameters(), lr=1e-3)
    """

    native_kind = "adam"
    torch_class = torch.optim.Adam
    decoupled = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **options: Any,
    ):
        defaults = _adam_defaults(type(self).__name__, lr, betas, eps, weight_decay)
        super().__init__(params, defaults, **options)

    def state_codes(self, group: dict) -> dict[str, str]:
        return {"exp_avg": SIGNED, "exp_avg_sq": NON_NEGATIVE}

    def update(self, p, grad, state, group, step):
        # The exact operation order of optim/_native.c (the fused path must match it bit for bit).
        beta1, c1, beta2, c2, eps, step_size, bc2_sqrt, decay, l2, bound = adam_hyper(group, step, self.decoupled)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        g = grad if l2 == 0 else grad + p * l2
        m.mul_(beta1).add_(g * c1)
        v.mul_(beta2).add_(g * g * c2)
        s = sqrt_rn(v)
        if decay != 1:
            p.mul_(decay)
        p.sub_(clamp_moment(m, s, bound) / (s / bc2_sqrt + eps) * step_size)


class AdamW8bit(Adam8bit):
    """AdamW (decoupled weight decay, default 1e-2, as torch.optim.AdamW) with 8-bit moments.

    Example:
        >>> opt = q8.optim.AdamW8bit(model.parameters(), lr=1e-3, weight_decay=1e-2)
    """

    native_kind = "adamw"
    torch_class = torch.optim.AdamW
    decoupled = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        **options: Any,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, **options)


def _momentum_step(p, d, state, group, step):
    """SGD-style momentum shared by SGD8bit and LARS8bit, then p -= lr * direction."""
    momentum = group["momentum"]
    if momentum != 0:
        buf = state["momentum_buffer"]
        if step == 1:
            buf.copy_(d)
        else:
            buf.mul_(momentum).add_(d * (1 - group["dampening"]))
        d = d + buf * momentum if group["nesterov"] else buf
    p.sub_(d * group["lr"])


class SGD8bit(Optimizer8bit):
    """SGD with an 8-bit momentum buffer; hyperparameters as torch.optim.SGD (lr 1e-3,
    momentum 0, dampening 0, weight_decay 0, nesterov False). Without momentum there is
    no state."""

    torch_class = torch.optim.SGD

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        **options: Any,
    ):
        defaults = _sgd_defaults(type(self).__name__, lr, momentum, dampening, weight_decay, nesterov)
        super().__init__(params, defaults, **options)

    def state_codes(self, group: dict) -> dict[str, str]:
        return {"momentum_buffer": SIGNED} if group["momentum"] != 0 else {}

    def update(self, p, grad, state, group, step):
        _momentum_step(p, _with_weight_decay(p, grad, group["weight_decay"]), state, group, step)


class Lion8bit(Optimizer8bit):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with an
    8-bit momentum: p -= lr * (sign(beta1 m + (1 - beta1) g) + weight_decay p), then
    m = beta2 m + (1 - beta2) g. Defaults lr 1e-4, betas (0.9, 0.99), weight_decay 0."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        **options: Any,
    ):
        cls = type(self).__name__
        _check(cls, lr=(lr, lr >= 0), weight_decay=(weight_decay, weight_decay >= 0))
        _check_betas(cls, betas)
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        super().__init__(params, defaults, **options)

    def state_codes(self, group: dict) -> dict[str, str]:
        return {"exp_avg": SIGNED}

    def update(self, p, grad, state, group, step):
        beta1, beta2 = group["betas"]
        m = state["exp_avg"]
        direction = (m * beta1 + grad * (1 - beta1)).sign_()
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(direction * group["lr"])
        m.mul_(beta2).add_(grad * (1 - beta2))


class RMSprop8bit(Optimizer8bit):
    """RMSprop with 8-bit state; hyperparameters as torch.optim.RMSprop (lr 1e-2, alpha
    0.99, eps 1e-8, weight_decay 0, momentum 0, centered False). Centered: the variance
    estimate square_avg - grad_avg**2 is clamped at 0 (quantization may push it below)."""

    torch_class = torch.optim.RMSprop

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        **options: Any,
    ):
        cls = type(self).__name__
        _check(
            cls,
            lr=(lr, lr >= 0),
            alpha=(alpha, 0 <= alpha < 1),
            eps=(eps, eps >= 0),
            weight_decay=(weight_decay, weight_decay >= 0),
            momentum=(momentum, momentum >= 0),
        )
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "centered": centered,
        }
        super().__init__(params, defaults, **options)

    def state_codes(self, group: dict) -> dict[str, str]:
        codes = {"square_avg": NON_NEGATIVE}
        if group["momentum"] > 0:
            codes["momentum_buffer"] = SIGNED
        if group["centered"]:
            codes["grad_avg"] = SIGNED
        return codes

    def update(self, p, grad, state, group, step):
        alpha = group["alpha"]
        g = _with_weight_decay(p, grad, group["weight_decay"])
        square_avg = state["square_avg"].mul_(alpha).add_(g * g * (1 - alpha))
        if group["centered"]:
            grad_avg = state["grad_avg"].mul_(alpha).add_(g * (1 - alpha))
            avg = (square_avg - grad_avg * grad_avg).clamp_(min=0).sqrt_().add_(group["eps"])
        else:
            avg = square_avg.sqrt().add_(group["eps"])
        if group["momentum"] > 0:
            buf = state["momentum_buffer"].mul_(group["momentum"]).add_(g / avg)
            p.sub_(buf * group["lr"])
        else:
            p.sub_(g / avg * group["lr"])


class Adagrad8bit(Optimizer8bit):
    """Adagrad with an 8-bit sum of squared gradients; hyperparameters as
    torch.optim.Adagrad (lr 1e-2, lr_decay 0, weight_decay 0, initial_accumulator_value 0,
    eps 1e-10)."""

    torch_class = torch.optim.Adagrad

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        **options: Any,
    ):
        cls = type(self).__name__
        _check(
            cls,
            lr=(lr, lr >= 0),
            lr_decay=(lr_decay, lr_decay >= 0),
            weight_decay=(weight_decay, weight_decay >= 0),
            initial_accumulator_value=(initial_accumulator_value, initial_accumulator_value >= 0),
            eps=(eps, eps >= 0),
        )
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "eps": eps,
        }
        super().__init__(params, defaults, **options)

    def state_codes(self, group: dict) -> dict[str, str]:
        return {"sum": NON_NEGATIVE}

    def init_value(self, name: str, group: dict) -> float:
        return group["initial_accumulator_value"]

    def update(self, p, grad, state, group, step):
        g = _with_weight_decay(p, grad, group["weight_decay"])
        clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
        std = state["sum"].add_(g * g).sqrt().add_(group["eps"])
        p.sub_(g / std * clr)


def _trust_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator where both are positive, else 1 (as a 0-d tensor)."""
    ok = (numerator > 0) & (denominator > 0)
    return torch.where(ok, numerator / torch.where(ok, denominator, 1.0), 1.0)


class LAMB8bit(Optimizer8bit):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning") with 8-bit
    moments: the bias-corrected Adam direction r = m_hat / (sqrt(v_hat) + eps) + wd * p is
    scaled per parameter by the trust ratio ||p|| / ||r|| (1 if either norm is 0), with the
    exact norms of `Optimizer8bit.norms` (the same bits on any number of FSDP2 ranks).
    Defaults lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight_decay 0."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        **options: Any,
    ):
        defaults = _adam_defaults(type(self).__name__, lr, betas, eps, weight_decay)
        super().__init__(params, defaults, **options)

    state_codes = Adam8bit.state_codes  # the same two moments

    def update(self, p, grad, state, group, step):
        beta1, beta2 = group["betas"]
        m = state["exp_avg"].mul_(beta1).add_(grad * (1 - beta1))
        v = state["exp_avg_sq"].mul_(beta2).add_(grad * grad * (1 - beta2))
        m = clamp_moment(m, v.sqrt(), moment_bound((beta1, beta2), step))
        r = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt_().add_(group["eps"]))
        r = _with_weight_decay(p, r, group["weight_decay"])
        trust = _trust_ratio(*self.norms(p, r))
        p.sub_(r * (trust * group["lr"]))


class LARS8bit(Optimizer8bit):
    """LARS (You et al. 2017, "Large Batch Training of Convolutional Networks") with an
    8-bit momentum buffer: the gradient (plus wd * p) is scaled per parameter by the trust
    ratio trust_coefficient * ||p|| / (||g|| + wd * ||p|| + eps) (1 if ||p|| or ||g|| is 0;
    exact norms, `Optimizer8bit.norms`), then SGD momentum. Defaults lr 1e-3, momentum 0.9, dampening 0, weight_decay 0,
    nesterov False, trust_coefficient 1e-3, eps 1e-8."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
        **options: Any,
    ):
        cls = type(self).__name__
        _check(cls, trust_coefficient=(trust_coefficient, trust_coefficient > 0), eps=(eps, eps >= 0))
        defaults = _sgd_defaults(cls, lr, momentum, dampening, weight_decay, nesterov)
        defaults |= {"trust_coefficient": trust_coefficient, "eps": eps}
        super().__init__(params, defaults, **options)

    state_codes = SGD8bit.state_codes  # the same momentum buffer

    def update(self, p, grad, state, group, step):
        wd = group["weight_decay"]
        p_norm, g_norm = self.norms(p, grad)
        trust = torch.where(
            (p_norm > 0) & (g_norm > 0),
            group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"]),
            1.0,
        )
        _momentum_step(p, _with_weight_decay(p, grad, wd) * trust, state, group, step)
