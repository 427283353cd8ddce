"""q8.formats: the q8 container file format (docs/FORMAT.md) and its save/load API."""

from .api import (
    MIN_QUANTIZE_NUMEL,
    ShardedReader,
    load,
    load_bytes,
    load_file,
    safe_open,
    save,
    save_bytes,
    save_file,
    verify,
)
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
    "ShardedReader",
    "Writer",
    "code_nbytes",
    "load",
    "load_bytes",
    "load_file",
    "load_model",
    "safe_open",
    "save",
    "save_bytes",
    "save_file",
    "save_model",
    "stored_nbytes",
    "verify",
]
