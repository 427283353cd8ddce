"""The checkpoints users already have, read one tensor at a time: safetensors (single or
sharded), PyTorch `.pt`/`.bin` (weights_only pickles only) and Hugging Face model and
Trainer folders; and safetensors written back out the same way.

safetensors files are parsed here and read with plain `readinto` rather than mmap: a
memory map keeps every page it has touched resident, so reading a 10 GB shard through
one would grow the process by 10 GB. Reading tensor by tensor keeps the peak at the
largest tensor.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SAFETENSORS_DTYPES",
    "Checkpoint",
    "InputError",
    "SafetensorsFile",
    "TensorRef",
    "find_checkpoint",
    "load_torch_file",
    "safetensors_name",
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
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

WEIGHTS_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
"""Hugging Face weights file names, in the order a folder's weights are looked for."""
OPTIMIZER_FILE = "optimizer.pt"
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
    """What a Hugging Face model or Trainer checkpoint folder holds, by role.

    Attributes:
        weights: the weights file (or index) that is converted, relative to the folder.
        optimizer: "optimizer.pt" if present.
        copies: every other file and folder (not the weights' shards), carried over unchanged.
    """

    weights: str | None
    optimizer: str | None
    copies: list[str]


def find_checkpoint(root: Path) -> Checkpoint:
    """Sort a folder's files into weights, optimizer state and files carried over."""
    root = Path(root)
    names = sorted(p.name for p in root.iterdir())
    weights = next((w for w in WEIGHTS_FILES if w in names), None)
    parts = []
    if weights is not None:
        parts = [weights]
        if weights.endswith(".index.json"):
            try:
                parts += sorted(set(json.loads((root / weights).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
                raise InputError(f"{root / weights}: not a sharded checkpoint index: {e}") from e
    optimizer = OPTIMIZER_FILE if OPTIMIZER_FILE in names else None
    if weights is None and optimizer is None:
        raise InputError(
            f"{root}: no checkpoint found in this folder (looked for {', '.join(WEIGHTS_FILES)}, {OPTIMIZER_FILE})"
        )
    copies = [n for n in names if n not in parts and n != optimizer]
    return Checkpoint(weights, optimizer, copies)


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
