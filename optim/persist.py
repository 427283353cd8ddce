"""`save_optimizer` / `load_optimizer`: an optimizer's state in one q8 container file.

A q8 optimizer's state: every 8-bit state entry is written as the QTensor it is (codes +
absmax, no second rounding), every fp32 entry losslessly, through `q8.save_file`; loading
reads the entries through `q8.formats.read_tensors` (small ones several at a time).
`async_save_optimizer` copies the state and writes the same file in the background. Tensor
names are `state.<index>.<entry>` (the index of `state_dict()`); the parameter groups, step
counts, rounding seeds and the optimizer class travel as JSON in the metadata key
`q8.optimizer`.

Any other `torch.optim.Optimizer` (torch's, bitsandbytes', your own) goes through
`q8.save` of its `state_dict()`, losslessly (or, asked to, its large float tensors as
8-bit codes), its class recorded in the metadata key `optimizer`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..codec import CODE_NAMES, QTensor, get_code, quantize_best
from ..formats import FormatError, SaveFuture, load, read_tensors, safe_open, save_file
from ..formats.api import ShardedReader, worth_quantizing, write_tree
from ..formats.background import save_in_background
from ..formats.container import Reader, _check_str_map
from ..formats.tree import pack_tree
from .optimizer import Optimizer8bit, pack_state, split_state_mark, state_mark
from .sharded import is_sharded

__all__ = ["async_save_optimizer", "load_optimizer", "load_optimizer_state_dict", "save_optimizer"]

logger = logging.getLogger(__name__)

METADATA_KEY = "q8.optimizer"
CLASS_KEY = "optimizer"
"""Metadata of a file holding another optimizer's state dict: its class, "torch.optim.adamw.AdamW"."""
FORMAT = 1
QUANTIZE_BLOCKSIZE = 256
"""Blocksize of the fp32 state `save_optimizer(quantize=True)` stores as 8-bit codes."""


def class_name(opt: torch.optim.Optimizer) -> str:
    return f"{type(opt).__module__}.{type(opt).__qualname__}"


def save_optimizer(
    opt: torch.optim.Optimizer,
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    quantize: bool = False,
    compress_codes: bool = False,
) -> None:
    """Write the state of optimizer `opt` to the q8 file `path` (atomic: a failed save
    leaves any previous file untouched).

    Args:
        opt: a q8 optimizer (its 8-bit state as is, fp32 entries losslessly) or any other
            `torch.optim.Optimizer` (its `state_dict()`, class recorded).
        path: destination file.
        metadata: user str -> str metadata.
        quantize: for a non-q8 optimizer, store its float state tensors of at least 4096
            finite elements as 8-bit codes (dynamic code; unsigned for non-negative tensors
            such as Adam's second moment; blocksize 256): about 4x smaller, a one-time loss
            whose largest relative L2 error is logged and recorded in the metadata
            (`quantized_rel_l2_max`). A q8 optimizer's state is 8-bit already: ignored.
        compress_codes: entropy-code the 8-bit state (codes and absmax, `q8.save_file`'s
            option) for the smallest file. By default it is stored as it is: the codes of
            young state shrink by 3-10% (old state with untouched embedding rows: more),
            and coding them costs more time than torch.save takes for the whole file; as
            is, saving and loading run at the speed of the disk (BENCHMARKS.md).

    Example:
        >>> q8.save_optimizer(opt, "opt.q8")
        >>> q8.save_optimizer(opt, "opt-small.q8", compress_codes=True)  # smaller, slower
        >>> q8.save_optimizer(torch_adamw, "adamw.q8")  # lossless, ~1.2x smaller than torch.save
    """
    state, save = _optimizer_file(opt, path, metadata, quantize, compress_codes, "save_optimizer")
    save(state)


def async_save_optimizer(
    opt: torch.optim.Optimizer,
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    quantize: bool = False,
    compress_codes: bool = False,
) -> SaveFuture:
    """`save_optimizer` in the background: returns once the state is copied (8-bit entries
    as codes + absmax; groups and step counts as they are now), so the next `opt.step()`
    may run at once; quantizing (if asked) and writing happen on q8's save thread
    (`q8.async_save_file` says how errors, order and exit are handled).

    Example:
        >>> future = q8.async_save_optimizer(opt, "opt.q8")
        >>> opt.step()  # the file is written meanwhile
        >>> future.result()
    """
    state, save = _optimizer_file(opt, path, metadata, quantize, compress_codes, "async_save_optimizer")
    return save_in_background(path, save, state)


def _optimizer_file(
    opt: torch.optim.Optimizer,
    path: str | os.PathLike,
    metadata: dict | None,
    quantize: bool,
    compress_codes: bool,
    caller: str,
) -> tuple[Any, Callable[[Any], None]]:
    """What `opt`'s state file holds (the live state, not copied; groups and steps taken
    now) and the function that writes it to `path`."""
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"{caller} expects a torch.optim.Optimizer, got {type(opt).__name__}")
    if not isinstance(compress_codes, bool):
        raise TypeError(f"{caller}: compress_codes must be a bool, got {compress_codes!r}")
    if not isinstance(opt, Optimizer8bit):
        name = class_name(opt)
        return opt.state_dict(), lambda state: _save_state_dict(state, name, path, metadata, quantize, compress_codes)
    if any(is_sharded(p) for p in opt.state):
        raise ValueError(f"{caller}: sharded (DTensor) state is saved with torch.distributed.checkpoint")
    sd = opt.state_dict()  # references to the live state, no copy
    groups = split_state_mark(sd["param_groups"])[0]
    index_of = {id(p): i for g, sg in zip(opt.param_groups, groups, strict=True)
                for p, i in zip(g["params"], sg["params"], strict=True)}  # fmt: skip
    try:
        header = json.dumps({"format": FORMAT, "class": type(opt).__name__, "param_groups": groups,
                             "steps": {str(i): s["step"] for i, s in sd["state"].items()},
                             "seeds": {str(i): s["seed"] for i, s in sd["state"].items()}})  # fmt: skip
    except TypeError as err:
        raise TypeError(f"{caller}: parameter groups must hold JSON-serializable values ({err})") from None
    tensors = {
        f"state.{index_of[id(p)]}.{key}": value for p, state in opt.state.items() for key, value in state.items()
        if key not in ("step", "seed")
    }  # fmt: skip
    metadata = {**(metadata or {}), METADATA_KEY: header}
    return tensors, lambda tensors: save_file(tensors, path, metadata, compress_codes=compress_codes)


def load_optimizer(opt: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Load a file written by `save_optimizer` (or by q8convert from an `optimizer.pt`)
    into `opt`, of the same class and parameters, validating every entry as
    `load_state_dict` does. Raises FileNotFoundError for a missing file, `q8.FormatError`
    for a file that is not an optimizer state file, ValueError (naming the file) for a
    state that does not fit (another optimizer class, other parameters).

    Example:
        >>> q8.load_optimizer(opt, "opt.q8")
    """
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"load_optimizer expects a torch.optim.Optimizer, got {type(opt).__name__}")
    with _open(path) as f:  # once: its index is parsed once
        metadata = f.metadata()
        saved = _header(metadata, path)["class"] if METADATA_KEY in metadata else metadata.get(CLASS_KEY)
        ours = type(opt).__name__ if METADATA_KEY in metadata else class_name(opt)
        if METADATA_KEY in metadata and not isinstance(opt, Optimizer8bit):
            raise ValueError(f"{path}: holds a q8 optimizer's 8-bit state, which {class_name(opt)} cannot load")
        if saved is not None and saved != ours:  # None: not from save_optimizer (q8convert of an optimizer.pt)
            raise ValueError(f"{path}: state of a {saved}, cannot load it into {ours}")
        state = _state_dict(f, path)
    if not isinstance(opt, Optimizer8bit) and (_holds_codes(state) or split_state_mark(state["param_groups"])[1]):
        # torch.optim would cast the uint8 codes of 8-bit state to float
        raise ValueError(f"{path}: holds 8-bit optimizer state, which {class_name(opt)} cannot load")
    groups, mark = split_state_mark(state["param_groups"])
    current = opt.param_groups + [{}] * len(groups)  # a count mismatch is reported by load_state_dict
    groups = [_restore_tuples(g, c) for g, c in zip(groups, current, strict=False)]
    try:
        opt.load_state_dict({**state, "param_groups": groups + ([state_mark(mark)] if mark else [])})
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise ValueError(f"{path}: optimizer state does not match the optimizer's parameters: {err}") from None


def load_optimizer_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The `state_dict()` of the optimizer whose state the file `path` holds
    (`save_optimizer`, or q8convert of an `optimizer.pt`), without that optimizer: a q8
    optimizer's 8-bit entries as its state dict packs them (uint8 codes and absmax, not
    decoded; its class in the last, parameterless group), other optimizers' state as they
    keep it (what was quantized, decoded). What `q8convert decode` writes to optimizer.pt;
    `load_optimizer` loads it into an optimizer. Raises as `load_optimizer` does.

    Example:
        >>> torch.save(q8.optim.load_optimizer_state_dict("optimizer.q8"), "optimizer.pt")
    """
    with _open(path) as f:
        return _state_dict(f, path)


def _state_dict(f: Reader | ShardedReader, path: str | os.PathLike) -> dict[str, Any]:
    """`load_optimizer_state_dict` of the open file `f`."""
    metadata = f.metadata()
    if METADATA_KEY not in metadata:
        state = load(path)
        if not (isinstance(state, dict) and isinstance(state.get("state"), dict) and "param_groups" in state):
            raise FormatError(f"{path}: not a q8 optimizer state file (nor an optimizer's state dict)")
        return _dequantize_state(state)
    header = _header(metadata, path)
    defaults = getattr(sys.modules[__package__], header["class"], None)  # the class's tuples (betas)
    defaults = defaults([torch.nn.Parameter(torch.zeros(1))]).defaults if isinstance(defaults, type) else {}
    state: dict[int, dict[str, Any]] = {int(i): {"step": step} for i, step in header["steps"].items()}
    for i, seed in header.get("seeds", {}).items():  # files before seeds were saved: the index
        if i.isdigit() and int(i) in state:
            state[int(i)]["seed"] = seed
    for name in f.keys():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in state:
            raise FormatError(f"{path}: unexpected tensor {name!r} in an optimizer state file")
    entries = read_tensors(f, copy=True)  # as they are stored, together; memory of their own
    for name, value in entries.items():
        _, index, key = name.split(".", 2)
        try:
            value = _checked(value)
            like = torch.empty(value.shape, device="meta")  # packed for a parameter of the entry's shape
            state[int(index)].update(pack_state({key: value}, like))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: tensor {name!r}: {err}") from None
    groups = [_restore_tuples(g, defaults) for g in header["param_groups"]]
    return {"state": state, "param_groups": [*groups, state_mark(header["class"])]}


def _open(path: str | os.PathLike) -> Reader | ShardedReader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: optimizer state file not found")
    return safe_open(path)


def _checked(value: QTensor | torch.Tensor) -> QTensor | torch.Tensor:
    """A state entry read from the file; 8-bit codes must index one of q8's own tables."""
    if isinstance(value, QTensor) and (value.code.name not in CODE_NAMES or value.code != get_code(value.code.name)):
        raise ValueError(f"8-bit codes use a table {value.code.name!r} that is not one of q8's {', '.join(CODE_NAMES)}")
    return value


def _header(metadata: dict[str, str], path) -> dict:
    try:
        header = json.loads(metadata[METADATA_KEY])
        if header.get("format") != FORMAT or not isinstance(header.get("class"), str):
            raise ValueError(f"format {header.get('format')!r}")
        groups, steps = header["param_groups"], header["steps"]
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise ValueError("param_groups")
        if not isinstance(steps, dict) or not all(k.isdigit() for k in steps):
            raise ValueError("steps")
        return header
    except (KeyError, ValueError, TypeError) as err:
        raise FormatError(f"{path}: not a q8 optimizer state file (bad {METADATA_KEY!r} metadata: {err})") from None


def _restore_tuples(saved: dict, current: dict) -> dict:
    """JSON turned tuples (e.g. betas) into lists; give them back their type."""
    return {k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v for k, v in saved.items()}


def _save_state_dict(
    state: dict[str, Any], name: str, path: str | os.PathLike, metadata: dict | None, quantize: bool, compress: bool
) -> None:
    """A non-q8 optimizer's state dict (of class `name`) as `q8.save` writes it, optionally
    with 8-bit float state (entropy-coded if `compress`)."""
    metadata = {**_check_str_map(metadata, "metadata"), CLASS_KEY: name}
    if quantize:
        state, worst = _quantize_state(state)
        metadata["quantized_rel_l2_max"] = f"{worst:.3e}"
        logger.warning(f"{path}: fp32 optimizer state stored as 8-bit codes, max relative L2 error {worst:.3e}")
    write_tree(*pack_tree(state), path, metadata, compress_codes=compress)


def _holds_codes(state: dict[str, Any]) -> bool:
    return any(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8
        for entry in state["state"].values()
        if isinstance(entry, dict)
        for t in entry.values()
    )


def _quantize_state(state: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """A copy of a state dict with its large float state tensors as QTensors (dynamic code;
    unsigned for non-negative tensors), and the largest relative L2 error this caused."""
    worst = 0.0
    quantized: dict[Any, Any] = {}
    for index, tensors in state["state"].items():
        quantized[index] = dict(tensors)
        for key, t in tensors.items():
            if isinstance(t, torch.Tensor) and worth_quantizing(t):
                code = "udynamic" if bool((t >= 0).all()) else "dynamic"
                quantized[index][key], error = quantize_best(t, (code,), QUANTIZE_BLOCKSIZE)
                worst = max(worst, error.rel_l2)
    return {**state, "state": quantized}, worst


def _dequantize_state(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_quantize_state` (a no-op on lossless state)."""
    restored = {
        index: {key: t.dequantize() if isinstance(t, QTensor) else t for key, t in tensors.items()}
        if isinstance(tensors, dict)
        else tensors
        for index, tensors in state["state"].items()
    }
    return {**state, "state": restored}
