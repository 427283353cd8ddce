"""q8.formats: the q8 container file format (docs/FORMAT.md) and its save/load API."""

from .api import (
    MIN_QUANTIZE_NUMEL,
    ShardedReader,
    async_save,
    async_save_file,
    load,
    load_bytes,
    load_file,
    read_tensors,
    safe_open,
    save,
    save_bytes,
    save_file,
    verify,
)
from .background import SaveFuture, release_buffers
from .container import FORMAT_VERSION, MAGIC, FormatError, Reader, Writer, code_nbytes, stored_nbytes
from .dtypes import DTYPES
from .model import load_model, save_model

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "MAGIC",
    "MIN_QUANTIZE_NUMEL",
    "FormatError",
    "Reader",
    "SaveFuture",
    "ShardedReader",
    "Writer",
    "async_save",
    "async_save_file",
    "code_nbytes",
    "load",
    "load_bytes",
    "load_file",
    "load_model",
    "read_tensors",
    "release_buffers",
    "safe_open",
    "save",
    "save_bytes",
    "save_file",
    "save_model",
    "stored_nbytes",
    "verify",
]
