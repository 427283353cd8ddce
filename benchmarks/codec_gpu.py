"""GPU codec benchmark: q8's Triton kernels vs bitsandbytes' CUDA kernels, in the same run.

On 2^28 fp32 elements (normal data, signed dynamic code, blocksizes 256 and 2048):
device-to-device copy bandwidth first (the ceiling), then encode and decode of q8
(`q8.kernels`, the backend `q8.quantize` / `q8.dequantize` use on CUDA) and of
bitsandbytes (`quantize_blockwise` / `dequantize_blockwise`). Reported: medians of REPEATS
timed runs after a warm-up, GB/s of bytes moved (read + written: fp32 in, codes and
absmax out, and the reverse), % of the copy bandwidth, and the speed ratio q8/bnb.
q8's encode time includes reading back the NaN/inf flag (a 8-byte device-to-host copy).

Exactness, in the same run: q8's GPU codes and decoded values are compared byte for byte
with the CPU path on the first 2^22 elements.

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/codec_gpu.py
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import torch

N = 1 << 28
BLOCKSIZES = (256, 2048)
REPEATS = 20
CHECK = 1 << 22


def median_ms(fn: Callable[[], object]) -> float:
    """Median GPU time of fn() in ms over REPEATS runs (CUDA events), after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def main() -> None:
    if not torch.cuda.is_available():
        print("benchmarks/codec_gpu.py: no CUDA device here; this benchmark needs a GPU (skipped).")
        return
    import bitsandbytes.functional as bnbf
    from q8 import kernels
    from q8.codec import get_code, native

    code = get_code("dynamic")
    bnb_code = code.values.cuda()
    x = torch.randn(N, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    dst = torch.empty_like(x)
    copy_ms = median_ms(lambda: dst.copy_(x))
    copy_bw = gbps(2 * 4 * N, copy_ms)
    print(f"device: {torch.cuda.get_device_name()}, {N} fp32 elements, copy {copy_bw:.0f} GB/s ({copy_ms:.3f} ms)")

    rows = []
    for blocksize in BLOCKSIZES:
        nblocks = -(-N // blocksize)
        encode_bytes = 4 * N + N + 4 * nblocks
        decode_bytes = N + 4 * nblocks + 4 * N

        codes, absmax, bad = kernels.encode(x, code, blocksize)
        ref_codes, ref_absmax, _ = native.encode(x[:CHECK].cpu(), code, blocksize)
        decoded = kernels.decode(codes[:CHECK], absmax[: CHECK // blocksize], code, blocksize).cpu()
        ref_decoded = native.decode(ref_codes, ref_absmax, code, blocksize)
        exact = (
            bad == -1
            and torch.equal(codes[:CHECK].cpu(), ref_codes)
            and torch.equal(absmax[: CHECK // blocksize].cpu(), ref_absmax)
            and torch.equal(decoded.view(torch.int32), ref_decoded.view(torch.int32))
        )
        q8_enc = median_ms(lambda bs=blocksize: kernels.encode(x, code, bs))
        q8_dec = median_ms(lambda bs=blocksize, c=codes, a=absmax: kernels.decode(c, a, code, bs))
        bnb_codes, state = bnbf.quantize_blockwise(x, code=bnb_code, blocksize=blocksize)
        bnb_enc = median_ms(lambda bs=blocksize: bnbf.quantize_blockwise(x, code=bnb_code, blocksize=bs))
        bnb_dec = median_ms(lambda c=bnb_codes, s=state: bnbf.dequantize_blockwise(c, s))
        same_as_bnb = float((bnb_codes.flatten() == codes).float().mean())
        for op, nbytes, q8_ms, bnb_ms in (
            ("encode", encode_bytes, q8_enc, bnb_enc),
            ("decode", decode_bytes, q8_dec, bnb_dec),
        ):
            q8_bw, bnb_bw = gbps(nbytes, q8_ms), gbps(nbytes, bnb_ms)
            rows.append((op, blocksize, q8_ms, q8_bw, 100 * q8_bw / copy_bw, bnb_ms, bnb_bw, bnb_ms / q8_ms))
        print(
            f"blocksize {blocksize}: q8 GPU == CPU path on the first {CHECK} elements: {exact}; "
            f"q8 codes equal to bitsandbytes': {100 * same_as_bnb:.4f}%"
        )

    print()
    print("| op | blocksize | q8 ms | q8 GB/s | q8 % of copy | bnb ms | bnb GB/s | q8 / bnb speed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for op, bs, q8_ms, q8_bw, pct, bnb_ms, bnb_bw, ratio in rows:
        print(f"| {op} | {bs} | {q8_ms:.3f} | {q8_bw:.0f} | {pct:.0f}% | {bnb_ms:.3f} | {bnb_bw:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
