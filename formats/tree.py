"""Nested state (`q8.save` / `q8.load`) as msgpack, with tensors stored as named records.

The structure is packed with msgpack: dict (str or int keys), list, str, int (64-bit),
float, bool, None and bytes as themselves; a tuple as ext type 2 (its packed items); a
tensor or QTensor as ext type 1 whose payload is the UTF-8 name of its record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import torch

from ..codec import QTensor
from .container import MAX_NAME_BYTES, check_storable

__all__ = ["pack_tree", "unpack_tree"]

EXT_TENSOR, EXT_TUPLE = 1, 2
_INT_RANGE = (-(1 << 63), (1 << 64) - 1)
_MAX_DEPTH = 128  # levels of dicts, lists and tuples; saving recurses once per level


def pack_tree(obj: Any) -> tuple[bytes, dict[str, torch.Tensor | QTensor]]:
    """(msgpack bytes, tensors by record name). Raises TypeError/ValueError on anything
    that cannot be stored, before the caller writes a byte. Names follow the key path
    ("state.0.exp_avg"); the same tensor object seen twice is stored once."""
    tensors: dict[str, torch.Tensor | QTensor] = {}
    by_id: dict[int, str] = {}

    def name_for(x: torch.Tensor | QTensor, path: str) -> str:
        if id(x) in by_id:
            return by_id[id(x)]
        name, i = path or "tensor", 1
        while name in tensors:
            name, i = f"{path}#{i}", i + 1
        by_id[id(x)] = name
        tensors[name] = x
        return name

    def convert(x: Any, path: str, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise ValueError(f"q8.save: object nested deeper than {_MAX_DEPTH} levels at {path!r}")
        if x is None or isinstance(x, (bool, float, str, bytes)):
            return x
        if isinstance(x, int):
            if not _INT_RANGE[0] <= x <= _INT_RANGE[1]:
                raise ValueError(f"q8.save: int at {path!r} does not fit in 64 bits")
            return x
        if isinstance(x, QTensor):
            return msgpack.ExtType(EXT_TENSOR, name_for(x, path).encode())
        if isinstance(x, torch.Tensor):
            check_storable(x, f"q8.save: tensor at {path!r}")
            return msgpack.ExtType(EXT_TENSOR, name_for(x, path).encode())
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(
                        f"q8.save: dict key {k!r} at {path!r} is {type(k).__name__}; keys must be str or int"
                    )
                out[convert(k, path, depth + 1)] = convert(v, f"{path}.{k}" if path else str(k), depth + 1)
            return out
        if isinstance(x, list):
            return [convert(v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(x)]
        if isinstance(x, tuple):
            items = [convert(v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(x)]
            return msgpack.ExtType(EXT_TUPLE, msgpack.packb(items, use_bin_type=True))
        raise TypeError(
            f"q8.save: cannot store {type(x).__name__} at {path!r}; supported: dict, list, tuple, str, int, "
            "float, bool, None, bytes, torch.Tensor, q8.QTensor (no pickle)"
        )

    packed = msgpack.packb(convert(obj, "", 0), use_bin_type=True)
    for name in tensors:
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"q8.save: key path too long for a tensor name: {name[:80]!r}...")
    return packed, tensors


class _Packed(bytes):
    """A tuple's still packed items, met while unpacking its parent."""


def unpack_tree(blob: bytes, load: Callable[[str], Any]) -> Any:
    """Inverse of `pack_tree`; `load(name)` returns the tensor of a record. Raises
    ValueError/KeyError (the caller turns them into FormatError) on anything malformed,
    including nesting deeper than `pack_tree` allows.

    A tuple's items are a msgpack document of their own (an ext payload). They are unpacked
    one level at a time from an explicit work list, never by msgpack calling back into
    msgpack, so no file can exhaust the C stack; tuples are then built bottom-up."""

    def ext_hook(code: int, data: bytes) -> Any:
        if code == EXT_TENSOR:
            return load(data.decode("utf-8"))
        if code == EXT_TUPLE:
            return _Packed(data)
        raise ValueError(f"unknown msgpack ext type {code}")

    def pairs_hook(pairs: list[tuple[Any, Any]]) -> dict:
        out = {}
        for k, v in pairs:
            if not isinstance(k, (str, int)) or isinstance(k, bool) or k in out:
                raise ValueError(f"bad or duplicate dict key {k!r:.80}")
            out[k] = v
        return out

    def unpack(data: bytes) -> Any:
        try:
            return msgpack.unpackb(
                data, raw=False, strict_map_key=False, ext_hook=ext_hook, object_pairs_hook=pairs_hook, use_list=True
            )
        except msgpack.StackError:
            raise ValueError(f"structure nested deeper than {_MAX_DEPTH} levels") from None

    root = [unpack(blob)]
    visited, todo = [], [(root, 0)]  # containers (lists, dicts, tuples' item lists) and their depth
    tuples = set()  # ids of the item lists that become tuples
    while todo:
        node, depth = todo.pop()
        if depth > _MAX_DEPTH + 1:
            raise ValueError(f"structure nested deeper than {_MAX_DEPTH} levels")
        visited.append(node)
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(v, _Packed):
                v = node[k] = unpack(v)
                if not isinstance(v, list):
                    raise ValueError("tuple payload is not an array")
                tuples.add(id(v))
            if isinstance(v, (list, dict)):
                todo.append((v, depth + 1))
    for node in reversed(visited):  # children before their parents
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            if id(v) in tuples and isinstance(v, list):
                node[k] = tuple(v)
    return root[0]
