"""The q8 optimizers: each declares its state entries, its per-step binary32 constants
(`hyper`) and its update rule, in fp32 torch ops (`update`: the reference). The same rule,
named `rule`, exists as a C inline function (optim/_native.c) and a Triton function
(q8.kernels.optim), with the same operations in the same order: the three give identical
bytes. How the state is stored (8-bit or fp32) is the base class's business, and so are the
keyword arguments every optimizer takes (`blocksize`, `min_8bit_size`, `optim_bits`,
`maximize`: `Optimizer8bit`).

Hyperparameters and defaults follow the torch.optim counterpart (Adam, AdamW, SGD,
RMSprop, Adagrad) or the paper (Lion: Chen et al. 2023; LAMB: You et al. 2019; LARS: You
et al. 2017).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .fused import adam_hyper, f32, moment_bound, powi, sqrt_rn
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

    rule = "adam"
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

    def hyper(self, group: dict, step: int) -> list[float]:
        return adam_hyper(group, step, self.decoupled)

    def update(self, p, grad, state, group, step):
        beta1, c1, beta2, c2, eps, step_size, bc2_sqrt, decay, l2, bound = self.hyper(group, step)
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


def _sgd_hyper(group: dict, step: int) -> list[float]:
    """SGD's and LARS's binary32 constants: wd, momentum, 1 - dampening, lr, first step,
    Nesterov (optim/_native.c, sgd_rule)."""
    values = [group["weight_decay"], group["momentum"], 1.0 - group["dampening"], group["lr"]]
    return [*map(f32, values), float(step == 1), float(group["nesterov"])]


def _momentum_step(p, d, state, h):
    """SGD-style momentum shared by SGD8bit and LARS8bit, then p -= lr * direction."""
    _, momentum, undamped, lr, first, nesterov = h
    if momentum != 0:
        buf = state["momentum_buffer"]
        if first:
            buf.copy_(d)
        else:
            buf.mul_(momentum).add_(d * undamped)
        d = d + buf * momentum if nesterov else buf
    p.sub_(d * lr)


class SGD8bit(Optimizer8bit):
    """SGD with an 8-bit momentum buffer; hyperparameters as torch.optim.SGD (lr 1e-3,
    momentum 0, dampening 0, weight_decay 0, nesterov False). Without momentum there is
    no state."""

    rule = "sgd"
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

    def hyper(self, group: dict, step: int) -> list[float]:
        return _sgd_hyper(group, step)

    def update(self, p, grad, state, group, step):
        h = self.hyper(group, step)
        _momentum_step(p, _with_weight_decay(p, grad, h[0]), state, h)


class Lion8bit(Optimizer8bit):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with an
    8-bit momentum: p -= lr * (sign(beta1 m + (1 - beta1) g) + weight_decay p), then
    m = beta2 m + (1 - beta2) g. Defaults lr 1e-4, betas (0.9, 0.99), weight_decay 0."""

    rule = "lion"

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

    def hyper(self, group: dict, step: int) -> list[float]:
        (beta1, beta2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
        return [f32(v) for v in (beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr, 1.0 - lr * wd if wd != 0 else 1.0)]

    def update(self, p, grad, state, group, step):
        beta1, c1, beta2, c2, lr, decay = self.hyper(group, step)
        m = state["exp_avg"]
        direction = (m * beta1 + grad * c1).sign_()
        if decay != 1:
            p.mul_(decay)
        p.sub_(direction * lr)
        m.mul_(beta2).add_(grad * c2)


class RMSprop8bit(Optimizer8bit):
    """RMSprop with 8-bit state; hyperparameters as torch.optim.RMSprop (lr 1e-2, alpha
    0.99, eps 1e-8, weight_decay 0, momentum 0, centered False). Centered: the variance
    estimate square_avg - grad_avg**2 is clamped at 0 (quantization may push it below)."""

    rule = "rmsprop"
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

    def slots(self, group: dict) -> tuple[str | None, ...]:
        momentum, centered = group["momentum"] > 0, group["centered"]
        return ("square_avg", "momentum_buffer" if momentum else None, "grad_avg" if centered else None)

    def hyper(self, group: dict, step: int) -> list[float]:
        alpha = group["alpha"]
        values = [alpha, 1.0 - alpha, group["eps"], group["weight_decay"], group["lr"], group["momentum"]]
        return [*map(f32, values), float(group["centered"])]

    def update(self, p, grad, state, group, step):
        alpha, c, eps, wd, lr, momentum, centered = self.hyper(group, step)
        g = _with_weight_decay(p, grad, wd)
        square_avg = state["square_avg"].mul_(alpha).add_(g * g * c)
        if centered:
            grad_avg = state["grad_avg"].mul_(alpha).add_(g * c)
            avg = sqrt_rn((square_avg - grad_avg * grad_avg).clamp_(min=0)).add_(eps)
        else:
            avg = sqrt_rn(square_avg).add_(eps)
        if momentum > 0:
            buf = state["momentum_buffer"].mul_(momentum).add_(g / avg)
            p.sub_(buf * lr)
        else:
            p.sub_(g / avg * lr)


class Adagrad8bit(Optimizer8bit):
    """Adagrad with an 8-bit sum of squared gradients; hyperparameters as
    torch.optim.Adagrad (lr 1e-2, lr_decay 0, weight_decay 0, initial_accumulator_value 0,
    eps 1e-10)."""

    rule = "adagrad"
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

    def hyper(self, group: dict, step: int) -> list[float]:
        clr = group["lr"] / (1.0 + (step - 1) * group["lr_decay"])
        return [f32(group["weight_decay"]), f32(clr), f32(group["eps"])]

    def update(self, p, grad, state, group, step):
        wd, clr, eps = self.hyper(group, step)
        g = _with_weight_decay(p, grad, wd)
        std = sqrt_rn(state["sum"].add_(g * g)).add_(eps)
        p.sub_(g / std * clr)


def _trust_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator where both are positive, else 1 (elementwise)."""
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

    rule = "lamb"
    state_codes = Adam8bit.state_codes  # the same two moments

    def hyper(self, group: dict, step: int) -> list[float]:
        (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
        bc1, bc2 = 1.0 - powi(beta1, step), 1.0 - powi(beta2, step)
        values = [beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, wd, bc1, bc2, moment_bound((beta1, beta2), step)]
        return [f32(v) for v in (*values, group["lr"])]

    def trust(self, norms: list[torch.Tensor], group: dict) -> torch.Tensor:
        """The trust ratio from the exact norms of p and of the direction r: ||p|| / ||r||,
        1 if either is 0. Elementwise: 0-d norms of one parameter, or 1-D ones of several."""
        return _trust_ratio(*norms)

    def update(self, p, grad, state, group, step):
        beta1, c1, beta2, c2, eps, wd, bc1, bc2, bound, lr = self.hyper(group, step)
        m = state["exp_avg"].mul_(beta1).add_(grad * c1)
        v = state["exp_avg_sq"].mul_(beta2).add_(grad * grad * c2)
        m = clamp_moment(m, sqrt_rn(v), bound)
        r = (m / bc1) / sqrt_rn(v / bc2).add_(eps)
        r = _with_weight_decay(p, r, wd)
        p.sub_(r * (self.trust(self.norms(p, r), group) * lr))


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

    rule = "lars"
    state_codes = SGD8bit.state_codes  # the same momentum buffer
    hyper = SGD8bit.hyper  # and the same rule, its direction scaled by the trust ratio

    def trust(self, norms: list[torch.Tensor], group: dict) -> torch.Tensor:
        """The trust ratio from the exact norms of p and of the gradient. Elementwise: 0-d
        norms of one parameter, or 1-D ones of several."""
        p_norm, g_norm = norms
        wd = group["weight_decay"]
        ratio = group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"])
        return torch.where((p_norm > 0) & (g_norm > 0), ratio, 1.0)

    def update(self, p, grad, state, group, step):
        h = self.hyper(group, step)
        trust = self.trust(self.norms(p, grad), group)
        _momentum_step(p, _with_weight_decay(p, grad, h[0]) * trust, state, h)
