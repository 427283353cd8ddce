"""Nested checkpoints (optimizer.pt and other torch.save'd objects) into the container and back.

Every tensor leaf goes through the `Policy` under its dotted path ("state.0.exp_avg").
The `state_dict()` of a q8 optimizer (a plain Trainer's optimizer.pt when the optimizer was
a q8 one) is stored as it is, every tensor exact: its 8-bit codes are never quantized
again, nor its fp32 entries (embeddings, norms). bitsandbytes 8-bit state (uint8
`state1`/`state2` with `absmax1`/`absmax2` and a `qmap`) already is blockwise 8-bit: it is
stored as is, as a QTensor with the matching q8 code (the dynamic tables equal
bitsandbytes' bit for bit) and the blocksize inferred from the number of absmax values.
Decoding gives back bitsandbytes' layout with identical codes, the q8 state dict as it
was, and fp32 tensors for everything q8convert quantized, which torch's optimizers load.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import q8
import torch
from q8.codec import get_code
from q8.codec.blockwise import BLOCKSIZES
from q8.formats.checkpoints import InputError

from . import search
from .policy import Decision, Policy

__all__ = ["BNB_TABLES", "from_container", "infer_blocksize", "q8_optimizer_class", "to_container"]

BNB_TABLES = ("dynamic", "udynamic")
"""The q8 tables a bitsandbytes `qmap` may equal (its create_dynamic_map, signed and not)."""
_BNB_8BIT_KEYS = ("state1", "state2")


def infer_blocksize(numel: int, nblocks: int) -> int | None:
    """The blocksize that cuts `numel` elements into `nblocks` blocks (bitsandbytes does not
    store it). When several fit (a single block) they decode alike; the smallest is taken."""
    return next((b for b in BLOCKSIZES if -(-numel // b) == nblocks), None)


def _bnb_qtensor(where: str, i: int, d: dict) -> q8.QTensor:
    """bitsandbytes' state{i}, absmax{i}, qmap{i} as one QTensor, codes untouched."""
    codes, absmax, qmap = d[f"state{i}"], d.get(f"absmax{i}"), d.get(f"qmap{i}")
    if not isinstance(absmax, torch.Tensor) or not isinstance(qmap, torch.Tensor):
        raise InputError(
            f"{where}: 8-bit state{i} needs absmax{i} and qmap{i} (blockwise bitsandbytes state; "
            "the older non-blockwise layout is not supported)"
        )
    code = next((get_code(n) for n in BNB_TABLES if torch.equal(qmap.float().cpu(), get_code(n).values)), None)
    if code is None or qmap.dtype != torch.float32:
        raise InputError(f"{where}: qmap{i} is not bitsandbytes' dynamic table (signed or unsigned), cannot keep as is")
    blocksize = infer_blocksize(codes.numel(), absmax.numel())
    if blocksize is None:
        raise InputError(
            f"{where}: {absmax.numel()} absmax{i} values fit no blocksize for {codes.numel()} codes of state{i}"
        )
    try:
        return q8.QTensor(codes.reshape(-1), absmax.reshape(-1), code, blocksize, codes.shape, torch.float32)
    except ValueError as e:
        raise InputError(f"{where}: state{i}: {e}") from e


def _is_bnb_8bit(d: dict, key: str) -> bool:
    v = d.get(key)
    return key in _BNB_8BIT_KEYS and isinstance(v, torch.Tensor) and v.dtype == torch.uint8


def _leaves(x: Any, path: str = "", key: str = "") -> Iterator[tuple[str, str, torch.Tensor]]:
    """(dotted path, key in its dict, tensor) of every tensor in a nested object."""
    if isinstance(x, torch.Tensor):
        yield path, key, x
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list | tuple) else ()
    for k, v in items:
        yield from _leaves(v, f"{path}.{k}" if path else str(k), str(k) if isinstance(x, dict) else "")


def q8_optimizer_class(obj: Any) -> str | None:
    """The q8 optimizer whose `state_dict()` `obj` is (its mark group names it), or None.
    Its 8-bit codes, their absmax and its fp32 entries are stored as they are."""
    if isinstance(obj, dict) and isinstance(obj.get("param_groups"), list) and isinstance(obj.get("state"), dict):
        return q8.optim.optimizer.split_state_mark(obj["param_groups"])[1]
    return None


def to_container(obj: Any, policy: Policy, where: str) -> tuple[Any, list[Decision]]:
    """`obj` with each tensor replaced by what the policy stores for it; and the decisions.

    `where` names the source file in errors. A model error covers the object's tensors
    as one model (`Policy.for_model`; not Adam moments, not bitsandbytes state).
    """
    q8_class = q8_optimizer_class(obj)
    if not q8_class:  # a q8 optimizer's state is stored as it is: nothing to share out
        policy = policy.for_model(
            (x.numel(), search.sample(x))
            for path, key, x in _leaves(obj)
            if key not in _BNB_8BIT_KEYS and policy.covers(path, x.dtype, tuple(x.shape), key)
        )
    decisions: list[Decision] = []
    held: set[q8.Code] = set()  # the code tables the file will hold

    def walk(x: Any, path: str, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            if q8_class or key in _BNB_8BIT_KEYS:  # state that decoding must give back bit for bit
                eight = q8_class and x.dtype == torch.uint8
                d = Decision(path, tuple(x.shape), str(x.dtype).removeprefix("torch."), "exact", "", x.nbytes)
                d.encoding = "8-bit as is" if eight else "exact"
                d.reason = f"q8 {q8_class} state" if q8_class else "bitsandbytes 32-bit state"
                stored = x
            else:
                stored, d = policy.apply(path, x, key, held)
            if d.stored_bytes is None:  # the target search measured it compressed already
                d.stored_bytes = stored.nbytes
            decisions.append(d)
            return stored
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                sub = f"{path}.{k}" if path else str(k)
                if _is_bnb_8bit(x, k):
                    qt = _bnb_qtensor(f"{where}: {sub}", int(k[-1]), x)
                    d = Decision(sub, tuple(v.shape), "uint8", "8-bit as is", "bitsandbytes 8-bit state", 0)
                    d.raw_bytes = d.stored_bytes = qt.nbytes
                    d.code, d.blocksize = qt.code.name, qt.blocksize
                    decisions.append(d)
                    out[k] = qt
                elif k in ("absmax1", "absmax2", "qmap1", "qmap2") and _is_bnb_8bit(x, f"state{k[-1]}"):
                    continue  # inside the QTensor
                else:
                    out[k] = walk(v, sub, str(k))
            return out
        if isinstance(x, list | tuple):
            return type(x)(walk(v, f"{path}.{i}" if path else str(i), "") for i, v in enumerate(x))
        return x

    return walk(obj, "", ""), decisions


def from_container(obj: Any) -> Any:
    """The inverse of `to_container`: bitsandbytes layout for its 8-bit state, fp32 (or the
    original dtype) for what q8convert quantized."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(v, q8.QTensor) and k in _BNB_8BIT_KEYS:
                i = k[-1]
                out[k] = v.codes.reshape(v.shape)
                out[f"qmap{i}"] = v.code.values.clone()
                out[f"absmax{i}"] = v.absmax
            else:
                out[k] = from_container(v)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(from_container(v) for v in obj)
    if isinstance(obj, q8.QTensor):
        return q8.dequantize(obj)
    return obj
