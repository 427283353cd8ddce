"""Where an 8-bit state update runs: the compiled CPU path, the CUDA kernel, or the generic path.

`fused_update` is the one entry point. The generic path is the reference: decode each 8-bit
state entry with `q8.dequantize`, apply the optimizer's update rule in fp32 torch ops, and
encode it again with `q8.quantize`. The fused paths compute the same bytes in one pass per
block without materialising the fp32 state (spec: optim/_native.c).
"""

from __future__ import annotations

import math
import struct

import torch

from ..codec import QTensor, dequantize, quantize
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
    ]
    return [f32(v) for v in values]


def fused_update(opt, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """Apply one step of `opt`'s rule to parameter `p` and its `state` in place.

    When `opt` has a fused kernel (`native_kind`) and every state entry is 8-bit, CPU
    parameters run the compiled kernel of optim/_native.c and CUDA parameters the Triton
    kernel `q8.kernels.adam_update` (same spec, same bytes); anything else takes the
    generic path. All paths give identical bytes.
    """
    qstate = [state[k] for k in opt.state_codes(group)]
    fused = opt.native_kind is not None and len(qstate) == 2 and all(isinstance(s, QTensor) for s in qstate)
    if not fused or p.device.type not in ("cpu", "cuda"):
        generic_update(opt, p, grad, state, group)
        return
    m, v = qstate
    hyper = adam_hyper(group, state["step"], decoupled=opt.native_kind == "adamw")
    target = p.detach() if p.is_contiguous() else p.detach().contiguous()
    if p.device.type == "cpu":
        bad = _native_adam(target, grad, m, v, hyper)
    else:
        from .. import kernels

        bad = kernels.adam_update(target, grad.contiguous(), m, v, hyper)
    if bad >= 0:
        raise FloatingPointError(
            f"{type(opt).__name__}: the updated state of a parameter of shape {tuple(p.shape)} overflowed fp32 "
            f"in block {bad} (gradient too large for fp32 moments); that state is no longer valid"
        )
    if target.data_ptr() != p.data_ptr():
        p.copy_(target)


def generic_update(opt, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """Reference path: dequantize 8-bit entries, run `opt.update` in fp32, requantize."""
    p32 = p if p.dtype == torch.float32 else p.float()
    g32 = grad.float()
    buffers = {}
    for name in opt.state_codes(group):
        s = state[name]
        buffers[name] = dequantize(s, torch.float32) if isinstance(s, QTensor) else s
    opt.update(p32, g32, buffers, group, state["step"])
    for name, s in list(state.items()):
        if isinstance(s, QTensor):
            state[name] = quantize(buffers[name], s.code, s.blocksize, row_length=s.row_length)
    if p32 is not p:
        p.copy_(p32)


def _state_args(qt: QTensor) -> tuple:
    code = qt.code
    return (
        qt.codes.data_ptr(),
        qt.absmax.data_ptr(),
        code.values.data_ptr(),
        code.thresholds.data_ptr(),
        search_lut(code).data_ptr(),
        code.zero_index,
    )


def _native_adam(p: torch.Tensor, grad: torch.Tensor, m: QTensor, v: QTensor, hyper: list[float]) -> int:
    """The compiled CPU kernel over block ranges on several threads; -1 or the first bad block."""
    if (m.blocksize, m.row_length) != (v.blocksize, v.row_length):
        raise ValueError(f"fused Adam: moments with different block layouts ({m!r}, {v!r})")
    p32 = p if p.dtype == torch.float32 else p.float()
    g32 = grad.detach().float().contiguous()
    hyper_t = torch.tensor(hyper, dtype=torch.float32)
    n, blocksize, row_length = p32.numel(), m.blocksize, m.row_length
    if n == 0:
        return -1
    m_args, v_args = _state_args(m), _state_args(v)

    def run(b0: int, b1: int, threads: int) -> int:
        return _native.adam(
            p32.data_ptr(), g32.data_ptr(), row_length, blocksize, b0, b1, m_args, v_args, hyper_t.data_ptr(), threads
        )

    bad = _run_blocks(run, m.absmax.numel(), n)
    if p32 is not p:
        p.copy_(p32)
    return bad
