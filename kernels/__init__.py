"""q8.kernels: Triton GPU kernels of the codec, bit-identical to the CPU path (see README.md).

`encode` / `decode` are the CUDA backend of `q8.quantize` / `q8.dequantize`; the
`@triton.jit` building blocks they are made of live in `q8.kernels.quant`, and
`device_tables` gives a code's tables on a device in the layout those blocks read.
"""

from .blockwise import decode, device_tables, encode

__all__ = ["decode", "device_tables", "encode"]
