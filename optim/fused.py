"""Where an 8-bit state update runs: the compiled CPU path, the CUDA kernel, or the generic path.

`fused_update` is the one entry point. The generic path is the reference: decode each 8-bit
state entry with `q8.dequantize`, apply the optimizer's update rule in fp32 torch ops, and
encode it again in the optimizer's code for that entry: signed entries to the nearest code
(`q8.quantize`), non-negative ones with deterministic stochastic rounding
(`q8.codec.quantize_stochastic`, keyed by the parameter's seed, the step and the element's
global index; docs/OPTIMIZER_STATE.md says why). The fused paths compute the same bytes in one
pass per block without materialising the fp32 state (spec: optim/_native.c).
"""

from __future__ import annotations

import dataclasses
import math
import struct

import torch

from ..codec import Code, QTensor, dequantize, get_code, quantize, quantize_stochastic, rounding_key
from ..codec.native import _run_blocks, search_lut
from . import _native


def f32(x: float) -> float:
    """`x` rounded to the nearest binary32 value (kept as a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def all_finite_local(t: torch.Tensor) -> bool:
    """Whether every element of `t` is finite. One vectorised sum (a tenth of the cost of
    torch.isfinite(t).all() on CPU), and the exact test only when the sum is not finite
    (a NaN/inf element, or finite values whose sum overflows)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root (through fp64, which is exact for it): torch's
    vectorised CPU sqrt may be off by one ulp, the C and CUDA paths are not."""
    return x.double().sqrt_().float()


FLT_MAX = 3.4028234663852886e38


def moment_bound(betas: tuple[float, float], step: int) -> float:
    """K such that exact Adam moments satisfy |m| <= K * sqrt(v) at `step` (from zero state).

    By Cauchy-Schwarz, |m_t| = (1-b1) |sum_k b1^k g_{t-k}| <= (1-b1) sqrt(S_t / (1-b2))
    sqrt(v_t), S_t = sum_{k<t} (b1^2/b2)^k: the bias-corrected step |m_hat| / sqrt(v_hat)
    is at most 1 at step 1 and ~7.3 later for betas (0.9, 0.999). Quantization can break it
    (a v rounded down, an m rounded up); the update rules clamp m to it. 0.1% slack keeps
    the fp32 rounding of exact moments from binding; capped at the largest binary32 so
    that K * 0 stays 0."""
    beta1, beta2 = betas
    if beta2 == 0.0:  # v is the last g^2 alone: no bound once m carries history
        terms = 1.0 if beta1 == 0.0 or step == 1 else math.inf
    else:
        r = beta1 * beta1 / beta2
        try:
            terms = float(step) if r == 1.0 else (r**step - 1.0) / (r - 1.0)
        except OverflowError:
            terms = math.inf
    return min((1.0 - beta1) * math.sqrt(terms / (1.0 - beta2)) * 1.001, FLT_MAX)


def adam_hyper(group: dict, step: int, decoupled: bool) -> list[float]:
    """The binary32 per-step constants of the Adam spec (optim/_native.c), in its order."""
    beta1, beta2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    values = [
        beta1,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        group["eps"],
        lr / (1.0 - beta1**step),
        math.sqrt(1.0 - beta2**step),
        1.0 - lr * wd if decoupled else 1.0,
        0.0 if decoupled else wd,
        moment_bound((beta1, beta2), step),
    ]
    return [f32(v) for v in values]


def fused_update(opt, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, offset: int = 0) -> None:
    """Apply one step of `opt`'s rule to parameter `p` and its `state` in place; `offset`
    is the global index of `p`'s first element (a shard's start), which keys the
    stochastic rounding.

    When `opt` has a fused kernel (`native_kind`) and every state entry is 8-bit, CPU
    parameters run the compiled kernel of optim/_native.c and CUDA parameters the Triton
    kernel `q8.kernels.adam_update` (same spec, same bytes); anything else takes the
    generic path. All paths give identical bytes. An entry loaded in another table (e.g.
    bitsandbytes' second moment) is decoded with it and re-encoded in the optimizer's.
    """
    codes = {name: get_code(code) for name, code in opt.state_codes(group).items()}
    qstate = [state[k] for k in codes]
    fused = opt.native_kind is not None and len(qstate) == 2 and all(isinstance(s, QTensor) for s in qstate)
    if not fused or p.device.type not in ("cpu", "cuda"):
        generic_update(opt, p, grad, state, group, offset)
        return
    m, v = qstate
    hyper = adam_hyper(group, state["step"], decoupled=opt.native_kind == "adamw")
    key = rounding_key(state["seed"], state["step"])
    target = p.detach() if p.is_contiguous() else p.detach().contiguous()
    m_code, v_code = codes.values()
    if p.device.type == "cpu":
        bad = _native_adam(target, grad, m, v, hyper, m_code, v_code, key, offset)
    else:
        from .. import kernels

        codes_mv = (m_code, v_code)
        bad = kernels.adam_update(target, grad.contiguous(), m, v, hyper, key=key, offset=offset, codes=codes_mv)
    if bad >= 0:
        raise FloatingPointError(
            f"{type(opt).__name__}: the updated state of a parameter of shape {tuple(p.shape)} overflowed fp32 "
            f"in block {bad} (gradient too large for fp32 moments); that state is no longer valid"
        )
    for name, qt in zip(codes, qstate, strict=True):
        if qt.code != codes[name]:  # the codes were rewritten in the optimizer's table
            state[name] = dataclasses.replace(qt, code=codes[name])
    if target.data_ptr() != p.data_ptr():
        p.copy_(target)


def generic_update(opt, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, offset: int = 0) -> None:
    """Reference path: dequantize 8-bit entries, run `opt.update` in fp32, re-encode them in
    the optimizer's codes (signed: nearest; non-negative: stochastic rounding)."""
    p32 = p if p.dtype == torch.float32 else p.float()
    g32 = grad.float()
    buffers = {}
    codes = opt.state_codes(group)
    for name in codes:
        s = state[name]
        buffers[name] = dequantize(s, torch.float32) if isinstance(s, QTensor) else s
    opt.update(p32, g32, buffers, group, state["step"])
    for name, code in codes.items():
        s = state[name]
        if not isinstance(s, QTensor):
            continue
        code = get_code(code)
        if code.signed:
            state[name] = quantize(buffers[name], code, s.blocksize, row_length=s.row_length)
        else:
            key = rounding_key(state["seed"], state["step"])
            state[name] = quantize_stochastic(buffers[name], code, s.blocksize, key, offset, row_length=s.row_length)
    if p32 is not p:
        p.copy_(p32)


def _state_args(qt: QTensor, code: Code) -> tuple:
    """A state entry for the C kernel: decoded with its own table, encoded in `code`."""
    return (
        qt.codes.data_ptr(),
        qt.absmax.data_ptr(),
        qt.code.values.data_ptr(),
        code.values.data_ptr(),
        code.thresholds.data_ptr(),
        search_lut(code).data_ptr(),
        code.zero_index,
    )


def _native_adam(
    p: torch.Tensor,
    grad: torch.Tensor,
    m: QTensor,
    v: QTensor,
    hyper: list[float],
    m_code: Code,
    v_code: Code,
    key: int,
    offset: int,
) -> int:
    """The compiled CPU kernel over block ranges on several threads; -1 or the first bad block."""
    if (m.blocksize, m.row_length) != (v.blocksize, v.row_length):
        raise ValueError(f"fused Adam: moments with different block layouts ({m!r}, {v!r})")
    p32 = p if p.dtype == torch.float32 else p.float()
    g32 = grad.detach().float().contiguous()
    hyper_t = torch.tensor(hyper, dtype=torch.float32)
    n, blocksize, row_length = p32.numel(), m.blocksize, m.row_length
    if n == 0:
        return -1
    m_args, v_args = _state_args(m, m_code), _state_args(v, v_code)

    def run(b0: int, b1: int, threads: int) -> int:
        return _native.adam(
            p32.data_ptr(), g32.data_ptr(), row_length, blocksize, b0, b1, m_args, v_args, hyper_t.data_ptr(), key,
            offset, threads,
        )  # fmt: skip

    bad = _run_blocks(run, m.absmax.numel(), n)
    if p32 is not p:
        p.copy_(p32)
    return bad
