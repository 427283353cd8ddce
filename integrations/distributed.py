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

Pickle that remains is DCP's own: the checkpoint-wide `.metadata` (a pickled
`torch.distributed.checkpoint.metadata.Metadata`, written by the coordinator) and the
non-tensor values of a state dict (ints, strings, ...), which DCP's planner serialises
with `torch.save` and hands to the writer as bytes (stored here as uint8 tensors and
given back to the planner, which `torch.load`s them). `Q8StorageReader` reads `.metadata`
with an allow-list unpickler that resolves only DCP's metadata classes, `torch.Size` and
torch dtypes, so a tampered `.metadata` cannot run code.

Layout of a checkpoint folder: `.metadata` plus `__<rank>_<token>.q8` per rank, where
`token` is fresh for every save. Saving over an existing checkpoint never touches its
files until the new `.metadata` has atomically replaced the old one; only then are the
old data files removed. A failed save therefore leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import secrets
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
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
from ..codec import Code
from ..codec.blockwise import FLOAT_DTYPES
from ..formats import MIN_QUANTIZE_NUMEL

__all__ = ["Q8StorageReader", "Q8StorageWriter"]

METADATA_FILE = ".metadata"
_DATA_FILE = re.compile(r"__(\d+)_([0-9a-f]{16})\.q8")

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
        results = []
        with Writer(self.path / file_name, code=self.code, blocksize=self.blocksize) as writer:
            writer.set_q8_metadata("dcp.rank", str(self.rank))
            for i, item in enumerate(plan.items):
                name = f"{i}:{item.index.fqn}"
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    tensor = _bytes_to_tensor(data.getbuffer())
                    writer.add(name, tensor)
                else:
                    tensor = data.detach().cpu()
                    writer.add(name, tensor, lossless=not self._quantizes(item, tensor))
                results.append(WriteResult(item.index, tensor.numel() * tensor.element_size(), (file_name, name)))
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
        tmp = self.path / f"{METADATA_FILE}.{self.save_id}.tmp"
        try:
            with open(tmp, "wb") as f:
                pickle.dump(metadata, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / METADATA_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        keep = {file_name for file_name, _ in metadata.storage_data.values()}
        for old in self.path.iterdir():
            if _DATA_FILE.fullmatch(old.name) and old.name not in keep:
                old.unlink(missing_ok=True)

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
                metadata = _MetadataUnpickler(f, path).load()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no DCP metadata; is {self.path} a DCP checkpoint folder?") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"{path}: unreadable DCP metadata ({e})") from None
        _check_metadata(metadata, path)
        return metadata

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
            with safe_open(self.path / file_name) as f:
                for item, name in items:
                    stored = f.get_tensor(name)
                    if item.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(item, io.BytesIO(stored.numpy().tobytes()))
                        continue
                    for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                        stored = stored.narrow(dim, start, length)
                    target = planner.resolve_tensor(item).detach()
                    if target.shape != stored.shape:
                        raise FormatError(
                            f"{self.path / file_name}: tensor {name!r} gives a chunk of shape {tuple(stored.shape)}, "
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


def _bytes_to_tensor(buffer: memoryview) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(buffer), dtype=torch.uint8) if buffer.nbytes else torch.empty(0, dtype=torch.uint8)
    )


_METADATA_CLASSES = {
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "_MEM_FORMAT_ENCODING",
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only what DCP metadata is made of; anything else is a FormatError."""

    def __init__(self, file: io.BufferedReader, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == dcp_metadata.__name__ and name in _METADATA_CLASSES:
            return getattr(dcp_metadata, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        if module == "torch.distributed.checkpoint.filesystem":
            raise FormatError(
                f"{self.path}: this checkpoint was written by DCP's FileSystemWriter; read it with "
                "torch.distributed.checkpoint.FileSystemReader, not Q8StorageReader"
            )
        raise FormatError(f"{self.path}: DCP metadata refers to {module}.{name}, which a q8 checkpoint never holds")


def _check_metadata(metadata: Any, path: Path) -> None:
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise FormatError(f"{path}: not DCP checkpoint metadata (got {type(metadata).__name__})")
    for index, where in metadata.storage_data.items():
        if not (
            isinstance(index, MetadataIndex)
            and isinstance(where, tuple)
            and len(where) == 2
            and all(isinstance(s, str) for s in where)
            and _DATA_FILE.fullmatch(where[0])
        ):
            raise FormatError(f"{path}: bad storage entry {index!r}: {where!r} (expected a q8 data file and a name)")
