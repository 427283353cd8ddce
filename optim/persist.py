"""`save_optimizer` / `load_optimizer`: a q8 optimizer's state in one q8 container file.

Every 8-bit state entry is written as the QTensor it is (codes + absmax, no second
rounding), every fp32 entry losslessly, through `q8.save_file` (or `q8.async_save_file`:
`async_save_optimizer` returns once the state is copied); loading reads them through
`q8.formats.read_tensors` (small tensors several at a time). Tensor
names are `state.<index>.<entry>` (the index of `state_dict()`); the parameter groups, step
counts and the optimizer class travel as JSON in the metadata key `q8.optimizer`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..codec import CODE_NAMES, QTensor, get_code
from ..formats import FormatError, SaveFuture, async_save_file, read_tensors, safe_open, save_file
from .optimizer import Optimizer8bit, pack_state
from .sharded import is_sharded

METADATA_KEY = "q8.optimizer"
FORMAT = 1


def save_optimizer(opt: Optimizer8bit, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the state of q8 optimizer `opt` to the q8 file `path` (atomic: a failed save
    leaves any previous file untouched).

    Example:
        >>> q8.save_optimizer(opt, "opt.q8")
    """
    tensors, metadata = _state_file(opt, metadata, "save_optimizer")
    save_file(tensors, path, metadata)


def async_save_optimizer(
    opt: Optimizer8bit, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> SaveFuture:
    """`save_optimizer` in the background (`q8.async_save_file`): returns once the state is
    copied (8-bit entries as codes + absmax), so the next `opt.step()` may run at once.

    Example:
        >>> future = q8.async_save_optimizer(opt, "opt.q8")
        >>> opt.step()  # the file is written meanwhile
        >>> future.result()
    """
    tensors, metadata = _state_file(opt, metadata, "async_save_optimizer")
    return async_save_file(tensors, path, metadata)


def _state_file(opt: Optimizer8bit, metadata: dict[str, str] | None, caller: str) -> tuple[dict, dict[str, str]]:
    """The tensors (`state.<index>.<entry>`, the live state, not copied) and metadata of
    `opt`'s state file; the metadata (groups, steps) is taken now."""
    if not isinstance(opt, Optimizer8bit):
        raise TypeError(f"{caller} expects a q8.optim optimizer, got {type(opt).__name__}")
    if any(is_sharded(p) for p in opt.state):
        raise ValueError(f"{caller}: sharded (DTensor) state is saved with torch.distributed.checkpoint")
    sd = opt.state_dict()  # references to the live state, no copy
    index_of = {id(p): i for g, sg in zip(opt.param_groups, sd["param_groups"], strict=True)
                for p, i in zip(g["params"], sg["params"], strict=True)}  # fmt: skip
    try:
        header = json.dumps({"format": FORMAT, "class": type(opt).__name__, "param_groups": sd["param_groups"],
                             "steps": {str(i): s["step"] for i, s in sd["state"].items()}})  # fmt: skip
    except TypeError as err:
        raise TypeError(f"{caller}: parameter groups must hold JSON-serializable values ({err})") from None
    tensors = {
        f"state.{index_of[id(p)]}.{key}": value for p, state in opt.state.items() for key, value in state.items()
        if key != "step"
    }  # fmt: skip
    return tensors, {**(metadata or {}), METADATA_KEY: header}


def load_optimizer(opt: Optimizer8bit, path: str | os.PathLike) -> None:
    """Load a file written by `save_optimizer` into `opt` (same class and parameters),
    validating every entry as `load_state_dict` does. Raises `q8.FormatError` for a file
    that is not such a file, ValueError (naming the file) for a state that does not fit.

    Example:
        >>> q8.load_optimizer(opt, "opt.q8")
    """
    if not isinstance(opt, Optimizer8bit):
        raise TypeError(f"load_optimizer expects a q8.optim optimizer, got {type(opt).__name__}")
    with safe_open(path) as f:
        header = _header(f.metadata(), path)
        if header["class"] != type(opt).__name__:
            raise ValueError(f"{path}: state of a {header['class']}, cannot load it into {type(opt).__name__}")
        current = opt.param_groups + [{}] * len(header["param_groups"])  # a count mismatch is reported below
        groups = [_restore_tuples(saved, group) for saved, group in zip(header["param_groups"], current, strict=False)]
        state: dict[int, dict[str, Any]] = {int(i): {"step": step} for i, step in header["steps"].items()}
        params = [p for group in opt.param_groups for p in group["params"]]
        for name, value in read_tensors(f, copy=True).items():
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in state:
                raise FormatError(f"{path}: unexpected tensor {name!r} in an optimizer state file")
            if int(parts[1]) >= len(params):
                raise ValueError(f"{path}: state for parameter {parts[1]}, the optimizer has {len(params)} parameters")
            index, key = int(parts[1]), parts[2]
            try:
                state[index].update(pack_state({key: _checked(value)}, params[index]))
            except FormatError:
                raise
            except (ValueError, TypeError) as err:
                raise ValueError(f"{path}: tensor {name!r}: {err}") from None
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: {err}") from None


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
