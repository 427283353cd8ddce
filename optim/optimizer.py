"""`Optimizer8bit`: the base of every q8 optimizer. It owns the state representation
(8-bit `q8.QTensor` or fp32), the step loop, and the state dict; subclasses only declare
their state entries and write their update rule once, in fp32 torch ops.

State of one parameter: {"step": int, "seed": int, <name>: QTensor | fp32 Tensor, ...}. An
entry is 8-bit (codes + fp32 absmax, `blocksize` elements per block) when the parameter has
at least two dimensions and `min_8bit_size` elements (its global shape, if sharded) and
neither its group (`optim_bits=32`) nor the parameter (`override_32bit`) asks for 32 bits.
Signed entries use the "dynamic" code (nearest rounding), non-negative ones "udynamic_sq"
(stochastic rounding keyed by "seed", the parameter's index in the optimizer, the step and
the element's global index; docs/OPTIMIZER_STATE.md). A loaded entry in another table (older q8
or bitsandbytes state: "udynamic") keeps it until the next step re-encodes it. 8-bit state
is in the codec's row layout, a row being one slice along dim 0: no block crosses a row, so
the same bytes result whether the parameter is whole or split into rows over any number of
ranks (docs/OPTIMIZER_STATE.md). 1-D parameters keep fp32 state: no block layout of a
vector survives every split.

state_dict() layout (plain tensors and Python scalars; DTensors placed like a sharded
parameter, optim/sharded.py):
    {"state": {index: {"step": int, "seed": int,
                       <name>: uint8 codes or fp32 tensor, shaped like the parameter,
                       "<name>.absmax": fp32 (rows, K), K = ceil(row length / blocksize),
                       "<name>.code": str, "<name>.blocksize": int}},
     "param_groups": [{..hyperparameters.., "params": [index, ...]}]}
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ..codec import CODE_NAMES, QTensor, get_code, quantize
from ..codec.blockwise import BLOCKSIZES
from ..codec.layout import canonical_row_length, num_blocks
from . import sharded
from .fused import fused_step
from .norms import exact_norms
from .sharded import is_sharded, like, local, local_rows

_OVERRIDE_ATTR = "_q8_optim_bits"
LOADABLE_CODES = {"udynamic_sq": ("udynamic", "dynamic")}
"""Other tables a saved non-negative entry may be in (older q8 and bitsandbytes state): it
is decoded with its own table until the next step re-encodes it in the optimizer's."""

UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "amsgrad": ((False,), "AMSGrad has no 8-bit form in q8: use torch.optim.Adam/AdamW(amsgrad=True)"),
    "is_paged": (
        (False,),
        "q8 does not page optimizer state (8-bit state is already ~4x smaller); offload it with "
        "FSDP2's CPUOffloadPolicy if it does not fit",
    ),
    "percentile_clipping": ((100,), "clip gradients with torch.nn.utils.clip_grad_norm_ before step()"),
    "max_unorm": ((0, 0.0), "clip gradients with torch.nn.utils.clip_grad_norm_ before step()"),
    "block_wise": ((True,), "q8's 8-bit state is always blockwise: choose the block size with blocksize="),
    "args": ((None,), "pass optim_bits= and min_8bit_size= directly; q8.optim.override_32bit(param) per parameter"),
    "skip_zeros": ((False,), "not implemented in q8: drop it"),
    "foreach": ((None, False), "q8 chooses its kernels itself (fused C on CPU, Triton on CUDA): drop it"),
    "fused": ((None, False), "q8 chooses its kernels itself (fused C on CPU, Triton on CUDA): drop it"),
    "capturable": ((False,), "q8's step cannot be captured in a CUDA graph: drop it"),
    "differentiable": ((False,), "q8's step is not differentiable: drop it"),
}
"""Constructor arguments of bitsandbytes and torch.optim that q8 does not implement: the
values that ask for nothing (accepted and ignored), and what to use instead."""


def refuse_unsupported(cls: str, kwargs: dict[str, Any]) -> None:
    """TypeError for a keyword argument no q8 optimizer takes, saying what to use instead."""
    for key, value in kwargs.items():
        if key not in UNSUPPORTED:
            raise TypeError(f"{cls}.__init__() got an unexpected keyword argument {key!r}")
        harmless, instead = UNSUPPORTED[key]
        if not any(value is v or (type(value) is type(v) and value == v) for v in harmless):
            raise TypeError(f"{cls}: {key}={value!r} is not supported: {instead}")


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


def row_length(p: torch.Tensor) -> int:
    """Elements of one row (slice along dim 0) of `p`: the rows of its 8-bit state's block
    layout. The same for the whole parameter and for any shard of whole rows."""
    return math.prod(p.shape[1:])


def filled(value: float, code: str, blocksize: int, shape: torch.Size, row_length: int, device) -> QTensor:
    """`quantize` of a tensor filled with `value`, made without encoding on the device (so a
    first CUDA step never waits for it): every block has absmax |value| and the one code
    that a single element gets."""
    one = quantize(torch.tensor([float(value)]), code, blocksize)
    numel = math.prod(shape)
    codes = torch.full((numel,), int(one.codes[0]), dtype=torch.uint8, device=device)
    absmax = torch.full((num_blocks(numel, blocksize, row_length),), float(one.absmax[0]), device=device)
    return QTensor(codes, absmax, one.code, blocksize, shape, torch.float32, row_length)


def absmax_shape(p: torch.Tensor, blocksize: int) -> tuple[int, int]:
    """(rows, K): the shape of an 8-bit entry's absmax in the state dict, K blocks per row."""
    return p.shape[0], -(-row_length(p) // blocksize)


class Optimizer8bit(torch.optim.Optimizer):
    """Base class: 8-bit state storage, the step loop and (de)serialization.

    Subclasses set `defaults`, `state_codes(group)` and `update(...)`; optionally
    `init_value`, `torch_class` (the torch.optim counterpart for `to_torch_state_dict`),
    and `rule` with `hyper(group, step)` (and `slots(group)` where the rule's state order
    differs): the name of the same rule compiled for CPU and written for Triton
    (optim/_native.c, q8.kernels.optim), which then runs instead of `update`.

    Args:
        params: parameters or parameter groups, as for torch.optim.
        defaults: the subclass's hyperparameters.
        blocksize: elements per quantization block of 8-bit state (power of two, 64..4096).
        min_8bit_size: parameters with fewer elements keep fp32 state.
        optim_bits: 8 (default) or 32: fp32 state for every parameter (bitsandbytes'
            argument; per group too, and `override_32bit` per parameter).
        maximize: maximize the objective instead of minimizing it (torch.optim's argument;
            per group too).

    Every subclass takes these keyword arguments. Arguments of bitsandbytes and torch.optim
    that q8 does not implement (`is_paged`, `amsgrad`, ...) raise a TypeError saying what
    to use instead (`UNSUPPORTED`); their "off" values are accepted and ignored.
    """

    rule: ClassVar[str | None] = None
    torch_class: ClassVar[type[torch.optim.Optimizer] | None] = None

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        blocksize: int = 256,
        min_8bit_size: int = 4096,
        optim_bits: int = 8,
        maximize: bool = False,
        **unsupported: Any,
    ):
        name = type(self).__name__
        refuse_unsupported(name, unsupported)
        quantize(torch.zeros(1), "dynamic", blocksize)  # validates blocksize with the codec's own message
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"{name}: min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
        if optim_bits not in (8, 32):
            raise ValueError(f"{name}: optim_bits must be 8 or 32, got {optim_bits!r}")
        if not isinstance(maximize, bool):
            raise TypeError(f"{name}: maximize must be a bool, got {maximize!r}")
        self.blocksize = blocksize
        self.min_8bit_size = min_8bit_size
        self._shard_group = None  # the process group of the sharded parameter being updated, for `norms`
        self._reports: dict = {}  # device -> optim.cuda.DeviceReport: what the GPU kernels counted
        self._batches: dict = {}  # (device, group, signature) -> q8.kernels.optim.BatchTables
        super().__init__(params, {**defaults, "optim_bits": optim_bits, "maximize": maximize})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, plus: a sharded (DTensor) parameter must be placed `(Shard(0),)` on a
        1-D mesh (FSDP2's default); any other placement raises NotImplementedError naming it."""
        first = sum(len(g["params"]) for g in self.param_groups)
        super().add_param_group(param_group)
        for i, p in enumerate(self.param_groups[-1]["params"]):
            if is_sharded(p):
                sharded.check_supported(type(self).__name__, p, f"parameter {first + i}")

    # --- what a subclass defines -------------------------------------------------------

    def state_codes(self, group: dict) -> dict[str, str]:
        """State entries of a parameter in `group`: name -> code ("dynamic" for signed
        values, "udynamic_sq" for non-negative ones)."""
        raise NotImplementedError

    def slots(self, group: dict) -> tuple[str | None, ...]:
        """The state entries in the order the fused rule takes them (None: a slot the
        group does not use); by default those of `state_codes`."""
        return tuple(self.state_codes(group))

    def hyper(self, group: dict, step: int) -> list[float]:
        """The fused rule's per-step constants for `group` at step `step`: binary32 values
        (at most 12), as the rule's C and Triton forms read them."""
        raise NotImplementedError

    def init_value(self, name: str, group: dict) -> float:
        """Initial value of state entry `name` (0 unless the algorithm says otherwise)."""
        return 0.0

    def update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], group: dict, step: int):
        """The algorithm: update fp32 `p` and the fp32 state tensors in place, for step
        number `step` (1 on the first step). For a sharded parameter these are this rank's
        rows; a rule that needs whole-parameter norms takes them from `norms`."""
        raise NotImplementedError

    def norms(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """L2 norms of the whole parameter being updated and of tensors shaped like it (fp32
        0-d), for `update`: exact and independent of summation order (optim/norms.py), so
        a parameter sharded over any number of ranks gets the single process's bits (one
        MAX and one SUM all-reduce over its ranks)."""
        return exact_norms(tensors, self._shard_group)

    # --- state ---------------------------------------------------------------------------

    def is_8bit(self, p: torch.Tensor, group: dict) -> bool:
        """Whether `p`'s state is stored in 8 bits."""
        bits = getattr(p, _OVERRIDE_ATTR, group["optim_bits"])
        if bits not in (8, 32):
            raise ValueError(f"{type(self).__name__}: optim_bits must be 8 or 32, got {bits!r}")
        return bits == 8 and p.dim() >= 2 and math.prod(p.shape) >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        seed = next(i for i, q in enumerate(self._indexed_params()) if q is p)
        state: dict[str, Any] = {"step": 0, "seed": seed}
        eight = self.is_8bit(p, group)
        shape = local(p).shape
        for name, code in self.state_codes(group).items():
            value = self.init_value(name, group)
            if eight:
                state[name] = filled(value, code, self.blocksize, shape, row_length(p), p.device)
            else:
                state[name] = torch.full(shape, value, dtype=torch.float32, device=p.device)
        return state

    # torch.compiler.disable, importing torch._dynamo (150 MB) on first use rather than at
    # import (q8convert's memory bound); torch.optim's zero_grad uses the same decorator.
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step over every parameter with a gradient.

        A parameter whose gradient holds NaN or inf is skipped (parameter, state and step
        count untouched) with a RuntimeWarning, so one bad batch never poisons the state.
        Inside a `torch.compile`d function the step runs eagerly (a graph break): its
        compiled C and Triton kernels are already fused, and their bytes must not depend on
        a compiler.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group))
                work.append((p, grad, state, group))
        fused_step(self, work)
        return loss

    def report(self) -> None:
        """Wait for the GPU and report what its steps counted since the last report: a
        RuntimeWarning for skipped parameters (non-finite gradients), FloatingPointError for
        state that overflowed fp32. CPU steps report at once; CUDA steps never wait for the
        device, so they report a step or more late (optim/cuda.py), or here. `state_dict()`
        calls it."""
        for device_report in self._reports.values():
            device_report.poll(type(self).__name__, wait=True)

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

    def _packed_groups(self) -> list[dict[str, Any]]:
        """The parameter groups as torch.optim packs them: hyperparameters, parameter indices."""
        groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        return groups

    def state_dict(self) -> dict[str, Any]:
        """The state as plain tensors and Python scalars (see the module docstring): it
        loads with `torch.load(weights_only=True)` and records each entry's code and
        blocksize. 8-bit entries are shared, not copied.

        The last parameter group is a mark without parameters naming this class
        (`state_mark`): torch.optim's `load_state_dict` (and bitsandbytes') refuses a
        state dict whose number of groups differs from its own, so q8's state never loads
        silently as fp32 state into them (uint8 codes would become floats). q8 optimizers
        use it to refuse another optimizer's state."""
        self.report()
        index = {id(p): i for i, p in enumerate(self._indexed_params())}
        state = {index[id(p)]: pack_state(s, p) for p, s in self.state.items() if s}
        return {"state": state, "param_groups": [*self._packed_groups(), state_mark(type(self).__name__)]}

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
        saved_groups, origin = split_state_mark(state_dict["param_groups"])
        if origin is not None and origin != name:
            raise ValueError(f"{name}.load_state_dict: this is the state of a q8 {origin}, not of a {name}")
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
            if saved.get("amsgrad"):
                raise ValueError(f"{name}.load_state_dict: group {g} was saved with amsgrad=True, not supported")
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
        entries = self.state_codes(group)
        if unexpected := sorted(map(str, saved.keys() - _known_keys(entries))):
            raise ValueError(
                f"{where}: {unexpected[0]!r} is not an entry of {type(self).__name__}'s state "
                f"({', '.join(entries) or 'none'}): the state of another optimizer?"
            )
        eight = self.is_8bit(p, group)
        for i, (key, code) in enumerate(entries.items()):
            bnb_key = f"state{i + 1}"
            if key in saved:
                value = unpack_entry(saved, key, p, f"{where}, entry {key!r}")
            elif bnb_key in saved:
                value = unpack_bnb_entry(saved, i + 1, p, f"{where}, bitsandbytes entry {bnb_key!r}")
            else:
                raise ValueError(f"{where}: missing state entry {key!r}")
            if isinstance(value, QTensor):
                if value.code.name not in (code, *LOADABLE_CODES.get(code, ())):
                    raise ValueError(f"{where}, entry {key!r}: code {value.code.name!r}, this optimizer uses {code!r}")
                if not eight:  # e.g. a 1-D parameter's 8-bit state from an earlier q8: decoded, exactly
                    value = value.dequantize(torch.float32)
                elif value.row_length != canonical_row_length(value.numel(), value.blocksize, row_length(p)):
                    # Flat blocks (an earlier q8, bitsandbytes) that rows cut: one more rounding.
                    value = quantize(value.dequantize(torch.float32), code, value.blocksize, row_length=row_length(p))
            elif eight:  # fp32 state (e.g. torch.optim) -> 8-bit
                value = quantize(value, code, self.blocksize, row_length=row_length(p))
            state[key] = value.to(p.device)
        return state

    def to_torch_state_dict(self) -> dict[str, Any]:
        """This state as the matching torch.optim optimizer's state dict (fp32 moments in
        the parameter's dtype, tensor step counts), ready for its `load_state_dict`."""
        if self.torch_class is None:
            raise NotImplementedError(f"{type(self).__name__} has no torch.optim counterpart")
        packed_groups = self._packed_groups()
        torch_keys = self.torch_class([torch.nn.Parameter(torch.zeros(1))]).defaults
        state = {}
        for group, saved_group in zip(self.param_groups, packed_groups, strict=True):
            for p, index in zip(group["params"], saved_group["params"], strict=True):
                if not self.state.get(p):
                    continue
                entry = {"step": torch.tensor(float(int(self.state[p]["step"])))}
                for key in self.state_codes(group):
                    value = self.state[p][key]
                    value = value.dequantize(torch.float32) if isinstance(value, QTensor) else value
                    value = value.to(p.dtype, copy=True)
                    entry[key] = like(value, p) if is_sharded(p) else value
                state[index] = entry
        ours = set(self.defaults) - set(torch_keys)  # q8-only options such as optim_bits
        groups = [{k: v for k, v in g.items() if k not in ours} for g in packed_groups]
        return {"state": state, "param_groups": groups}


def _known_keys(entries: dict[str, str]) -> set[str]:
    """Keys a loadable state of one parameter may hold: the step and seed; per entry its q8 form
    (codes or fp32, absmax, code, blocksize; shard_rows of an earlier FSDP2 layout, refused
    with its own message) or bitsandbytes' (state, absmax, qmap by position)."""
    keys = {"step", "seed", "__bnb_optimizer_quant_state__"}
    for i, key in enumerate(entries, 1):
        keys |= {key, f"{key}.absmax", f"{key}.code", f"{key}.blocksize", f"{key}.shard_rows"}
        keys |= {f"state{i}", f"absmax{i}", f"qmap{i}"}
    return keys


STATE_MARK = "q8_optimizer"
"""Key of the parameter group without parameters that ends a q8 optimizer's state dict."""


def state_mark(cls: str) -> dict[str, Any]:
    """The last parameter group of a q8 optimizer's state dict (see `Optimizer8bit.state_dict`)."""
    note = (
        f"q8 8-bit optimizer state (uint8 codes + fp32 absmax per block): load it into q8.optim.{cls}; "
        f"{cls}.to_torch_state_dict() gives the state torch.optim loads"
    )
    return {"params": [], STATE_MARK: cls, "q8_note": note}


def split_state_mark(groups: list) -> tuple[list, str | None]:
    """(the parameter groups without the mark, the q8 class it names or None)."""
    if groups and isinstance(groups[-1], dict) and isinstance(groups[-1].get(STATE_MARK), str):
        return list(groups[:-1]), groups[-1][STATE_MARK]
    return list(groups), None


def pack_state(state: dict, p: torch.Tensor) -> dict:
    """One parameter's state as plain tensors and scalars (8-bit entries split in codes,
    absmax, code name and blocksize); DTensors placed like a sharded parameter."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key == "step":
            out[key] = int(value)  # a device tensor for CUDA parameters (optim/cuda.py)
        elif isinstance(value, QTensor):
            out.update(_pack_qtensor(key, value, p))
        elif is_sharded(p) and isinstance(value, torch.Tensor):
            out[key] = like(value, p)
        else:
            out[key] = value
    return out


def _pack_qtensor(key: str, qt: QTensor, p: torch.Tensor) -> dict:
    """8-bit entry `key` as codes shaped like `p` and absmax (rows, K). A QTensor in another
    block layout (a file of an earlier q8: flat blocks) is packed flat, as that q8 did, for
    `load_state_dict` to convert."""
    shape = local(p).shape
    codes, absmax = qt.codes, qt.absmax
    if (
        p.dim() >= 2
        and qt.shape == shape
        and qt.row_length == canonical_row_length(qt.numel(), qt.blocksize, row_length(p))
    ):
        rows, k = absmax_shape(p, qt.blocksize)
        codes, absmax = codes.view(shape), absmax.view(shape[0], k)
        if is_sharded(p):
            codes, absmax = like(codes, p), like(absmax, p, (rows, k))
    return {key: codes, f"{key}.absmax": absmax, f"{key}.code": qt.code.name, f"{key}.blocksize": qt.blocksize}


def unpack_entry(saved: dict, key: str, p: torch.Tensor, where: str) -> QTensor | torch.Tensor:
    """Rebuild and validate state entry `key` of parameter `p` (this rank's rows of it, if
    sharded) from a packed state: DTensors or full tensors.

    8-bit entries come back in the row layout, or, for flat codes with a 1-D absmax (the
    layout of q8 before the row layout), as the flat QTensor they are."""
    value = saved[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor, got {type(value).__name__}")
    if f"{key}.absmax" not in saved:  # a full-precision entry (q8 32-bit state or torch.optim)
        if not value.is_floating_point():
            raise ValueError(f"{where}: a full-precision entry must be floating point, got {value.dtype}")
        if value.shape != p.shape:
            raise ValueError(f"{where}: shape {tuple(value.shape)}, parameter has {tuple(p.shape)}")
        return (local_rows(value, p) if is_sharded(p) else value).to(torch.float32)
    code, blocksize, absmax = saved.get(f"{key}.code"), saved.get(f"{key}.blocksize"), saved[f"{key}.absmax"]
    if code not in CODE_NAMES:
        raise ValueError(f"{where}: unknown code {code!r}; expected one of {CODE_NAMES}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{where}: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if value.dtype != torch.uint8 or value.numel() != p.numel():
        raise ValueError(
            f"{where}: codes must be uint8 shaped like the parameter {tuple(p.shape)}, "
            f"got {value.dtype} {tuple(value.shape)}"
        )
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise ValueError(f"{where}: absmax must be a float32 tensor, got {getattr(absmax, 'dtype', type(absmax))}")
    try:
        if absmax.dim() == 1:  # flat blocks, from q8 before the row layout
            if is_sharded(p):
                raise ValueError(
                    "flat codes (saved by q8 before the row layout) do not load into a sharded parameter; "
                    "load them unsharded and save again"
                )
            return QTensor(value.reshape(-1), absmax, get_code(code), blocksize, p.shape, torch.float32)
        if value.shape != p.shape:
            raise ValueError(f"codes must be shaped like the parameter {tuple(p.shape)}, got {tuple(value.shape)}")
        if absmax.shape != absmax_shape(p, blocksize):
            old = f" (q8's earlier FSDP2 layout, {key}.shard_rows: export it with that q8's to_torch_state_dict)"
            raise ValueError(
                f"absmax must have shape {absmax_shape(p, blocksize)} (rows, blocks of {blocksize} per row), got "
                f"{tuple(absmax.shape)}{old if f'{key}.shard_rows' in saved else ''}"
            )
        if is_sharded(p):
            value, absmax = local_rows(value, p), local_rows(absmax, p)
        shape = local(p).shape
        return QTensor(
            value.reshape(-1), absmax.reshape(-1), get_code(code), blocksize, shape, torch.float32, row_length(p)
        )
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
