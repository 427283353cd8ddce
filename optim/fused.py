"""Where an optimizer step runs: the compiled CPU kernels, the Triton kernels, or the generic path.

`fused_step` is the one entry point; it takes every parameter of a step together. The
generic path is the reference: decode each 8-bit state entry with `q8.dequantize`, apply the
optimizer's `update` in fp32 torch ops, and encode it again in the optimizer's code for that
entry: signed entries to the nearest code (`q8.quantize`), non-negative ones with
deterministic stochastic rounding (`q8.codec.quantize_stochastic`, keyed by the parameter's
seed, the step and the element's global index; docs/OPTIMIZER_STATE.md says why). The fused
paths compute the same bytes in one pass per block without materialising the fp32 state:
CPU parameters in one C call for all of them (optim/_native.c), CUDA parameters one Triton
launch each and no host-device synchronization (q8.kernels.optim, `cuda_step`).
"""

from __future__ import annotations

import dataclasses
import math
import struct
import warnings
from array import array

import torch

from ..codec import Code, QTensor, dequantize, get_code, quantize, quantize_stochastic, rounding_key
from . import _native
from .norms import f32, norm_scales, norms_from_sums
from .sharded import all_finite, is_sharded, local


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root (through fp64, which is exact for it): torch's
    vectorised CPU sqrt may be off by one ulp, the C and CUDA paths are not."""
    return x.double().sqrt_().float()


FLT_MAX = 3.4028234663852886e38


def powi(x: float, n: int) -> float:
    """x**n for an int n >= 0 by binary exponentiation in binary64: a fixed sequence of
    IEEE multiplications, which the GPU kernels repeat to compute bias corrections from
    the step count they hold (so both give the same bits; `**` may round differently)."""
    result = 1.0
    while n:
        if n & 1:
            result *= x
        x *= x
        n >>= 1
    return result


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
        terms = float(step) if r == 1.0 else (powi(r, step) - 1.0) / (r - 1.0)
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
        lr / (1.0 - powi(beta1, step)),
        math.sqrt(1.0 - powi(beta2, step)),
        1.0 - lr * wd if decoupled else 1.0,
        0.0 if decoupled else wd,
        moment_bound((beta1, beta2), step),
    ]
    return [f32(v) for v in values]


DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""Parameter and gradient dtypes the fused kernels read and write, as optim/_native.c numbers them."""
TRITON_DEVICES = {"cuda"}
"""Device types whose parameters take the Triton kernels (tests add "cpu" under TRITON_INTERPRET=1)."""
NORM_RULES = {"lamb", "lars"}
"""Rules scaled by a trust ratio of exact whole-parameter norms (optim/norms.py)."""
_FP32_BLOCK = 1024  # optim/_native.c's Q8_FP32_BLOCK: the blocks of a parameter whose state is all fp32
_SLOT_KINDS = {"fp32": 1, "nearest": 2, "stochastic": 3}


def slot_names(opt, group: dict) -> tuple[str | None, ...]:
    """The state entries in the order of the rule's slots (None: absent), at most three."""
    names = tuple(opt.slots(group))
    if len(names) > _native.SLOTS:
        raise ValueError(f"{type(opt).__name__}: a fused rule takes at most {_native.SLOTS} state entries")
    return names + (None,) * (_native.SLOTS - len(names))


def fused_step(opt, work: list[tuple[torch.Tensor, torch.Tensor, dict, dict]]) -> None:
    """One step of `opt` for every (parameter, gradient, state, group) in `work`, in place.

    CPU parameters of an optimizer with a fused rule (`opt.rule`) run in one C call; CUDA
    parameters run the Triton kernels (`cuda_step`); anything else (another device, an
    optimizer without a fused rule) takes the generic path, one parameter at a time. Each
    path gives the same bytes. A gradient holding NaN or inf skips its parameter (the
    parameter, its state and its step count untouched), with a RuntimeWarning on CPU.
    """
    cpu, cuda, generic = [], [], []
    for item in work:
        p, grad = local(item[0]), local(item[1])
        fused = opt.rule is not None and p.dtype in DTYPE_CODES and grad.dtype in DTYPE_CODES
        if fused and p.device.type in TRITON_DEVICES:
            cuda.append(item)
        elif fused and p.device.type == "cpu":
            cpu.append(item)
        else:
            generic.append(item)
    if cpu:
        cpu_step(opt, cpu)
    if cuda:
        from .cuda import cuda_step

        cuda_step(opt, cuda)
    for item in generic:
        generic_step(opt, *item)


def sharded_group(p: torch.Tensor):
    return p.device_mesh.get_group() if is_sharded(p) else None


def offset_of(p: torch.Tensor) -> int:
    """Global index of the first element of `p`'s local part: its shard's start, or 0."""
    from .sharded import first_element

    return first_element(p) if is_sharded(p) else 0


def warn_skipped(opt, p: torch.Tensor) -> None:
    warnings.warn(
        f"{type(opt).__name__}: non-finite gradient for a parameter of shape {tuple(p.shape)}; "
        f"its update was skipped (state and step count unchanged)",
        RuntimeWarning,
        stacklevel=4,
    )


def overflow_error(opt, p: torch.Tensor, block: int) -> FloatingPointError:
    return FloatingPointError(
        f"{type(opt).__name__}: the updated state of a parameter of shape {tuple(p.shape)} overflowed fp32 "
        f"in block {block} (gradient too large for fp32 moments); that state is no longer valid"
    )


def pad_hyper(values: list[float]) -> list[float]:
    """A rule's constants padded to the kernels' twelve."""
    if len(values) > 12:
        raise ValueError(f"a fused rule takes at most 12 per-step constants, got {len(values)}")
    return [*values, *[0.0] * (12 - len(values))]


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _code_fields(target: Code) -> tuple[int, ...]:
    """What a slot's C record takes from the table it is encoded in: kind, encode tree,
    its bucket table (0: none), the values, values[0] bits, zero code (the same for every
    parameter of a group)."""
    keys = 0 if target.signed else 1  # nearest: the thresholds; stochastic: values[1..255]
    buckets = target.bucket_tables[keys]
    kind = _SLOT_KINDS["nearest" if target.signed else "stochastic"]
    return (
        kind,
        target.search_trees[keys].data_ptr(),
        0 if buckets is None else buckets.data_ptr(),
        target.values.data_ptr(),
        _bits(float(target.values[0])),
        target.zero_index,
    )


def _slot_fields(entry, fields: tuple[int, ...] | None) -> list[int]:
    """One slot of a C record: kind, data (fp32 values or codes), absmax, decode table,
    encode tree, bucket table, values, values[0] bits, zero code (`fields`: `_code_fields`
    of its table)."""
    if entry is None:
        return [0] * 9
    if not isinstance(entry, QTensor):
        return [_SLOT_KINDS["fp32"], entry.data_ptr(), *[0] * 7]
    kind, *encoding = fields
    return [kind, entry.codes.data_ptr(), entry.absmax.data_ptr(), entry.code.values.data_ptr(), *encoding]


def _layout(entries: list, n: int) -> tuple[int, int] | None:
    """(row_length, blocksize) of a parameter's 8-bit entries (all alike), or of its fp32
    state; None when 8-bit entries disagree (the generic path then)."""
    layouts = {(e.row_length, e.blocksize) for e in entries if isinstance(e, QTensor)}
    if len(layouts) > 1:
        return None
    row_length, blocksize = layouts.pop() if layouts else (n, _FP32_BLOCK)
    return max(row_length, 1), blocksize  # an empty parameter (an FSDP2 rank's empty shard): no blocks


def cpu_step(opt, work: list) -> None:
    """The C kernels over every CPU parameter of the step (see `fused_step`). Python work
    per parameter is kept to building its record: what depends only on the group (slot
    names, tables, constants of the step) is computed once per group."""
    records, status, keep, ready, per_group = array("q"), array("q"), [], [], {}
    for p, grad, state, group in work:
        sharded = is_sharded(p)
        if sharded and not all_finite(grad):  # every rank skips the same parameters
            warn_skipped(opt, p)
            continue
        local_p, g = (local(p), local(grad)) if sharded else (p, grad)  # the step runs under no_grad
        target = local_p if local_p.is_contiguous() else local_p.contiguous()
        g = g if g.is_contiguous() else g.contiguous()
        if id(group) not in per_group:
            names, codes = slot_names(opt, group), opt.state_codes(group)
            tables = tuple(None if name is None else get_code(codes[name]) for name in names)
            fields = tuple(None if t is None else _code_fields(t) for t in tables)
            per_group[id(group)] = names, tables, fields, {}
        names, tables, fields, hyper = per_group[id(group)]
        entries = [None if name is None else state[name] for name in names]
        layout = _layout(entries, target.numel())
        if layout is None:
            generic_step(opt, p, grad, state, group)
            continue
        step = int(state["step"]) + 1
        h = hyper.get(step)
        if h is None:
            h = hyper[step] = torch.tensor(pad_hyper(opt.hyper(group, step)), dtype=torch.float32)
        record = [g.data_ptr(), DTYPE_CODES[g.dtype], step, h.data_ptr(), _bits(1.0), target.data_ptr(),
                  DTYPE_CODES[target.dtype], int(group["maximize"]), target.numel(), *layout,
                  offset_of(p) if sharded else 0, state["seed"]]  # fmt: skip
        for entry, f in zip(entries, fields, strict=True):
            record += _slot_fields(entry, f)
        records.extend(record)
        status.append(-1)
        keep += [target, g]
        ready.append((p, local_p, target, state, group, names, tables))
    if not ready:
        return
    threads = max(1, min(torch.get_num_threads(), sum(t[2].numel() for t in ready) >> 18))
    rule = _native.rule_index(opt.rule)
    if opt.rule in NORM_RULES:
        _set_trust(opt, rule, records, status, ready, threads)
    _native.step(rule, records, status, threads)
    overflow = None
    for (p, local_p, target, state, _, names, tables), result in zip(ready, status, strict=True):
        if result == -2:
            warn_skipped(opt, p)
            continue
        state["step"] = int(state["step"]) + 1
        if target is not local_p:
            local_p.copy_(target)
        for name, table in zip(names, tables, strict=True):
            entry = None if name is None else state[name]
            if isinstance(entry, QTensor) and entry.code != table:
                state[name] = dataclasses.replace(entry, code=table)  # re-encoded in the optimizer's table
        if result >= 0 and overflow is None:
            overflow = overflow_error(opt, p, result)
    if overflow is not None:
        raise overflow


def _set_trust(opt, rule: int, records: array, status: array, ready: list, threads: int) -> None:
    """LAMB / LARS: the exact norms of each parameter's two norm inputs in two C passes
    (max |x|, then the exact sums; all-reduced over a sharded parameter's ranks, as
    optim/norms.py does), and its trust ratio (`opt.trust`) into its record."""
    import torch.distributed as dist

    n = len(ready)
    maxes, scales, sums = array("f", [0.0] * 2 * n), array("d", [0.0] * 2 * n), array("q", [0] * 4 * n)
    _native.norm_pass(rule, 0, records, status, maxes, scales, sums, threads)
    max_t = torch.tensor(maxes).view(n, 2)
    for i, (p, *_) in enumerate(ready):
        if is_sharded(p):
            dist.all_reduce(max_t[i], op=dist.ReduceOp.MAX, group=sharded_group(p))
    scale_t = norm_scales(max_t)
    scales[:] = array("d", scale_t.flatten().tolist())
    _native.norm_pass(rule, 1, records, status, maxes, scales, sums, threads)
    sum_t = torch.tensor(sums).view(n, 2, 2)
    for i, (p, *_) in enumerate(ready):
        if is_sharded(p):
            dist.all_reduce(sum_t[i], op=dist.ReduceOp.SUM, group=sharded_group(p))
    norms = norms_from_sums(max_t, scale_t, sum_t)
    by_group: dict[int, tuple[dict, list[int]]] = {}
    for i, (*_, group, _, _) in enumerate(ready):
        by_group.setdefault(id(group), (group, []))[1].append(i)
    for group, index in by_group.values():  # the trust rule is elementwise: a group's ratios at once
        ratios = opt.trust(list(norms[index].unbind(1)), group).to(torch.float32)
        for i, bits in zip(index, ratios.view(torch.int32).tolist(), strict=True):
            records[i * _native.RECORD + 4] = bits & 0xFFFFFFFF


def generic_step(opt, p, grad, state, group) -> None:
    """The generic path for one parameter: the finiteness check (all ranks of a sharded
    parameter), the step count, `generic_update`."""
    if not all_finite(grad):
        warn_skipped(opt, p)
        return
    state["step"] = int(state["step"]) + 1
    opt._shard_group = sharded_group(p)
    generic_update(opt, local(p), -local(grad) if group["maximize"] else local(grad), state, group, offset_of(p))
    opt._shard_group = None


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
