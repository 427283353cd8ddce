"""torch.distributed.checkpoint (DCP) storage through the q8 container.

`Q8StorageWriter` / `Q8StorageReader` plug into `dcp.save` / `dcp.load` like DCP's own
`FileSystemWriter` / `FileSystemReader`: every rank writes the tensor chunks it owns into
one q8 file, lossless by default (byte planes + zstd for floats, zstd for integers and
8-bit codes) or quantized on request; the coordinator writes DCP's `.metadata`.

Why a StorageWriter and not a stream-transform `_extensions` entry of FileSystemWriter:
a stream transform only sees the bytes DCP already produced, which for tensors are a
`torch.save` pickle per chunk. It cannot see dtype or shape, so it can neither apply the
float-aware lossless encoding nor quantize, and the reader would still unpickle every
chunk with `torch.load`. A StorageWriter receives the tensors themselves
(`SavePlanner.resolve_data`), hands them to `q8.Writer`, and reads them back with
`q8.safe_open`, so no pickle touches tensor data. It uses only DCP's public storage
interface (`StorageWriter`, `StorageReader`, `WriteResult`, `Metadata`), not the
experimental, underscore-private `_extensions` API.

Nothing `Q8StorageReader` reads is a pickle. DCP's own `FileSystemWriter` pickles the
checkpoint-wide `Metadata` and `torch.save`s every non-tensor value (ints, strings, ...),
and its planner `torch.load`s those with `weights_only=False`. Here `.metadata` is a q8
file holding the `Metadata` fields as plain data (rebuilt into DCP's dataclasses with
every field checked), and a non-tensor value is turned back into the object at save time
(in the saving process, from bytes its own planner just made) and stored as plain data in
the rank file's nested `tree`; at load time q8 rebuilds the object and hands the planner
bytes that q8 itself made from it. A pickled `.metadata` (DCP's, or an older q8's) is
refused, never unpickled.

Layout of a checkpoint folder: `.metadata` (a q8 file) plus `__<rank>_<token>.q8` per
rank, where `token` is fresh for every save. Saving over an existing checkpoint never
touches its files until the new `.metadata` has atomically replaced the old one; only then
are the old data files (and temporary files of killed saves) removed. A failed save
therefore leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import secrets
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from .. import FormatError, Writer, safe_open
from .. import quantize as quantize_tensor
from .. import save as save_q8
from ..codec import Code
from ..codec.blockwise import FLOAT_DTYPES
from ..formats import MIN_QUANTIZE_NUMEL
from ..formats.api import read_tree
from ..formats.atomic import remove_stale_matching
from ..formats.container import MAGIC, MAX_NDIM
from ..formats.dtypes import DTYPES, dtype_name
from ..formats.tree import pack_tree

__all__ = ["Q8StorageReader", "Q8StorageWriter"]

METADATA_FILE = ".metadata"
METADATA_FORMAT = "q8.dcp.metadata 1"  # the `.metadata` file's user metadata under "format"
_DATA_FILE = re.compile(r"__(\d+)_([0-9a-f]{16})\.q8")
_PLAIN = (dict, list, tuple, str, int, float, bool, type(None), bytes)

QuantizePolicy = Callable[[str, torch.Tensor], bool]


def default_quantize_policy(fqn: str, tensor: torch.Tensor) -> bool:
    """`quantize=True`: float tensors of at least `MIN_QUANTIZE_NUMEL` elements (counted on
    the whole tensor, not this rank's chunk), except the absmax of q8 8-bit optimizer state
    (`*.absmax`), which is already the scale of 8-bit codes and must stay exact."""
    return tensor.numel() >= MIN_QUANTIZE_NUMEL and not fqn.endswith(".absmax")


class Q8StorageWriter(StorageWriter):
    """DCP storage writer that stores tensor data through the q8 container.

    Args:
        path: checkpoint folder (created if missing); `dcp.save(checkpoint_id=...)` may
            replace it.
        quantize: False (default): lossless. True: float tensors chosen by
            `default_quantize_policy` are stored as blockwise 8-bit codes (lossy; the
            reader gives back their dequantized values). Or a policy
            `(fqn, tensor) -> bool`, called with the state-dict key and the whole
            (global-shape) tensor's metadata as a meta tensor. Non-finite tensors always
            stay exact.
        code, blocksize: codec settings for quantized tensors (see `q8.quantize`).

    Example:
        >>> import torch.distributed.checkpoint as dcp
        >>> from q8.integrations.distributed import Q8StorageWriter
        >>> dcp.save(state_dict, storage_writer=Q8StorageWriter("ckpt/step-100"))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        quantize: bool | QuantizePolicy = False,
        code: str | Code = "auto",
        blocksize: int = 2048,
    ) -> None:
        super().__init__()
        if not (isinstance(quantize, bool) or callable(quantize)):
            raise TypeError(f"Q8StorageWriter: quantize must be a bool or a callable, got {type(quantize).__name__}")
        quantize_tensor(torch.zeros(1), code, blocksize)  # validates code and blocksize with the codec's messages
        self.path = Path(path)
        self.quantize = default_quantize_policy if quantize is True else quantize
        self.code, self.blocksize = code, blocksize
        self.is_coordinator = False
        self.rank = 0
        self.save_id = secrets.token_hex(8)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)
        self.save_id = secrets.token_hex(8)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise NotImplementedError("Q8StorageWriter needs dcp.save(..., use_collectives=True) (the default)")
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        self.path.mkdir(parents=True, exist_ok=True)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path), save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return dataclasses.replace(plan, storage_data=f"__{self.rank}_{self.save_id}.q8")

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        files = [plan.storage_data for plan in plans]
        if len(set(files)) != len(files):
            raise RuntimeError(f"Q8StorageWriter: two ranks chose the same data file ({files})")
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        file_name = plan.storage_data
        results, objects = [], {}
        with Writer(self.path / file_name, code=self.code, blocksize=self.blocksize) as writer:
            writer.set_q8_metadata("dcp.rank", str(self.rank))
            for i, item in enumerate(plan.items):
                name = f"{i}:{item.index.fqn}"
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    objects[name] = _plain_object(data, item.index.fqn)
                    size = data.getbuffer().nbytes
                else:
                    tensor = data.detach().cpu()
                    writer.add(name, tensor, lossless=not self._quantizes(item, tensor))
                    size = tensor.numel() * tensor.element_size()
                results.append(WriteResult(item.index, size, (file_name, name)))
            tree, tensors = pack_tree(objects)  # tensors inside non-tensor values, if any
            writer.set_tree(tree)
            for name, tensor in tensors.items():
                writer.add(name, tensor)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _quantizes(self, item: WriteItem, tensor: torch.Tensor) -> bool:
        if not self.quantize or tensor.dtype not in FLOAT_DTYPES:
            return False
        whole = torch.empty(item.tensor_data.size, dtype=tensor.dtype, device="meta")
        return bool(self.quantize(item.index.fqn, whole)) and bool(torch.isfinite(tensor).all())

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        metadata.storage_meta = self.storage_meta()
        save_q8(_metadata_to_tree(metadata), self.path / METADATA_FILE, {"format": METADATA_FORMAT})  # atomic
        keep = {file_name for file_name, _ in metadata.storage_data.values()}
        for old in self.path.iterdir():
            if _DATA_FILE.fullmatch(old.name) and old.name not in keep:
                old.unlink(missing_ok=True)
        remove_stale_matching(self.path, rb"__\d+_[0-9a-f]{16}\.q8")  # temp files of killed saves

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


class Q8StorageReader(StorageReader):
    """DCP storage reader for checkpoints written by `Q8StorageWriter`.

    Tensors come back in their saved dtype; quantized ones dequantized. Resharding (a
    different number of ranks, or a different sharding) is DCP's usual: each rank reads
    the stored chunks that overlap what it needs. Every read is checksummed by the q8
    container; a corrupt file raises `q8.FormatError` naming the file and the tensor.

    Example:
        >>> dcp.load(state_dict, storage_reader=Q8StorageReader("ckpt/step-100"))
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self.storage_data: dict[MetadataIndex, tuple[str, str]] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)
        self.storage_data = {}

    def read_metadata(self) -> Metadata:
        path = self.path / METADATA_FILE
        try:
            with open(path, "rb") as f:
                magic = f.read(len(MAGIC))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no DCP metadata; is {self.path} a DCP checkpoint folder?") from None
        if magic != MAGIC:
            raise FormatError(
                f"{path}: not a q8 DCP checkpoint but a pickled .metadata, which q8 never unpickles: "
                "DCP's FileSystemWriter writes those (read it with torch.distributed.checkpoint."
                "FileSystemReader if you trust it), and so did Q8StorageWriter before q8 stopped using pickle"
                if magic[:1] == b"\x80"
                else f"{path}: not a q8 DCP checkpoint (magic {magic!r})"
            )
        with safe_open(path) as f:
            if f.metadata().get("format") != METADATA_FORMAT or f.keys() or f.tree is None:
                raise FormatError(f"{path}: a q8 file, but not DCP metadata (format {f.metadata().get('format')!r})")
            return _metadata_from_tree(read_tree(f), path)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file = defaultdict(list)
        for item in plan.items:
            file_name, name = self.storage_data[item.storage_index]
            by_file[file_name].append((item, name))
        for file_name, items in by_file.items():
            path = self.path / file_name
            with safe_open(path) as f:
                objects = None
                for item, name in items:
                    if item.type == LoadItemType.BYTE_IO:
                        objects = read_tree(f) if objects is None else objects
                        if not isinstance(objects, dict) or name not in objects:
                            raise FormatError(f"{path}: no value {name!r} in the file's tree")
                        planner.load_bytes(item, _bytes_of(objects[name]))
                        continue
                    if name not in f:
                        raise FormatError(f"{path}: no tensor {name!r}")
                    stored = f.get_tensor(name)
                    if stored.dim() != len(item.storage_offsets) or any(
                        start + length > size
                        for start, length, size in zip(item.storage_offsets, item.lengths, stored.shape, strict=True)
                    ):
                        raise FormatError(
                            f"{path}: tensor {name!r} of shape {tuple(stored.shape)} does not hold the chunk "
                            f"at {tuple(item.storage_offsets)} of {tuple(item.lengths)} the metadata promised"
                        )
                    for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                        stored = stored.narrow(dim, start, length)
                    target = planner.resolve_tensor(item).detach()
                    if target.shape != stored.shape:
                        raise FormatError(
                            f"{path}: tensor {name!r} gives a chunk of shape {tuple(stored.shape)}, "
                            f"the load plan expects {tuple(target.shape)}"
                        )
                    if stored.dtype == torch.uint8 and target.is_floating_point():  # never cast 8-bit codes
                        raise FormatError(
                            f"{self.path / file_name}: tensor {name!r} holds uint8 (8-bit codes?), the state dict "
                            f"expects {target.dtype}; 8-bit optimizer state of a 1-D parameter saved by a q8 "
                            "before the row layout (docs/OPTIMIZER_STATE.md) does not load as fp32 state"
                        )
                    target.copy_(stored)
                    planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


# -- non-tensor values: plain data, never a pickle read from a file ------------------------


def _plain_object(data: io.BytesIO, fqn: str) -> Any:
    """The value DCP's planner just serialised with `torch.save` (in this process, from the
    caller's state dict), back as an object made of plain data only."""
    data.seek(0)
    try:
        obj = torch.load(data, weights_only=True)
    except Exception as e:
        raise TypeError(f"Q8StorageWriter: the value at {fqn!r} is not plain data: {str(e)[:300]}") from None
    _check_plain(obj, fqn)
    return obj


def _check_plain(obj: Any, where: str) -> None:
    """TypeError unless `obj` is made of dict/list/tuple/str/int/float/bool/None/bytes and
    tensors only (exact types: a subclass would come back as its base class)."""
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            continue
        if type(x) not in _PLAIN:
            raise TypeError(
                f"Q8StorageWriter: {where!r} holds a {type(x).__name__}; non-tensor values must be plain data "
                "(dict, list, tuple, str, int, float, bool, None, bytes, tensors)"
            )
        if isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)


def _bytes_of(obj: Any) -> io.BytesIO:
    """`torch.save` bytes of an object q8 rebuilt from plain data: what the planner loads."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# -- .metadata: DCP's Metadata as plain data in a q8 file ----------------------------------

_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
}
_MAX_PATH_INDEX = 1 << 24  # list positions in planner_data paths (DCP fills lists up to them)


def _metadata_to_tree(md: Metadata) -> dict:
    state: dict[str, dict] = {}
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            state[fqn] = {"kind": "bytes"}
            continue
        p = meta.properties
        if p.layout != torch.strided or p.memory_format not in _MEMORY_FORMATS.values():
            raise TypeError(f"Q8StorageWriter: {fqn!r} has layout {p.layout} / {p.memory_format}; only dense tensors")
        state[fqn] = {
            "kind": "tensor",
            "dtype": dtype_name(p.dtype),
            "requires_grad": p.requires_grad,
            "memory_format": next(k for k, v in _MEMORY_FORMATS.items() if v == p.memory_format),
            "pin_memory": p.pin_memory,
            "size": list(meta.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in meta.chunks],
        }
    sm = md.storage_meta
    _check_plain(md.planner_data, "planner_data")
    return {
        "state_dict": state,
        "storage": [
            [i.fqn, None if i.offset is None else list(i.offset), i.index, file, name]
            for i, (file, name) in md.storage_data.items()
        ],
        "planner_data": md.planner_data,
        "storage_meta": None
        if sm is None
        else {
            "checkpoint_id": None if sm.checkpoint_id is None else str(sm.checkpoint_id),
            "save_id": sm.save_id,
            "load_id": sm.load_id,
            "modules": list(sm.modules),
        },
        "version": md.version,
    }


def _metadata_from_tree(tree: Any, path: Path) -> Metadata:
    """DCP's Metadata rebuilt from `_metadata_to_tree`'s form, every field checked."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise FormatError(f"{path}: bad DCP metadata: {what}")

    def ints(v: Any, n: int | None = None) -> bool:
        return (
            isinstance(v, list)
            and len(v) <= MAX_NDIM
            and (n is None or len(v) == n)
            and all(type(x) is int and x >= 0 for x in v)
        )

    def opt_str(v: Any) -> bool:
        return v is None or isinstance(v, str)

    keys = {"state_dict", "storage", "planner_data", "storage_meta", "version"}
    need(isinstance(tree, dict) and set(tree) == keys, f"expected the fields {sorted(keys)}")
    need(isinstance(tree["state_dict"], dict), "state_dict is not a map")
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for fqn, m in tree["state_dict"].items():
        need(isinstance(fqn, str) and isinstance(m, dict), f"state_dict entry {fqn!r:.100}")
        if m == {"kind": "bytes"}:
            state[fqn] = BytesStorageMetadata()
            continue
        fields = {"kind", "dtype", "requires_grad", "memory_format", "pin_memory", "size", "chunks"}
        need(set(m) == fields and m["kind"] == "tensor", f"{fqn!r}: expected the fields {sorted(fields)}")
        need(m["dtype"] in DTYPES and m["memory_format"] in _MEMORY_FORMATS, f"{fqn!r}: dtype or memory format")
        need(type(m["requires_grad"]) is bool and type(m["pin_memory"]) is bool, f"{fqn!r}: flags")
        size = m["size"]
        need(ints(size) and isinstance(m["chunks"], list), f"{fqn!r}: size {size!r:.100}")
        chunks = []
        for c in m["chunks"]:
            need(isinstance(c, list) and len(c) == 2 and ints(c[0], len(size)) and ints(c[1], len(size)), f"{fqn!r}")
            need(all(o + n <= s for o, n, s in zip(*c, size, strict=True)), f"{fqn!r}: chunk {c} outside {size}")
            chunks.append(ChunkStorageMetadata(torch.Size(c[0]), torch.Size(c[1])))
        props = TensorProperties(
            DTYPES[m["dtype"]], torch.strided, m["requires_grad"], _MEMORY_FORMATS[m["memory_format"]], m["pin_memory"]
        )
        state[fqn] = TensorStorageMetadata(props, torch.Size(size), chunks)

    need(isinstance(tree["storage"], list), "storage is not an array")
    storage: dict[MetadataIndex, tuple[str, str]] = {}
    for entry in tree["storage"]:
        need(isinstance(entry, list) and len(entry) == 5, f"storage entry {entry!r:.100}")
        fqn, offset, index, file, name = entry
        meta = state.get(fqn) if isinstance(fqn, str) else None
        tensor = isinstance(meta, TensorStorageMetadata)
        need(
            meta is not None
            and (ints(offset, len(meta.size)) if tensor else offset is None)
            and (index is None or (type(index) is int and index >= 0))
            and isinstance(file, str)
            and _DATA_FILE.fullmatch(file) is not None
            and isinstance(name, str),
            f"bad storage entry {entry!r:.200} (expected a key of state_dict and a q8 data file of this folder)",
        )
        key = MetadataIndex(fqn, None if offset is None else torch.Size(offset), index)
        need(key not in storage, f"two storage entries for {fqn!r} at {offset}")
        storage[key] = (file, name)
    for fqn, meta in state.items():
        offsets = [c.offsets for c in meta.chunks] if isinstance(meta, TensorStorageMetadata) else [None]
        need(all(MetadataIndex(fqn, o) in storage for o in offsets), f"no storage entry for a chunk of {fqn!r}")

    planner = tree["planner_data"]
    if isinstance(planner, dict):
        for fqn, obj_path in planner.items():
            need(
                isinstance(obj_path, (list, tuple))
                and all(isinstance(k, str) or (type(k) is int and 0 <= k < _MAX_PATH_INDEX) for k in obj_path),
                f"planner_data path of {fqn!r:.100}",
            )
    sm = tree["storage_meta"]
    if sm is not None:
        need(isinstance(sm, dict) and set(sm) == {"checkpoint_id", "save_id", "load_id", "modules"}, "storage_meta")
        need(all(opt_str(sm[k]) for k in ("checkpoint_id", "save_id", "load_id")), "storage_meta ids")
        need(isinstance(sm["modules"], list) and all(isinstance(m, str) for m in sm["modules"]), "storage_meta modules")
        sm = StorageMeta(sm["checkpoint_id"], sm["save_id"], sm["load_id"], sm["modules"])
    need(opt_str(tree["version"]), "version")
    return Metadata(state, planner, storage, sm, tree["version"])
