"""`Optimizer8bit`: the base of every q8 optimizer. It owns the state representation
(8-bit `q8.QTensor` or fp32), the step loop, and the state dict; subclasses only declare
their state entries and write their update rule once, in fp32 torch ops.

State of one parameter: {"step": int, "seed": int, <name>: QTensor | fp32 Tensor, ...}. An
entry is 8-bit (codes + fp32 absmax, `blocksize` elements per block) when the parameter has
at least `min_8bit_size` elements and neither its group (`optim_bits=32`) nor the parameter
(`override_32bit`) asks for 32 bits. Signed entries use the "dynamic" code (nearest
rounding), non-negative ones "udynamic_sq" (stochastic rounding keyed by "seed", the
parameter's index in the optimizer, and the step). A loaded entry in another table (older
q8 or bitsandbytes state: "udynamic") keeps it until the next step re-encodes it.

state_dict() layout (plain tensors and Python scalars only):
    {"state": {index: {"step": int, "seed": int,
                       <name>: uint8 codes (flat) or fp32 tensor (param shape),
                       "<name>.absmax": fp32, "<name>.code": str, "<name>.blocksize": int}},
     "param_groups": [{..hyperparameters.., "params": [index, ...]}]}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ..codec import CODE_NAMES, QTensor, get_code, quantize
from . import sharded
from .fused import fused_update
from .sharded import all_finite, is_sharded, local

_OVERRIDE_ATTR = "_q8_optim_bits"
LOADABLE_CODES = {"udynamic_sq": ("udynamic", "dynamic")}
"""Other tables a saved non-negative entry may be in (older q8 and bitsandbytes state): it
is decoded with its own table until the next step re-encodes it in the optimizer's."""


def override_32bit(param: torch.Tensor) -> torch.Tensor:
    """Keep fp32 optimizer state for `param` (e.g. an embedding weight) in every q8
    optimizer. Call before the optimizer's first step. Returns `param`.

    Example:
        >>> q8.optim.override_32bit(model.embed.weight)
    """
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"override_32bit expects a parameter tensor, got {type(param).__name__}")
    setattr(param, _OVERRIDE_ATTR, 32)
    return param


def global_numel(p: torch.Tensor) -> int:
    """Elements of the full parameter: the global shape for a sharded (DTensor) parameter,
    so the 8-bit/32-bit decision never depends on how it was sharded."""
    return math.prod(p.shape)


class Optimizer8bit(torch.optim.Optimizer):
    """Base class: 8-bit state storage, the step loop and (de)serialization.

    Subclasses set `defaults`, `state_codes(group)` and `update(...)`; optionally
    `native_kind` (a compiled CPU kernel for the rule), `torch_class` (the torch.optim
    counterpart for `to_torch_state_dict`) and `init_value`.

    Args:
        params: parameters or parameter groups, as for torch.optim.
        defaults: hyperparameters; every group may also set `optim_bits` (8 or 32).
        blocksize: elements per quantization block of 8-bit state (power of two, 64..4096).
        min_8bit_size: parameters with fewer elements keep fp32 state.
    """

    native_kind: ClassVar[str | None] = None
    elementwise: ClassVar[bool] = True
    """Whether the update of an element depends on no other element (False for LAMB and
    LARS, whose trust ratio needs whole-parameter norms): only such optimizers shard."""
    torch_class: ClassVar[type[torch.optim.Optimizer] | None] = None

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, blocksize: int = 256, min_8bit_size: int = 4096):
        quantize(torch.zeros(1), "dynamic", blocksize)  # validates blocksize with the codec's own message
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
        self.blocksize = blocksize
        self.min_8bit_size = min_8bit_size
        super().__init__(params, {**defaults, "optim_bits": 8})

    # --- what a subclass defines -------------------------------------------------------

    def state_codes(self, group: dict) -> dict[str, str]:
        """State entries of a parameter in `group`: name -> code ("dynamic" for signed
        values, "udynamic_sq" for non-negative ones)."""
        raise NotImplementedError

    def init_value(self, name: str, group: dict) -> float:
        """Initial value of state entry `name` (0 unless the algorithm says otherwise)."""
        return 0.0

    def update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], group: dict, step: int):
        """The algorithm: update fp32 `p` and the fp32 state tensors in place, for step
        number `step` (1 on the first step)."""
        raise NotImplementedError

    # --- state ---------------------------------------------------------------------------

    def is_8bit(self, p: torch.Tensor, group: dict) -> bool:
        """Whether `p`'s state is stored in 8 bits."""
        bits = getattr(p, _OVERRIDE_ATTR, group["optim_bits"])
        if bits not in (8, 32):
            raise ValueError(f"{type(self).__name__}: optim_bits must be 8 or 32, got {bits!r}")
        return bits == 8 and global_numel(p) >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        seed = next(i for i, q in enumerate(self._indexed_params()) if q is p)
        state: dict[str, Any] = {"step": 0, "seed": seed}
        eight = self.is_8bit(p, group)
        if is_sharded(p):
            sharded.check_supported(self, p)
        for name, code in self.state_codes(group).items():
            value = torch.full(local(p).shape, self.init_value(name, group), dtype=torch.float32, device=p.device)
            state[name] = quantize(value, code, self.blocksize) if eight else value
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step over every parameter with a gradient.

        A parameter whose gradient holds NaN or inf is skipped (parameter, state and step
        count untouched) with a RuntimeWarning, so one bad batch never poisons the state.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group))
                if not all_finite(grad):
                    warnings.warn(
                        f"{type(self).__name__}: non-finite gradient for a parameter of shape {tuple(p.shape)}; "
                        f"its update was skipped (state and step count unchanged)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
                state["step"] += 1
                offset = sharded.first_element(p) if is_sharded(p) else 0
                fused_update(self, local(p), local(grad), state, group, offset)
        return loss

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer state (codes + absmax for 8-bit entries)."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, QTensor):
                    total += value.nbytes
                elif isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    # --- state dict ------------------------------------------------------------------------

    def _indexed_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The state as plain tensors and Python scalars (see the module docstring): it
        loads with `torch.load(weights_only=True)` and records each entry's code and
        blocksize. 8-bit entries are shared, not copied."""
        params = self._indexed_params()
        index = {id(p): i for i, p in enumerate(params)}
        groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        state = {index[id(p)]: pack_state(s, p) for p, s in self.state.items() if s}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from this class (exact), from the matching torch.optim
        optimizer (fp32 state, quantized here) or from bitsandbytes' 8-bit optimizer (codes
        taken as they are: the tables are identical). Validates every entry against its
        parameter; never casts codes or absmax. Raises ValueError on any mismatch, leaving
        the optimizer unchanged. Saved group entries are taken as torch does (keys this
        optimizer does not use, e.g. torch's `foreach`, are kept and ignored)."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}.load_state_dict: {len(saved_groups)} parameter groups saved, optimizer has "
                f"{len(self.param_groups)}"
            )
        new_groups, owner = [], {}
        for g, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{name}.load_state_dict: group {g} has {len(saved['params'])} parameters saved, "
                    f"optimizer has {len(group['params'])}"
                )
            for flag in ("amsgrad", "maximize"):
                if saved.get(flag):
                    raise ValueError(f"{name}.load_state_dict: group {g} was saved with {flag}=True, not supported")
            new_group = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            new_groups.append(new_group)
            owner.update((i, (p, new_group)) for i, p in zip(saved["params"], group["params"], strict=True))
        new_state = {}
        for index, saved in state_dict["state"].items():
            if index not in owner:
                raise ValueError(f"{name}.load_state_dict: state for unknown parameter index {index!r}")
            p, group = owner[index]
            where = f"{name}.load_state_dict: parameter {index} (shape {tuple(p.shape)})"
            new_state[p] = self._unpack_state(saved, p, group, where, seed=index)
        for group, new_group in zip(self.param_groups, new_groups, strict=True):
            group.update(new_group)
        self.state.clear()
        self.state.update(new_state)

    def _unpack_state(self, saved: dict, p: torch.Tensor, group: dict, where: str, seed: int) -> dict:
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: state must be a dict, got {type(saved).__name__}")
        if "__bnb_optimizer_quant_state__" in saved:  # bitsandbytes >= 0.45 nests its 8-bit entries
            saved = {**saved, **saved["__bnb_optimizer_quant_state__"]}
        step = saved.get("step", 0)
        step = int(step.item()) if isinstance(step, torch.Tensor) else step
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: 'step' must be a non-negative int, got {step!r}")
        seed = saved.get("seed", seed)  # absent from torch.optim and bitsandbytes state: the index
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ValueError(f"{where}: 'seed' must be an int in [0, 2**32), got {seed!r}")
        state: dict[str, Any] = {"step": step, "seed": seed}
        eight = self.is_8bit(p, group)
        for i, (key, code) in enumerate(self.state_codes(group).items()):
            bnb_key = f"state{i + 1}"
            if key in saved:
                entry = f"{where}, entry {key!r}"
                if is_sharded(p) and f"{key}.absmax" in saved:
                    value = sharded.unpack_entry(saved, key, p, self.blocksize, entry)
                else:
                    value = local(unpack_entry(saved, key, p, entry))
            elif bnb_key in saved:
                value = unpack_bnb_entry(saved, i + 1, p, f"{where}, bitsandbytes entry {bnb_key!r}")
            else:
                raise ValueError(f"{where}: missing state entry {key!r}")
            if isinstance(value, QTensor) and value.code.name not in (code, *LOADABLE_CODES.get(code, ())):
                raise ValueError(f"{where}, entry {key!r}: code {value.code.name!r}, this optimizer uses {code!r}")
            if isinstance(value, QTensor) and not eight:
                raise ValueError(f"{where}, entry {key!r}: saved in 8 bits but this parameter keeps 32-bit state")
            if not isinstance(value, QTensor) and eight:
                value = quantize(value, code, self.blocksize)  # fp32 state (e.g. torch.optim) -> 8-bit
            state[key] = value.to(p.device)
        return state

    def to_torch_state_dict(self) -> dict[str, Any]:
        """This state as the matching torch.optim optimizer's state dict (fp32 moments in
        the parameter's dtype, tensor step counts), ready for its `load_state_dict`."""
        if self.torch_class is None:
            raise NotImplementedError(f"{type(self).__name__} has no torch.optim counterpart")
        sd = self.state_dict()
        torch_keys = self.torch_class([torch.nn.Parameter(torch.zeros(1))]).defaults
        state = {}
        for group, saved_group in zip(self.param_groups, sd["param_groups"], strict=True):
            for p, index in zip(group["params"], saved_group["params"], strict=True):
                if not self.state.get(p):
                    continue
                entry = {"step": torch.tensor(float(self.state[p]["step"]))}
                for key in self.state_codes(group):
                    value = self.state[p][key]
                    value = value.dequantize(torch.float32) if isinstance(value, QTensor) else value
                    value = value.to(p.dtype, copy=True)
                    entry[key] = sharded.like(value, p) if is_sharded(p) else value
                state[index] = entry
        ours = set(self.defaults) - set(torch_keys)  # q8-only options such as optim_bits
        groups = [{k: v for k, v in g.items() if k not in ours} for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}


def pack_state(state: dict, p: torch.Tensor) -> dict:
    """One parameter's state as plain tensors and scalars (8-bit entries split in codes,
    absmax, code name and blocksize); DTensors for a sharded parameter (optim/sharded.py)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if is_sharded(p) and isinstance(value, QTensor):
            out.update(sharded.pack_entry(key, value, p))
        elif is_sharded(p) and isinstance(value, torch.Tensor):
            out[key] = sharded.like(value, p)
        elif isinstance(value, QTensor):
            out[key] = value.codes
            out[f"{key}.absmax"] = value.absmax
            out[f"{key}.code"] = value.code.name
            out[f"{key}.blocksize"] = value.blocksize
        else:
            out[key] = value
    return out


def unpack_entry(saved: dict, key: str, p: torch.Tensor, where: str) -> QTensor | torch.Tensor:
    """Rebuild and validate state entry `key` of parameter `p` from a packed state."""
    value = saved[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor, got {type(value).__name__}")
    if f"{key}.absmax" not in saved:  # a full-precision entry (q8 32-bit state or torch.optim)
        if not value.is_floating_point():
            raise ValueError(f"{where}: a full-precision entry must be floating point, got {value.dtype}")
        if value.shape != p.shape:
            raise ValueError(f"{where}: shape {tuple(value.shape)}, parameter has {tuple(p.shape)}")
        return value.to(torch.float32)
    code, blocksize, absmax = saved.get(f"{key}.code"), saved.get(f"{key}.blocksize"), saved[f"{key}.absmax"]
    if code not in CODE_NAMES:
        raise ValueError(f"{where}: unknown code {code!r}; expected one of {CODE_NAMES}")
    if value.dtype != torch.uint8 or value.dim() != 1 or value.numel() != p.numel():
        raise ValueError(
            f"{where}: codes must be flat uint8 with {p.numel()} elements, got {value.dtype} {tuple(value.shape)}"
        )
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise ValueError(f"{where}: absmax must be a float32 tensor, got {getattr(absmax, 'dtype', type(absmax))}")
    try:
        return QTensor(value, absmax, get_code(code), blocksize, p.shape, torch.float32)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def unpack_bnb_entry(saved: dict, i: int, p: torch.Tensor, where: str) -> QTensor | torch.Tensor:
    """State entry `i` (1 or 2) of a bitsandbytes optimizer: `state{i}` is fp32 (small
    parameters) or uint8 codes with `absmax{i}` and table `qmap{i}` (its signed or unsigned
    dynamic map, q8's "dynamic" and "udynamic"). bitsandbytes does not record its blocksize;
    it is inferred from the number of absmax values (256 preferred)."""
    value = saved[f"state{i}"]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor, got {type(value).__name__}")
    if value.dtype != torch.uint8:
        return unpack_entry({"s": value}, "s", p, where)
    if value.numel() != p.numel():
        raise ValueError(f"{where}: {value.numel()} codes for a parameter of {p.numel()} elements")
    qmap, absmax = saved.get(f"qmap{i}"), saved.get(f"absmax{i}")
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise ValueError(f"{where}: absmax{i} must be a 1-D float32 tensor")
    qmap = qmap.detach().cpu().float() if isinstance(qmap, torch.Tensor) else None
    table = next((t for t in map(get_code, ("dynamic", "udynamic")) if torch.equal(qmap, t.values)), None)
    if qmap is None or table is None:
        raise ValueError(f"{where}: qmap{i} is not a dynamic table; only bitsandbytes' dynamic maps load losslessly")
    n, nblocks = p.numel(), absmax.numel()
    candidates = [b for b in (256, 64, 128, 512, 1024, 2048, 4096) if -(-n // b) == nblocks]
    if not candidates:
        raise ValueError(f"{where}: {nblocks} absmax values match no blocksize for {n} elements")
    if 256 not in candidates and len(candidates) > 1:
        raise ValueError(f"{where}: blocksize is ambiguous ({candidates}) for {nblocks} absmax values")
    return QTensor(value.reshape(-1), absmax, table, candidates[0], p.shape, torch.float32)
