"""The checkpoints users already have: what each file of a checkpoint folder is, and their
tensors read one at a time. The one place that knows these layouts: q8convert
(`q8.tools`) and Q8Trainer (`q8.integrations.hf`) both take the file names from here.

- Hugging Face model folder: weights (`WEIGHTS_FILES`: model.safetensors, sharded with an
  index json or numbered shards without one, pytorch_model.bin, PEFT's
  adapter_model.safetensors), config, tokenizer and generation files.
- Trainer checkpoint: the same plus `optimizer.pt` (`TORCH_OPTIMIZER_FILE`), scheduler.pt,
  rng_state*.pth, trainer_state.json, training_args.bin.
- Q8Trainer checkpoint: `optimizer.q8` (`Q8_OPTIMIZER_FILE`) with a placeholder
  optimizer.pt that only makes a plain Trainer fail loudly; the weights as the Trainer
  writes them, or `model.q8` (`Q8_MODEL_FILE`).

safetensors files are parsed here and read with plain `readinto` rather than mmap: a
memory map keeps every page it has touched resident, so reading a 10 GB shard through
one would grow the process by 10 GB. Reading tensor by tensor keeps the peak at the
largest tensor.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Q8_MODEL_FILE",
    "Q8_OPTIMIZER_FILE",
    "SAFETENSORS_DTYPES",
    "SCHEDULER_FILE",
    "TORCH_OPTIMIZER_FILE",
    "WEIGHTS_FILES",
    "Checkpoint",
    "InputError",
    "SafetensorsFile",
    "TensorRef",
    "find_checkpoint",
    "load_torch_file",
    "safetensors_dtype",
    "safetensors_name",
    "shard_refs",
    "write_safetensors",
]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_NAMES = {d: n for n, d in SAFETENSORS_DTYPES.items()}


def safetensors_dtype(dtype: torch.dtype) -> str | None:
    """safetensors' name of `dtype` ("F32", "BF16", ...), None for dtypes it cannot hold."""
    return _SAFETENSORS_NAMES.get(dtype)


_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

WEIGHTS_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
"""Hugging Face weights file names (PEFT's adapters last), in the order a folder's weights
are looked for; then numbered shards without an index (`SHARD`)."""
SHARD = re.compile(r"(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.(?P<suffix>safetensors|bin)")
"""`model-00001-of-00003.safetensors`: the shards of one weights file."""
TORCH_OPTIMIZER_FILE = "optimizer.pt"
"""The Trainer's optimizer state (torch.save of `optimizer.state_dict()`)."""
SCHEDULER_FILE = "scheduler.pt"
"""The Trainer's learning-rate scheduler state."""
Q8_OPTIMIZER_FILE = "optimizer.q8"
"""Q8Trainer's optimizer state (`q8.save_optimizer`); its optimizer.pt is a placeholder."""
Q8_MODEL_FILE = "model.q8"
"""Q8Trainer's (model_weights="q8") and q8convert's weights of a model folder."""
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class InputError(Exception):
    """An input q8convert cannot read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorRef:
    """A tensor of a checkpoint, not yet read: its name, dtype, shape and how to read it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    read: Callable[[int, int], torch.Tensor] | None = None
    """`read(start, count)`: elements [start, start + count) of the flat tensor, read without
    the rest (None: slice what `load` gives, as for memory-mapped .pt files)."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsFile:
    """One .safetensors file: its header parsed and validated, tensors read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise InputError(f"{self.path}: not a safetensors file (only {size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise InputError(f"{self.path}: not a safetensors file (header length {n}, file size {size})")
                header = json.loads(f.read(n))
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {e.strerror or e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{self.path}: not a safetensors file (header is not JSON: {e})") from e
        if not isinstance(header, dict):
            raise InputError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        self.data_start = 8 + n
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self.entries[name] = self._entry(name, e, size - self.data_start)

    def _entry(self, name: str, e: Any, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            dtype = SAFETENSORS_DTYPES[e["dtype"]]
            shape = tuple(e["shape"])
            begin, end = e["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{self.path}: tensor {name!r}: malformed header entry {e!r}") from err
        if not ok or not begin <= end <= data_size or end - begin != math.prod(shape) * dtype.itemsize:
            raise InputError(
                f"{self.path}: tensor {name!r}: offsets {e['data_offsets']} do not fit shape {list(shape)} "
                f"{e['dtype']} in {data_size} data bytes"
            )
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        """Tensor names in file order (by offset), so reading them in turn reads the file once."""
        return sorted(self.entries, key=lambda k: self.entries[k][2])

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buf.numpy()) != end - begin:
                raise InputError(f"{self.path}: tensor {name!r}: file ends before its data")
        return buf.view(dtype).view(shape)

    def read_elements(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of tensor `name`, flat, reading only their bytes."""
        dtype, shape, begin, _ = self.entries[name]
        if not 0 <= start <= start + count <= math.prod(shape):
            raise ValueError(f"{self.path}: tensor {name!r}: elements [{start}, {start + count}) out of range")
        buf = torch.empty(count * dtype.itemsize, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin + start * dtype.itemsize)
            if f.readinto(buf.numpy()) != buf.numel():
                raise InputError(f"{self.path}: tensor {name!r}: file ends before its data")
        return buf.view(dtype)

    def refs(self) -> list[TensorRef]:
        return [
            TensorRef(k, *self.entries[k][:2], lambda k=k: self.read(k), lambda s, n, k=k: self.read_elements(k, s, n))
            for k in self.keys()
        ]


def load_torch_file(path: Path) -> Any:
    """`torch.load(weights_only=True, mmap=True)`: tensors and plain containers only.

    A pickle that needs code to load (a class, a function) is refused, never run.
    """
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) file
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((line for line in reason if "Unsupported global" in line), reason[0] if reason else "")
        raise InputError(
            f"{path}: refused: this pickle needs code to load ({detail.strip()}). q8convert only reads "
            "tensors and plain containers (torch.load(weights_only=True)); save a state_dict() or safetensors."
        ) from e
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    except Exception as e:  # torch raises RuntimeError/ValueError/EOFError on files that are not checkpoints
        raise InputError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def is_flat_state_dict(obj: Any) -> bool:
    """A dict of name -> tensor (model weights), as opposed to a nested object."""
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _torch_refs(path: Path) -> list[TensorRef]:
    sd = load_torch_file(path)
    if not is_flat_state_dict(sd):
        raise InputError(
            f"{path}: expected a state dict of name -> tensor, found a {type(sd).__name__} of other things"
        )
    return [TensorRef(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in sd.items()]


def _index_refs(path: Path) -> list[TensorRef]:
    """The tensors of a sharded checkpoint (`*.index.json` with a weight_map), shard by shard."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("names and files must be strings")
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: not a sharded checkpoint index (needs a 'weight_map' of name -> file): {e}") from e
    refs: list[TensorRef] = []
    for shard in shards:
        shard_path = path.parent / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise InputError(f"{path}: shard {shard!r} listed in the index is not a file next to it")
        shard_refs = file_refs(shard_path)
        wanted = {k for k, v in weight_map.items() if v == shard}
        found = {r.name for r in shard_refs}
        if missing := sorted(wanted - found):
            raise InputError(f"{shard_path}: tensor {missing[0]!r} listed in {path.name} is not in this shard")
        refs += [r for r in shard_refs if r.name in wanted]
    return refs


def file_refs(path: Path) -> list[TensorRef]:
    """The tensors of a weights file: .safetensors, a sharded *.index.json, or a .pt/.bin state dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        return _index_refs(path)
    if path.suffix == ".safetensors":
        return SafetensorsFile(path).refs()
    if path.suffix in TORCH_SUFFIXES:
        return _torch_refs(path)
    raise InputError(f"{path}: unknown checkpoint type (expected .safetensors, *.index.json, .pt, .pth or .bin)")


@dataclass
class Checkpoint:
    """What a Hugging Face model, Trainer or Q8Trainer checkpoint folder holds, by role.

    Attributes:
        weights: the files holding the weights, relative to the folder (an index json, one
            file, or numbered shards), converted as one set; empty if none.
        optimizer: "optimizer.pt" if it holds optimizer state (not Q8Trainer's placeholder).
        q8_files: files already in q8 (optimizer.q8, model.q8), carried over as they are.
        copies: every other file and folder, carried over unchanged.
    """

    weights: list[str]
    optimizer: str | None
    q8_files: list[str]
    copies: list[str]

    @property
    def is_training(self) -> bool:
        """A Trainer or Q8Trainer checkpoint (optimizer state), not just a model."""
        return self.optimizer is not None or Q8_OPTIMIZER_FILE in self.q8_files

    @property
    def weights_name(self) -> str | None:
        """The name the weights take in q8 (`model.q8`, `adapter_model.q8`)."""
        if not self.weights:
            return None
        first = self.weights[0]
        if m := SHARD.fullmatch(first):
            return f"{m.group('stem')}.q8"
        return safetensors_name(first).removesuffix(".safetensors") + ".q8"


def find_checkpoint(root: Path) -> Checkpoint:
    """Sort a folder's files into weights, optimizer state, q8 files and files carried over."""
    root = Path(root)
    names = sorted(p.name for p in root.iterdir())
    weights = []
    if index := next((w for w in WEIGHTS_FILES if w in names), None):
        weights = [index]
        if index.endswith(".index.json"):
            try:
                weights += sorted(set(json.loads((root / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
                raise InputError(f"{root / index}: not a sharded checkpoint index: {e}") from e
    else:
        weights = _numbered_shards(root, names)
    q8_files = [n for n in (Q8_OPTIMIZER_FILE, Q8_MODEL_FILE) if n in names]
    optimizer = TORCH_OPTIMIZER_FILE if TORCH_OPTIMIZER_FILE in names and Q8_OPTIMIZER_FILE not in names else None
    if not weights and optimizer is None and not q8_files:
        raise InputError(
            f"{root}: no checkpoint found in this folder (looked for {', '.join(WEIGHTS_FILES)}, numbered shards, "
            f"{TORCH_OPTIMIZER_FILE}, {Q8_OPTIMIZER_FILE}, {Q8_MODEL_FILE})"
        )
    copies = [n for n in names if n not in weights and n != optimizer and n not in q8_files]
    return Checkpoint(weights, optimizer, q8_files, copies)


def _numbered_shards(root: Path, names: list[str]) -> list[str]:
    """A complete set of numbered shards (`model-00001-of-00002.safetensors`, ...) without
    an index json; a set with a shard missing is an error, naming it."""
    found = [m for n in names if (m := SHARD.fullmatch(n))]
    if not found:
        return []
    stem, n, suffix = found[0].group("stem"), found[0].group("n"), found[0].group("suffix")
    expected = [f"{stem}-{i:05d}-of-{n}.{suffix}" for i in range(1, int(n) + 1)]
    if missing := [name for name in expected if name not in names]:
        raise InputError(f"{root / missing[0]}: shard missing (the folder has {found[0].string} and no index json)")
    return expected


def shard_refs(root: Path, shards: list[str]) -> list[TensorRef]:
    """The tensors of numbered shards without an index, shard by shard; a name in two shards is an error."""
    refs: list[TensorRef] = []
    seen: dict[str, str] = {}
    for shard in shards:
        for ref in file_refs(root / shard):
            if ref.name in seen:
                raise InputError(f"{root / shard}: tensor {ref.name!r} is also in {seen[ref.name]}")
            seen[ref.name] = shard
            refs.append(ref)
    return refs


def safetensors_name(source: str) -> str:
    """The safetensors file that Hugging Face looks for in place of weights file `source`."""
    stem = source.removesuffix(".index.json")
    stem = stem[: -len(Path(stem).suffix)] if Path(stem).suffix else stem
    return ("model" if stem == "pytorch_model" else stem) + ".safetensors"


def write_safetensors(
    path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors: Iterator[torch.Tensor], metadata=None
) -> None:
    """Write a safetensors file from tensors produced one at a time, in `entries` order.

    The header is computed from the declared names, dtypes and shapes first, so no more
    than one tensor is ever held.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in _SAFETENSORS_NAMES:
            raise InputError(f"{path}: tensor {name!r}: safetensors cannot hold {dtype}")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (name, dtype, shape), t in zip(entries, tensors, strict=True):
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise InputError(
                    f"{path}: tensor {name!r} is {t.dtype} {list(t.shape)}, declared {dtype} {list(shape)}"
                )
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
