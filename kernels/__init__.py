"""q8.kernels: Triton GPU kernels of the codec and of fused 8-bit optimizer updates,
bit-identical to the CPU path (see README.md).

`encode` / `decode` are the CUDA backend of `q8.quantize` / `q8.dequantize`; `step` is
the fused step of an optimizer rule (`q8.kernels.optim.RULES`) q8.optim runs on CUDA
parameters, without host-device synchronization, and `batched_step` the same step of many
small parameters in one launch. The
`@triton.jit` building blocks live in `q8.kernels.quant`, and `device_tables` gives a
code's tables on a device in the layout those blocks read.
"""

from .blockwise import decode, device_tables, encode
from .optim import batched_step, step

__all__ = ["batched_step", "decode", "device_tables", "encode", "step"]
