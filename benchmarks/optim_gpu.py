"""8-bit optimizer benchmark on a CUDA GPU: q8 AdamW8bit (the fused Triton kernel
`q8.kernels.adam_update`) vs bitsandbytes AdamW8bit and torch AdamW (fused, fp32 state),
in the same run.

LAYERS fp32 parameters of 8192x8192 (16: 1.07B parameters, the scale issue 8 names), the
same random gradient for every parameter and optimizer; after WARMUP steps, the median
GPU time (CUDA events) of STEPS optimizer steps. Ratio: the other optimizer's time / q8's
(> 1: q8 is faster). q8's step includes its per-parameter NaN/inf check of the gradient
and the overflow flag read back (two small device-to-host syncs per parameter).

Exactness, in the same run: AdamW8bit on a CUDA parameter and on a CPU copy, three steps
with the same gradients, must end with identical parameter and state bytes.

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/optim_gpu.py
"""

from __future__ import annotations

import statistics

import torch

DIM, LAYERS = 8192, 16
WARMUP, STEPS = 3, 20


def median_step_ms(opt: torch.optim.Optimizer) -> float:
    for _ in range(WARMUP):
        opt.step()
    times = []
    for _ in range(STEPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_equals_cpu() -> bool:
    import q8

    gen = torch.Generator().manual_seed(0)
    cpu = torch.nn.Parameter(torch.randn(1 << 20, generator=gen))
    gpu = torch.nn.Parameter(cpu.detach().cuda())
    opts = [q8.optim.AdamW8bit([p], lr=1e-3) for p in (cpu, gpu)]
    for _ in range(3):
        cpu.grad = torch.randn(1 << 20, generator=gen)
        gpu.grad = cpu.grad.cuda()
        for opt in opts:
            opt.step()
    same = torch.equal(gpu.detach().cpu(), cpu.detach())
    for name in ("exp_avg", "exp_avg_sq"):
        ref, got = opts[0].state[cpu][name], opts[1].state[gpu][name]
        same = same and torch.equal(got.codes.cpu(), ref.codes) and torch.equal(got.absmax.cpu(), ref.absmax)
    return same


def main() -> None:
    if not torch.cuda.is_available():
        print("benchmarks/optim_gpu.py: no CUDA device here; this benchmark needs a GPU (skipped).")
        return
    import bitsandbytes
    import q8

    grad = torch.randn(DIM, DIM, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 1e-2
    start = torch.randn(DIM, DIM, device="cuda")
    makers = {
        "q8 AdamW8bit": lambda ps: q8.optim.AdamW8bit(ps, lr=1e-3),
        "bitsandbytes AdamW8bit": lambda ps: bitsandbytes.optim.AdamW8bit(ps, lr=1e-3),
        "torch AdamW (fused, fp32)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    }
    rows = []
    for name, make in makers.items():
        params = [torch.nn.Parameter(start.clone()) for _ in range(LAYERS)]
        for p in params:
            p.grad = grad
        opt = make(params)
        ms = median_step_ms(opt)
        rows.append((name, ms))
        del opt, params
        torch.cuda.empty_cache()
    q8_ms = rows[0][1]
    print(f"device: {torch.cuda.get_device_name()}, {LAYERS} fp32 parameters of {DIM}x{DIM} ({LAYERS * DIM * DIM:,})")
    print(f"q8 AdamW8bit on CUDA == on CPU after 3 steps (parameter, codes, absmax): {gpu_equals_cpu()}\n")
    print("| optimizer | median ms / step | time / q8's |")
    print("| --- | --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {ms / q8_ms:.2f}x |")


if __name__ == "__main__":
    main()
