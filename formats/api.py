"""The public save/load API of the q8 container (re-exported at `q8`).

`save_file` / `load_file` / `safe_open` for flat dicts of tensors (like safetensors),
`save` / `load` for nested state, `verify` for checksums. A sharded checkpoint is a set of
q8 files plus a Hugging Face style `<path>.index.json`; every reader accepts either.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..codec import Code, QTensor
from ..codec.blockwise import FLOAT_DTYPES
from .atomic import TempFile, fsync_dir
from .background import SaveFuture, save_in_background
from .container import BytesWriter, FormatError, Reader, Writer, _check_str_map, _pool, check_storable, stored_as_is
from .planes import map_all
from .tree import pack_tree, unpack_tree

__all__ = [
    "async_save",
    "async_save_file",
    "load",
    "load_bytes",
    "load_file",
    "read_tensors",
    "safe_open",
    "save",
    "save_bytes",
    "save_file",
    "verify",
]

INDEX_SUFFIX = ".index.json"
MIN_QUANTIZE_NUMEL = 4096
"""save_file(quantize=True) keeps float tensors smaller than this exact (norms, biases)."""

_LARGE_TENSOR_BYTES = 4 << 20  # read_tensors reads larger tensors one at a time
Tensors = Mapping[str, "torch.Tensor | QTensor"]


# -- saving ------------------------------------------------------------------------------


def save_file(
    tensors: Tensors,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    quantize: bool | Callable[[str, torch.Tensor], bool] = False,
    code: str | Code = "auto",
    blocksize: int = 2048,
    max_shard_size: int | str | None = None,
    compress_codes: bool = True,
) -> None:
    """Save a flat dict of tensors (and QTensors) to a q8 file, atomically.

    Args:
        tensors: name -> tensor of any supported dtype, or QTensor (stored as is).
        path: destination; with sharding, the shards are `<stem>-00001-of-0000N<suffix>`
            next to it and the index is `<path>.index.json`.
        metadata: user str -> str metadata.
        quantize: False (lossless: floats byte-plane + zstd compressed), True (float
            tensors of at least `MIN_QUANTIZE_NUMEL` finite elements are quantized; small,
            integer, bool and non-finite tensors stay exact), or a policy
            `(name, tensor) -> bool` choosing which float tensors to quantize.
        code, blocksize: the codec settings for quantized tensors (see `q8.quantize`).
        max_shard_size: bytes per shard (int, or "500MB", "5GB", "2GiB"), counted before
            zstd; None writes one file.
        compress_codes: entropy-code 8-bit tensors (codes and absmax) where that saves 3%
            or more; False stores them as they are, faster to write and read (what
            `q8.save_optimizer` does by default).

    Raises:
        TypeError / ValueError: an unsupported value, non-str key or bad argument, or
            tensors that share memory (tied weights: `q8.save_model` stores them once),
            before anything is written.

    Example:
        >>> q8.save_file({"w": torch.randn(1024, 1024)}, "m.q8", metadata={"step": "10"})
        >>> q8.save_file({"w": torch.randn(1024, 1024)}, "m8.q8", quantize=True, blocksize=256)
    """
    metadata = check_save_file_args(tensors, path, metadata, code, blocksize, max_shard_size)
    items = [(name, _plan(name, x, quantize)) for name, x in tensors.items()]
    shards = _shard(items, _parse_size(max_shard_size))
    path = Path(path)
    writer = {"code": code, "blocksize": blocksize, "compress_codes": compress_codes}
    if len(shards) == 1:
        _write(path, shards[0], metadata, writer)
        return
    names = [
        path.with_name(f"{path.stem}-{i:05d}-of-{len(shards):05d}{path.suffix}") for i in range(1, len(shards) + 1)
    ]
    for shard_path, shard in zip(names, shards, strict=True):
        _write(shard_path, shard, metadata, writer)
    index = {
        "metadata": {**metadata, "format": "q8", "total_size": sum(_stored_estimate(x, q) for _, (x, q) in items)},
        "weight_map": {name: p.name for p, shard in zip(names, shards, strict=True) for name, _ in shard},
    }
    _atomic_write_text(Path(f"{path}{INDEX_SUFFIX}"), json.dumps(index, indent=2))
    if path.is_file():  # a stale single-file checkpoint would shadow the new shards
        path.unlink()


def check_save_file_args(
    tensors: Tensors,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None,
    code: str | Code,
    blocksize: int,
    max_shard_size: int | str | None,
) -> dict[str, str]:
    """TypeError/ValueError for any argument `save_file` cannot take (nothing is written);
    the metadata as a dict."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"save_file expects a dict of tensors, got {type(tensors).__name__}")
    metadata = _check_str_map(metadata, "metadata")
    for name, x in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"save_file: tensor names must be non-empty str, got {name!r}")
        if not isinstance(x, QTensor):
            check_storable(x, f"save_file: tensor {name!r}")
    if shared := shared_groups({k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}):
        raise ValueError(
            f"save_file: tensors {', '.join(map(repr, shared[0]))} share memory (tied weights?): stored apart "
            "they would load untied. Save a model with q8.save_model(model, path), which stores them once and "
            "q8.load_model restores the tie, or save copies (.clone())."
        )
    Writer(path, code=code, blocksize=blocksize)  # validates code and blocksize
    _parse_size(max_shard_size)
    return metadata


def save_bytes(
    tensors: Tensors,
    metadata: Mapping[str, str] | None = None,
    *,
    quantize: bool | Callable[[str, torch.Tensor], bool] = False,
    code: str | Code = "auto",
    blocksize: int = 2048,
    compress_codes: bool = True,
) -> bytes:
    """`save_file` into memory: the bytes of a q8 file (safetensors' `save`). Named apart
    from `q8.save(obj, path)`, which saves nested state to a file.

    Example:
        >>> data = q8.save_bytes({"w": torch.randn(1024, 1024)})
        >>> q8.load_bytes(data)["w"]
    """
    metadata = check_save_file_args(tensors, "<bytes>", metadata, code, blocksize, None)
    writer = BytesWriter(metadata, code=code, blocksize=blocksize, compress_codes=compress_codes)
    try:
        for name, x in tensors.items():
            x, quantized = _plan(name, x, quantize)
            writer.add(name, x, lossless=not quantized)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def load_bytes(data: bytes | bytearray | memoryview, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a q8 file held in memory (`save_bytes`, or a file's bytes), decoded,
    on `device` (safetensors' `load`). Raises `q8.FormatError` on any corrupt input.

    Example:
        >>> tensors = q8.load_bytes(data)
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"load_bytes expects bytes, got {type(data).__name__}")
    with Reader("<bytes>", device, data=data) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def shared_groups(tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names of tensors whose bytes overlap, in groups of two or more, each in the order of
    `tensors` (safetensors' rule: views of disjoint parts of one storage do not count)."""
    by_storage: dict[tuple, list[tuple[int, int, str]]] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
            continue
        start = t.storage_offset() * t.element_size()
        reach = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) + 1
        key = (t.device, t.untyped_storage().data_ptr())
        by_storage.setdefault(key, []).append((start, start + reach * t.element_size(), name))
    order = {name: i for i, name in enumerate(tensors)}
    groups = []
    for spans in by_storage.values():
        spans.sort()
        group, end = [spans[0][2]], spans[0][1]
        for start, stop, name in spans[1:]:
            if start < end:
                group.append(name)
            else:
                if len(group) > 1:
                    groups.append(group)
                group = [name]
            end = max(end, stop)
        if len(group) > 1:
            groups.append(group)
    return [sorted(group, key=order.__getitem__) for group in groups]


def worth_quantizing(x: torch.Tensor) -> bool:
    """Whether `quantize=True` stores `x` as 8-bit codes (here and in `save_optimizer`,
    `save_model`): a float tensor of at least `MIN_QUANTIZE_NUMEL` elements, all finite."""
    return x.dtype in FLOAT_DTYPES and x.numel() >= MIN_QUANTIZE_NUMEL and bool(torch.isfinite(x).all())


def _plan(name: str, x: torch.Tensor | QTensor, policy: bool | Callable) -> tuple[Any, bool]:
    """(tensor, whether to quantize it) under the quantize policy."""
    if isinstance(x, QTensor) or not policy or x.dtype not in FLOAT_DTYPES:
        return x, False
    if callable(policy):
        return x, bool(policy(name, x)) and bool(torch.isfinite(x).all())
    return x, worth_quantizing(x)


def _stored_estimate(x: torch.Tensor | QTensor, quantized: bool) -> int:
    if isinstance(x, QTensor):
        return x.nbytes
    if quantized:
        return x.numel() + 4 * -(-x.numel() // 64)
    return x.numel() * x.element_size()


def _shard(items: list, limit: int | None) -> list[list]:
    if limit is None:
        return [items]
    shards, size = [[]], 0
    for item in items:
        n = _stored_estimate(*item[1])
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _parse_size(size: int | str | None) -> int | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not isinstance(size, str) or not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive int or a size like '5GB', got {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _write(path: Path, items: list, metadata: dict, writer: dict[str, Any]) -> None:
    with Writer(path, metadata, **writer) as w:
        for name, (x, quantized) in items:
            w.add(name, x, lossless=not quantized)


def _atomic_write_text(path: Path, text: str) -> None:
    temp = TempFile(path)
    try:
        temp.file.write(text.encode("utf-8"))
        temp.file.flush()
        os.fsync(temp.file.fileno())
        os.replace(temp.path, path)
        fsync_dir(path.parent)
    except BaseException:
        temp.discard()
        raise
    temp.file.close()


def save(obj: Any, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Save nested state (dict/list/tuple/str/int/float/bool/None/bytes/Tensor/QTensor),
    e.g. an optimizer `state_dict`, to one q8 file, atomically and without pickle.
    Tensors are stored losslessly, QTensors as they are.

    Raises:
        TypeError / ValueError: an unsupported object or dict key (named by its key path),
            before anything is written.

    Example:
        >>> q8.save({"step": 3, "state": {0: {"m": q8.quantize(torch.randn(4096))}}}, "s.q8")
        >>> q8.load("s.q8")["state"][0]["m"]  # a QTensor again
    """
    tree, tensors = pack_tree(obj)
    write_tree(tree, tensors, path, _check_str_map(metadata, "metadata"))


def write_tree(
    tree: bytes, tensors: Tensors, path: str | os.PathLike, metadata: dict[str, str], compress_codes: bool = True
) -> None:
    """The file of `q8.save`: the packed structure `tree` and the tensors it names
    (`compress_codes`: as `save_file`'s)."""
    with Writer(path, metadata, compress_codes=compress_codes) as w:
        w.set_tree(tree)
        for name, x in tensors.items():
            w.add(name, x)


def async_save_file(
    tensors: Tensors,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    quantize: bool | Callable[[str, torch.Tensor], bool] = False,
    code: str | Code = "auto",
    blocksize: int = 2048,
    max_shard_size: int | str | None = None,
    compress_codes: bool = True,
) -> SaveFuture:
    """`save_file` in the background: returns once the tensors are copied (CUDA tensors to
    pinned host memory, QTensors as codes + absmax), so the caller may update them at once;
    encoding, compression and the atomic write run on q8's save thread.

    Saves run in the order they were made (a blocking save to the same file waits for
    them); the interpreter waits for pending saves before it exits. Bad arguments raise
    here, before anything is copied; a failure while writing is raised by `result()`, and
    logged if nobody reads it.

    Returns:
        A `concurrent.futures.Future` (`q8.formats.SaveFuture`): `result()` is None once the
        file is in place.

    Example:
        >>> future = q8.async_save_file(model.state_dict(), "m.q8")
        >>> ...  # keep training: the file is written meanwhile
        >>> future.result()  # raises if the save failed
    """
    metadata = check_save_file_args(tensors, path, metadata, code, blocksize, max_shard_size)
    kwargs = {"quantize": quantize, "code": code, "blocksize": blocksize, "max_shard_size": max_shard_size,
              "compress_codes": compress_codes}  # fmt: skip
    return save_in_background(path, lambda copy: save_file(copy, path, metadata, **kwargs), dict(tensors))


def async_save(obj: Any, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> SaveFuture:
    """`save` in the background, as `async_save_file` does: the structure is packed and its
    tensors copied before this returns; the file is written on q8's save thread.

    Example:
        >>> q8.async_save({"step": 3, "state": opt.state_dict()}, "state.q8").result()
    """
    tree, tensors = pack_tree(obj)
    metadata = _check_str_map(metadata, "metadata")
    return save_in_background(path, lambda copy: write_tree(tree, copy, path, metadata), tensors)


# -- loading -----------------------------------------------------------------------------


class ShardedReader:
    """The readers' interface over a Hugging Face style index json and its shards."""

    def __init__(self, index_path: Path, device: str | torch.device = "cpu") -> None:
        self.path = index_path
        self.device = device
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{index_path}: not a valid index json: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v and v not in (".", "..")
            for k, v in weight_map.items()
        ):
            raise FormatError(f"{index_path}: 'weight_map' must map tensor names to shard file names in its folder")
        self.weight_map: dict[str, str] = weight_map
        self._readers: dict[str, Reader] = {}

    def _reader(self, shard: str) -> Reader:
        if shard not in self._readers:
            path = self.path.parent / shard
            if not path.is_file():
                raise FormatError(f"{self.path}: shard {shard!r} is missing")
            self._readers[shard] = Reader(path, self.device)
        return self._readers[shard]

    def _for(self, name: str) -> Reader:
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        reader = self._reader(self.weight_map[name])
        if name not in reader:
            raise FormatError(f"{reader.path}, tensor {name!r}: listed in {self.path.name} but not in the shard")
        return reader

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def offset_keys(self) -> list[str]:
        """Tensor names shard by shard, in file order within each."""
        shards = sorted(set(self.weight_map.values()))
        return [name for shard in shards for name in self._reader(shard).keys() if self.weight_map.get(name) == shard]

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.weight_map)

    def get_slice(self, name: str):
        return self._for(name).get_slice(name)

    def metadata(self) -> dict[str, str]:
        shards = sorted(set(self.weight_map.values()))
        return self._reader(shards[0]).metadata() if shards else {}

    def info(self, name: str) -> dict:
        return self._for(name).info(name)

    def record(self, name: str) -> dict:
        return self._for(name).record(name)

    def get_tensor(self, name: str, *, copy: bool = False) -> torch.Tensor:
        return self._for(name).get_tensor(name, copy=copy)

    def get_qtensor(self, name: str) -> QTensor:
        return self._for(name).get_qtensor(name)

    def verify(self) -> None:
        for shard in sorted(set(self.weight_map.values())):
            _verify_reader(self._reader(shard))
        for name in self.weight_map:
            self._for(name)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def __enter__(self) -> ShardedReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def safe_open(
    path: str | os.PathLike, framework: str = "pt", device: str | torch.device = "cpu"
) -> Reader | ShardedReader:
    """Open a q8 file (or a sharded checkpoint's index json, or a path whose
    `<path>.index.json` exists) for random access; use as a context manager. The signature
    is safetensors': `framework` must be "pt" (q8 reads into torch tensors).

    The object has `keys()` / `offset_keys()` (names in file order), `in`, iteration,
    `metadata()`, `get_tensor(name)` (decoded, on `device`), `get_slice(name)` (index it
    to read part of a tensor: `q8.formats.slicing`), `get_qtensor(name)` (codes + absmax
    of a quantized tensor, no decoding) and `info(name)` (shape, dtype, encoding, code,
    blocksize, stored_bytes, raw_bytes, extra). Only the segments of the tensors asked for
    are read; every one is checksummed (`get_slice` of an uncompressed segment reads only
    the bytes it needs, without the checksum).

    Example:
        >>> with q8.safe_open("m.q8", framework="pt", device="cpu") as f:
        ...     w = f.get_tensor("w"); print(f.info("w")["stored_bytes"])
        ...     rows = f.get_slice("w")[:128]
    """
    if framework not in ("pt", "torch"):
        raise ValueError(
            f"safe_open: framework must be 'pt' (q8 reads into torch tensors), got {framework!r}"
            + ("; pass the device by name: safe_open(path, device=...)" if _is_device(framework) else "")
        )
    torch.device(device)
    path = Path(path)
    if path.name.endswith(INDEX_SUFFIX):
        return ShardedReader(path, device)
    if not path.exists() and Path(f"{path}{INDEX_SUFFIX}").is_file():
        return ShardedReader(Path(f"{path}{INDEX_SUFFIX}"), device)
    return Reader(path, device)


def _is_device(value: Any) -> bool:
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        return False
    return True


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a q8 file (or sharded checkpoint), decoded, on `device`.

    On CUDA, quantized tensors travel as codes (1 byte per element) and are decoded on
    the GPU. Raises `q8.FormatError` (naming file and tensor) on any corrupt input.

    Example:
        >>> tensors = q8.load_file("m.q8")
    """
    with safe_open(path, device=device) as f:
        return read_tensors(f, decode=True)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """Load what `q8.save` wrote (QTensors come back as QTensors); for a file written by
    `save_file`, the dict of its tensors."""
    with safe_open(path, device=device) as f:
        if getattr(f, "tree", None) is None:
            return read_tensors(f)
        return read_tree(f)


def read_tensors(
    f: Reader | ShardedReader, *, decode: bool = False, copy: bool = False
) -> dict[str, torch.Tensor | QTensor]:
    """Every tensor of an open file: quantized ones as QTensors, or decoded with
    `decode=True`; `copy`: no zero-copy views of the file (state that will be updated in
    place). Tensors stored as they are (uncompressed 8-bit or raw segments) that need memory
    of their own are read together, several segments per read (`Reader.read_stored`); other
    small tensors several at a time (their per-tensor costs dominate), large ones one after
    another, each range by range on several threads (so that the memory beyond the tensors
    stays a few buffers)."""
    records = {name: f.record(name) for name in f.keys()}

    def as_codes(rec: dict) -> bool:
        return not decode and rec["encoding"] == "blockwise"

    def read(name: str) -> torch.Tensor | QTensor:
        return f.get_qtensor(name) if as_codes(records[name]) else f.get_tensor(name, copy=copy)

    loaded: dict[str, torch.Tensor | QTensor] = {}
    if isinstance(f, Reader):
        loaded = f.read_stored(
            [r for r in records.values() if stored_as_is(r) and (as_codes(r) or (copy and r["encoding"] == "raw"))]
        )
    small = [
        name
        for name, r in records.items()
        if name not in loaded and math.prod(r["shape"]) * r["dtype"].itemsize < _LARGE_TENSOR_BYTES
    ]
    loaded.update(zip(small, map_all(_pool(), read, small), strict=True))
    return {name: loaded[name] if name in loaded else read(name) for name in records}


def read_tree(f: Reader) -> Any:
    """The nested object in the `tree` of an open q8 file, its tensors loaded (each once:
    tied tensors stay tied; all of the file's, several at a time). FormatError on a
    malformed structure."""
    loaded = read_tensors(f)

    def load_one(name: str) -> Any:
        if name not in loaded:
            raise FormatError(f"{f.path}: the structure references a missing tensor {name!r}")
        return loaded[name]

    try:
        return unpack_tree(f.tree, load_one)
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{f.path}: malformed nested structure: {e}") from None


def verify(path: str | os.PathLike) -> None:
    """Check every checksum and structure of a q8 file or sharded checkpoint; raise
    `q8.FormatError` on the first problem. Reads the whole file.

    Example:
        >>> q8.verify("m.q8")
    """
    with safe_open(path) as f:
        if isinstance(f, ShardedReader):
            f.verify()
        else:
            _verify_reader(f)


def _verify_reader(r: Reader) -> None:
    r.verify()
    if r.tree is not None:
        try:
            unpack_tree(r.tree, lambda name: r.record(name) and None)
        except Exception as e:
            raise FormatError(f"{r.path}: malformed nested structure: {e}") from None
