"""q8: blockwise 8-bit codes, a checkpoint container and 8-bit optimizers for PyTorch.

The public API lives here; see README.md.
"""

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

__version__ = "0.1.0"

__all__ = [
    "Code",
    "QTensor",
    "QuantError",
    "__version__",
    "dequantize",
    "dynamic_code",
    "linear_code",
    "quant_error",
    "quantile_code",
    "quantize",
]
