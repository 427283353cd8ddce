"""The step of q8 optimizers on CUDA parameters: at most one Triton launch per parameter (the
small parameters of a group batched into one launch per kind, `BATCH_NUMEL`) and no
host-device synchronization, so a step can be captured in a CUDA graph.

What would read the device elsewhere stays on it:

- The finiteness of the gradients: one `torch._foreach_norm(grads, inf)` for all of them
  gives a flag per parameter in device memory; the kernel of a parameter whose gradient
  holds NaN or inf writes nothing (parameter, state and step count untouched, as on CPU).
  Sharded parameters all-reduce their flag over their ranks (on the device).
- The step count: an int64 0-d tensor on the parameter's device (`state["step"]`; an int
  again in `state_dict()`). Kernels read it and derive their bias corrections from it
  (q8.kernels.optim); one `torch._foreach_add_` then adds each parameter's flag to it.
- What went wrong: skipped parameters and state that overflowed fp32 are counted on the
  device (`DeviceReport`) and copied to pinned host memory asynchronously; a later `step()`
  reads the copy once it has arrived (an event query, never a wait) and warns or raises
  then, a step or more late. `Optimizer8bit.report()` (and `state_dict()`) waits for it.

Under `torch.cuda.graph` capture the group hyperparameters of capture time (lr included)
are baked into the graph; the step count and everything derived from it are read from
device memory at every replay. The first step (which creates the state) and a warm-up
step (Triton compiles its kernels) must run before capture, as torch's docs ask for any
optimizer. A batched launch reads its parameters' addresses from device tables that are
copied again only when those tensors change (`q8.kernels.optim.BatchTables`): a capture
after a step with the same tensors (the same .grad tensors, as capture needs anyway) copies
nothing and keeps the tables alive for the graph; if they did change, that capture launches
those parameters one by one instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import torch

from ..codec import QTensor, get_code
from .fused import NORM_RULES, _layout, generic_step, offset_of, pad_hyper, sharded_group, slot_names
from .norms import exact_norms
from .sharded import is_sharded, local


class DeviceReport:
    """Counters a device's kernels add to (`q8.kernels.optim.REPORT`), and their last copy
    on the host."""

    def __init__(self, device: torch.device):
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)
        self.host = torch.zeros(3, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.event = None
        self.seen = [0, 0]

    def poll(self, owner: str, wait: bool) -> None:
        """Warn about new skips and raise FloatingPointError for new overflows: with `wait`,
        from the counters themselves (a synchronization); else from the host copy if it
        has arrived, then start the next copy (CUDA only; nothing while capturing a graph)."""
        cuda = self.counts.device.type == "cuda"
        if cuda and torch.cuda.is_current_stream_capturing():
            return
        if wait:
            values = self.counts.tolist()
        elif cuda and (self.event is None or self.event.query()):
            values = self.host.tolist() if self.event is not None else [*self.seen, 0]
            self.host.copy_(self.counts, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            return
        skipped, overflowed = values[0] - self.seen[0], values[1] - self.seen[1]
        self.seen = values[:2]
        if skipped > 0:
            warnings.warn(
                f"{owner}: {skipped} parameter update(s) skipped on {self.counts.device} (non-finite gradient; "
                f"state and step count unchanged)",
                RuntimeWarning,
                stacklevel=4,
            )
        if overflowed > 0:
            raise FloatingPointError(
                f"{owner}: the updated state of parameter {values[2]} (its seed) on {self.counts.device} overflowed "
                f"fp32 in {overflowed} block(s) (gradient too large for fp32 moments); that state is no longer valid"
            )


@functools.cache
def one(device: torch.device) -> torch.Tensor:
    """1.0 (fp32, 0-d) on `device`: the trust ratio of rules without one."""
    return torch.ones((), device=device)


def _doubles(group: dict) -> tuple[float, float, float, float]:
    """(lr, beta1, beta2, lr_decay) of a group in binary64: what rules derive their
    step-dependent constants from on the device (0 where the group has none)."""
    beta1, beta2 = group.get("betas", (0.0, 0.0))
    return float(group["lr"]), float(beta1), float(beta2), float(group.get("lr_decay", 0.0))


BATCH_NUMEL = 1 << 16
"""Parameters of at most this many elements (a 256x256 weight; 16 programs of 4096 elements)
share one launch per kind (`q8.kernels.batched_step`). For them a launch's fixed cost (a few
microseconds on the device, tens on the host) exceeds the work; larger parameters keep
their own launch, whose pointer arguments Triton knows to be 16-byte aligned (vector loads),
unlike addresses read from a table."""


def _batchable(opt, work_p, target, g, grad) -> bool:
    """Whether a parameter can join a batched launch: small, not empty, no norm pass (LAMB's
    and LARS's trust ratios are per parameter), and its own tensors (no contiguous copies,
    whose addresses would change every step)."""
    return 0 < work_p.numel() <= BATCH_NUMEL and opt.rule not in NORM_RULES and work_p is target and g is grad


def cuda_step(opt, work: list) -> None:
    """The Triton kernels over every parameter in `work` (see the module docstring)."""
    from .. import kernels

    by_device: dict[torch.device, list] = {}
    for item in work:
        by_device.setdefault(local(item[0]).device, []).append(item)
    owner = type(opt).__name__
    for device, items in by_device.items():
        report = opt._reports.setdefault(device, DeviceReport(device))
        report.poll(owner, wait=False)
        grads = [local(g).detach() for _, g, _, _ in items]
        nonempty = [g if g.numel() else one(device) for g in grads]  # the inf-norm of nothing is an error
        ok = torch.stack(torch._foreach_norm(nonempty, math.inf)).isfinite().to(torch.int64)
        for i, (p, *_) in enumerate(items):
            if is_sharded(p):  # every rank skips the same parameters
                torch.distributed.all_reduce(ok[i : i + 1], op=torch.distributed.ReduceOp.MIN, group=sharded_group(p))
        steps, per_group, batches, recoded = [], {}, {}, []
        for i, ((p, _, state, group), grad) in enumerate(zip(items, grads, strict=True)):
            if id(group) not in per_group:  # what depends only on the group, once per step
                names, codes = slot_names(opt, group), opt.state_codes(group)
                tables = [None if name is None else get_code(codes[name]) for name in names]
                h = pad_hyper(opt.hyper(group, 1))  # step-dependent entries: on the device
                per_group[id(group)] = names, tables, h, _doubles(group), group["maximize"]
            names, tables, h, d, negate = per_group[id(group)]
            entries = [None if name is None else state[name] for name in names]
            sharded = is_sharded(p)
            target = (local(p) if sharded else p).detach()
            layout = _layout(entries, target.numel())
            if layout is None:  # 8-bit entries in different layouts: the generic path (synchronizes)
                generic_step(opt, p, items[i][1], state, group)
                continue
            if not isinstance(state["step"], torch.Tensor):
                state["step"] = torch.full((), int(state["step"]), dtype=torch.int64, device=device)
            steps.append((state["step"], i))
            recoded.append((state, names, entries, tables))
            work_p = target if target.is_contiguous() else target.contiguous()
            g = grad if grad.is_contiguous() else grad.contiguous()
            offset = offset_of(p) if sharded else 0
            if _batchable(opt, work_p, target, g, grad):
                member = kernels.optim.Member(work_p, g, entries, state["step"], i, state["seed"], layout, offset,
                                              param=state["seed"])  # fmt: skip
                batches.setdefault((id(group), member.signature()), []).append(member)
                continue
            args = (opt.rule, work_p, g, entries, tables, h, d)
            kwargs = {
                "ok": ok[i], "step_count": state["step"], "report": report.counts, "seed": state["seed"],
                "offset": offset, "param": state["seed"], "negate": negate, "layout": layout,
            }  # fmt: skip
            if opt.rule in NORM_RULES:  # the trust ratio from exact norms, on the device
                y = g
                if opt.rule in kernels.optim.TERMS:
                    y = torch.empty(work_p.shape, dtype=torch.float32, device=device)
                    kernels.step(*args, trust=one(device), terms=y, **kwargs)
                trust = opt.trust(exact_norms([work_p, y], sharded_group(p)), group)
            else:
                trust = one(device)
            kernels.step(*args, trust=trust, **kwargs)
            if work_p is not target:
                target.copy_(work_p)
        for (group_id, signature), members in batches.items():
            _, tables, h, d, negate = per_group[group_id]
            kernels.batched_step(
                opt.rule, members, tables, h, d, ok=ok, report=report.counts, trust=one(device),
                tables=opt._batches.setdefault((device, group_id, signature), kernels.optim.BatchTables()),
                negate=negate,
            )  # fmt: skip
        for state, names, entries, tables in recoded:
            for name, entry, table in zip(names, entries, tables, strict=True):
                if isinstance(entry, QTensor) and entry.code != table:  # re-encoded in the optimizer's table
                    state[name] = dataclasses.replace(entry, code=table)
        if steps:
            flags = ok.unbind()
            torch._foreach_add_([count for count, _ in steps], [flags[i] for _, i in steps])
