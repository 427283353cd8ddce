"""q8: blockwise 8-bit codes, a checkpoint container and 8-bit optimizers for PyTorch.

The public API lives here; see README.md.
"""

from . import optim
from .codec import (
    Code,
    QTensor,
    QuantError,
    dequantize,
    dynamic_code,
    linear_code,
    quant_error,
    quantile_code,
    quantize,
)
from .formats import (
    FormatError,
    Writer,
    async_save,
    async_save_file,
    load,
    load_bytes,
    load_file,
    load_model,
    safe_open,
    save,
    save_bytes,
    save_file,
    save_model,
    verify,
)
from .optim import async_save_optimizer, load_optimizer, save_optimizer

__version__ = "0.1.0"

__all__ = [
    "Code",
    "FormatError",
    "QTensor",
    "QuantError",
    "Writer",
    "__version__",
    "async_save",
    "async_save_file",
    "async_save_optimizer",
    "dequantize",
    "dynamic_code",
    "linear_code",
    "load",
    "load_bytes",
    "load_file",
    "load_model",
    "load_optimizer",
    "optim",
    "quant_error",
    "quantile_code",
    "quantize",
    "safe_open",
    "save",
    "save_bytes",
    "save_file",
    "save_model",
    "save_optimizer",
    "verify",
]
