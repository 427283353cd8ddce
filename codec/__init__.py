"""The codec: code tables and blockwise 8-bit quantization (CPU path compiled, GPU in q8.kernels)."""

from .blockwise import (
    AUTO_CODES,
    QTensor,
    QuantError,
    dequantize,
    mix32,
    quant_error,
    quantize,
    quantize_best,
    quantize_stochastic,
    rounding_key,
)
from .codes import CODE_NAMES, Code, dynamic_code, get_code, linear_code, quantile_code

__all__ = [
    "AUTO_CODES",
    "CODE_NAMES",
    "Code",
    "QTensor",
    "QuantError",
    "dequantize",
    "dynamic_code",
    "get_code",
    "linear_code",
    "mix32",
    "quant_error",
    "quantile_code",
    "quantize",
    "quantize_best",
    "quantize_stochastic",
    "rounding_key",
]
