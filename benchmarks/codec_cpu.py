"""CPU codec benchmark: q8 vs bitsandbytes blockwise 8-bit quantization, in the same run.

Throughput: encode and decode of a 2^24-element fp32 tensor (normal data, signed dynamic
code), blocksizes 256 and 2048; medians of REPEATS timed runs after a warm-up (q8 and
bitsandbytes alternate, so both see the same load), MB/s of fp32 input, and the speed
ratio q8/bnb (> 1: q8 is faster).

Exactness: each side's codes are compared with the exact nearest table entry computed
here independently from docs/CODEC.md (fp64 midpoints, the next fp32 above each one as
threshold, then searchsorted), on (a) normal data with the signed dynamic code and
(b) Adam-second-moment-like data (non-negative, many decades) with the unsigned one;
plus the relative L2 error of each reconstruction.

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/codec_cpu.py
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import bitsandbytes
import bitsandbytes.functional as bnbf
import q8
import torch

N = 1 << 24
BLOCKSIZES = (256, 2048)
REPEATS = 7


def paired_median_ms(*fns: Callable[[], object]) -> list[float]:
    """Median wall time in ms of each fn over REPEATS rounds after one warm-up call each.
    The fns alternate within a round so that all see the same load on a shared machine."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(REPEATS):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(ts) for ts in times]


def exact_codes(x: torch.Tensor, table: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The exact nearest codes of docs/CODEC.md, ties to the lower entry, independent of q8."""
    v = table.double()
    mid = (v[:-1] + v[1:]) / 2  # exact: two fp32 values sum exactly in fp64 here
    t = mid.float()
    t = torch.where(t.double() <= mid, torch.nextafter(t, torch.tensor(float("inf"))), t)
    blocks = x.reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    q = torch.where(absmax > 0, blocks / absmax, torch.zeros_like(blocks))
    return torch.searchsorted(t, q.reshape(-1), right=True).to(torch.uint8)


def rel_l2(x: torch.Tensor, y: torch.Tensor) -> float:
    return q8.quant_error(x, y).rel_l2


def throughput_rows(x: torch.Tensor) -> list[tuple]:
    rows = []
    mb = 4 * x.numel() / 1e6
    for bs in BLOCKSIZES:
        qt = q8.quantize(x, "dynamic", bs)
        bq, bstate = bnbf.quantize_blockwise(x, blocksize=bs)
        timings = {
            "encode": paired_median_ms(
                lambda bs=bs: q8.quantize(x, "dynamic", bs), lambda bs=bs: bnbf.quantize_blockwise(x, blocksize=bs)
            ),
            "decode": paired_median_ms(
                lambda qt=qt: q8.dequantize(qt), lambda bq=bq, st=bstate: bnbf.dequantize_blockwise(bq, st)
            ),
        }
        for op, (t_q8, t_bnb) in timings.items():
            rows.append((op, bs, t_q8, t_bnb, mb / t_q8 * 1e3, mb / t_bnb * 1e3, t_bnb / t_q8))
    return rows


def exactness_rows(datasets: dict[str, tuple[torch.Tensor, bool]]) -> list[tuple]:
    rows = []
    for name, (x, signed) in datasets.items():
        bnb_table = bnbf.create_dynamic_map(signed=signed)
        q8_code = "dynamic" if signed else "udynamic"
        for bs in BLOCKSIZES:
            ref = exact_codes(x, bnb_table, bs)
            qt = q8.quantize(x, q8_code, bs)
            bq, bstate = bnbf.quantize_blockwise(x, code=bnb_table, blocksize=bs)
            mis_q8 = (qt.codes != ref).double().mean().item()
            mis_bnb = (bq.reshape(-1) != ref).double().mean().item()
            err_q8 = rel_l2(x, q8.dequantize(qt))
            err_bnb = rel_l2(x, bnbf.dequantize_blockwise(bq, bstate))
            rows.append((name, q8_code, bs, mis_q8, mis_bnb, err_q8, err_bnb))
    return rows


def main() -> None:
    torch.manual_seed(0)
    normal = torch.randn(N)
    # Adam's second moment: squares of gradients whose scale varies over many decades.
    grads = torch.randn(N) * torch.exp(2.0 * torch.randn(N))
    second_moment = (1e-3 * grads) ** 2
    assert torch.equal(q8.dynamic_code(signed=False).values, bnbf.create_dynamic_map(signed=False))

    print(
        f"q8 vs bitsandbytes {bitsandbytes.__version__} CPU codec, {N} fp32 elements, "
        f"{torch.get_num_threads()} torch threads, medians of {REPEATS} alternating runs, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    print()
    print(f"{'op':<7} {'block':>5} {'q8 ms':>8} {'bnb ms':>8} {'q8 MB/s':>9} {'bnb MB/s':>9} {'q8/bnb':>7}")
    for op, bs, t_q8, t_bnb, r_q8, r_bnb, ratio in throughput_rows(normal):
        print(f"{op:<7} {bs:>5} {t_q8:>8.1f} {t_bnb:>8.1f} {r_q8:>9.0f} {r_bnb:>9.0f} {ratio:>6.2f}x")
    print()
    print("mismatch vs exact nearest (fraction of codes) and relative L2 error of the reconstruction")
    print(f"{'data':<12} {'code':<9} {'block':>5} {'q8 mis':>9} {'bnb mis':>9} {'q8 relL2':>9} {'bnb relL2':>9}")
    datasets = {"normal": (normal, True), "adam-v": (second_moment, False)}
    for name, code, bs, mis_q8, mis_bnb, err_q8, err_bnb in exactness_rows(datasets):
        print(f"{name:<12} {code:<9} {bs:>5} {mis_q8:>9.2e} {mis_bnb:>9.2e} {err_q8:>9.5f} {err_bnb:>9.5f}")


if __name__ == "__main__":
    main()
