"""Everything q8 claims on a GPU, checked and measured by one command (about 5-8 minutes on
one H100/H200, from a clean checkout):

1. The kernel tests on CUDA: pytest on tests/test_kernels.py and tests/test_kernels_optim.py
   (the codec and all eight optimizer rules byte for byte against the CPU path, the
   no-device-read guard, a captured CUDA graph step replaying exactly).
2. The codec: encode / decode GB/s of q8's Triton kernels on 2^28 fp32 elements against a
   device-to-device copy (the ceiling) and bitsandbytes' CUDA kernels, and q8's GPU codes
   and decoded values against the CPU path byte for byte.
3. The optimizer step at 1.07B parameters (16 of 8192x8192), fp32 and bf16: q8 AdamW8bit
   against bitsandbytes AdamW8bit, torchao AdamW8bit and torch fused AdamW (median GPU
   time of a step); q8's step under `torch.cuda.set_sync_debug_mode("error")` (any host
   synchronization raises); q8 on CUDA against the C kernels after 3 steps; and 400
   nn.Linear(64, 64) (800 small parameters): eager steps (q8 with its small parameters
   batched into one launch per kind, and with one launch per parameter) and the GPU kernels
   each launches, a batched step that copies its tables again under the sync detector, and
   a step captured in a CUDA graph and replayed (its bytes against the
   eager steps').
4. Save / load of GPU tensors: `q8.save_file` of CUDA tensors and `q8.load_file(device=
   "cuda")`, lossless (exact) and quantized (decoded on the GPU, against the CPU decode),
   against safetensors; `q8.save_optimizer` / `q8.load_optimizer` of an AdamW8bit whose
   state lives on the GPU.

It prints markdown tables (for BENCHMARKS.md) and one `target ...: met / NOT met` line per
target of issue 13. Without CUDA it says so and exits 0.

`--cpu-smoke` runs the same code without a GPU: TRITON_INTERPRET=1, CPU tensors sent down
q8's CUDA code path (the Triton kernels, device-side flags), tiny sizes, the kernel tests
reduced to their argument checks. Its figures mean nothing; it proves that every code path
of this script runs (tests/test_gpu_check.py runs it in CI).

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/gpu_check.py [--cpu-smoke]
"""

from __future__ import annotations

import os
import sys

SMOKE = "--cpu-smoke" in sys.argv[1:]
if SMOKE:  # before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from optim import table  # noqa: E402  (benchmarks/optim.py: markdown tables)

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Sizes:
    codec: int  # elements of the codec benchmark
    check: int  # of those, compared with the CPU path
    dim: int  # the optimizer benchmark's parameters are layers x dim x dim
    layers: int
    small: int  # nn.Linear(64, 64) layers of the many-small-parameters case
    tensors: int  # save/load: this many dim x dim tensors
    repeats: int  # timed runs (medians)
    warmup: int
    tests_timeout: int  # seconds for the kernel tests


FULL = Sizes(codec=1 << 28, check=1 << 22, dim=8192, layers=16, small=400, tensors=4, repeats=20, warmup=3,
             tests_timeout=330)  # fmt: skip
TINY = Sizes(codec=1 << 12, check=1 << 11, dim=64, layers=2, small=3, tensors=2, repeats=2, warmup=1,
             tests_timeout=300)  # fmt: skip
SIZES = TINY if SMOKE else FULL
DEVICE = "cpu" if SMOKE else "cuda"
CUDA = not SMOKE
TARGETS: list[tuple[str, bool | None, str]] = []  # (target, met or None when not measured, figure)


def target(name: str, met: bool | None, figure: str) -> None:
    TARGETS.append((name, met, figure))


@contextlib.contextmanager
def triton_path(on: bool = True):
    """q8 optimizers take their CUDA code path for DEVICE's parameters (`on`), or the C
    kernels for CPU ones (`on=False`); on a GPU, CUDA parameters take it anyway."""
    from q8.optim import fused

    saved = fused.TRITON_DEVICES
    fused.TRITON_DEVICES = {"cuda", DEVICE} if on else {"cuda"}
    try:
        yield
    finally:
        fused.TRITON_DEVICES = saved


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], repeats: int | None = None) -> float:
    """Median time of fn() in ms after a warm-up: GPU time between CUDA events (the host's
    launch gaps included), wall time under --cpu-smoke."""
    fn()
    sync()
    times = []
    for _ in range(repeats or SIZES.repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def attempt(what: str, fn: Callable[[], object]):
    """fn(), or None after printing why it failed or could not run (an anchor missing its
    kernels or not installed must not stop the rest of the check)."""
    try:
        return fn()
    except ModuleNotFoundError as err:  # an anchor not installed: the figures say n/a
        print(f"{what}: {err.name} is not installed (pip install '.[bench]')")
        return None
    except Exception as err:
        print(f"{what} failed: {type(err).__name__}: {err}")
        traceback.print_exc(limit=3, file=sys.stdout)
        return None


def fmt(x: float | None, spec: str = ".3f", unit: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + unit


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8).cpu(), b.contiguous().view(torch.uint8).cpu()
    )


# ---- 1. the kernel tests ----------------------------------------------------------------------


def kernel_tests() -> None:
    print("## Kernel tests\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
           "tests/test_kernels_optim.py"]  # fmt: skip
    if SMOKE:
        cmd += ["-k", "argument_errors"]  # the interpreter is slow: the command's dry run
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    print("`" + " ".join(cmd[1:]) + "`\n")
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=SIZES.tests_timeout)
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        passed = proc.returncode == 0
        if not passed:
            print("```\n" + (proc.stdout + proc.stderr)[-6000:] + "\n```\n")
    except subprocess.TimeoutExpired:
        summary, passed = f"timed out after {SIZES.tests_timeout} s", False
    print(summary + "\n")
    target("kernel tests pass on CUDA", passed, summary)


# ---- 2. the codec -----------------------------------------------------------------------------


def gbps(nbytes: int, ms: float | None) -> float | None:
    return None if ms is None else nbytes / ms / 1e6


def codec() -> None:
    from q8 import kernels
    from q8.codec import get_code, native

    n, check = SIZES.codec, SIZES.check
    code = get_code("dynamic")
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    dst = torch.empty_like(x)
    copy_bw = gbps(2 * 4 * n, median_ms(lambda: dst.copy_(x)))
    print(f"## Codec: {n:,} fp32 elements, signed dynamic code; device copy {copy_bw:.0f} GB/s\n")
    rows, exact_all, fractions = [], True, []
    for blocksize in (256, 2048):
        nblocks = -(-n // blocksize)
        codes, absmax, bad = kernels.encode(x, code, blocksize)
        ref_codes, ref_absmax, _ = native.encode(x[:check].cpu(), code, blocksize)
        decoded = kernels.decode(codes[:check], absmax[: check // blocksize], code, blocksize)
        exact = (
            bad == -1
            and same_bytes(codes[:check], ref_codes)
            and same_bytes(absmax[: check // blocksize], ref_absmax)
            and same_bytes(decoded, native.decode(ref_codes, ref_absmax, code, blocksize))
        )
        exact_all &= exact
        q8_ms = {
            "encode": median_ms(lambda bs=blocksize: kernels.encode(x, code, bs)),
            "decode": median_ms(lambda bs=blocksize, c=codes, a=absmax: kernels.decode(c, a, code, bs)),
        }
        bnb_ms, same = bnb_codec(x, code, blocksize, codes)
        for op in ("encode", "decode"):
            nbytes = 4 * n + n + 4 * nblocks
            q8_bw, bnb_bw = gbps(nbytes, q8_ms[op]), gbps(nbytes, bnb_ms[op])
            fractions.append((op, blocksize, q8_bw / copy_bw))
            ratio = None if bnb_ms[op] is None else bnb_ms[op] / q8_ms[op]
            rows.append((op, blocksize, fmt(q8_ms[op]), fmt(q8_bw, ".0f"), f"{100 * q8_bw / copy_bw:.0f}%",
                         fmt(bnb_ms[op]), fmt(bnb_bw, ".0f"), fmt(ratio, ".2f", "x")))  # fmt: skip
        print(f"blocksize {blocksize}: q8 GPU == CPU path on the first {check:,} elements: {exact}; "
              f"codes equal to bitsandbytes': {fmt(same, '.4%')}")  # fmt: skip
    print()
    table(("op", "blocksize", "q8 ms", "q8 GB/s", "q8 % of copy", "bnb ms", "bnb GB/s", "q8 / bnb speed"), rows)
    worst = min(fractions, key=lambda f: f[2])
    target(
        "codec >= 85% of device copy bandwidth",
        worst[2] >= 0.85,
        f"lowest {worst[0]} (blocksize {worst[1]}): {worst[2]:.0%}",
    )
    target("codec on the GPU == CPU path, byte for byte", exact_all, str(exact_all))


def bnb_codec(x: torch.Tensor, code, blocksize: int, codes: torch.Tensor) -> tuple[dict, float | None]:
    """bitsandbytes' encode / decode times ({op: ms or None}) and the fraction of its codes
    equal to q8's (same table)."""

    def run():
        import bitsandbytes.functional as bnbf

        table_ = code.values.to(x.device)
        bnb_codes, state = bnbf.quantize_blockwise(x, code=table_, blocksize=blocksize)
        times = {
            "encode": median_ms(lambda: bnbf.quantize_blockwise(x, code=table_, blocksize=blocksize)),
            "decode": median_ms(lambda: bnbf.dequantize_blockwise(bnb_codes, state)),
        }
        return times, float((bnb_codes.flatten() == codes).float().mean())

    return attempt("bitsandbytes codec", run) or ({"encode": None, "decode": None}, None)


# ---- 3. the optimizer step --------------------------------------------------------------------


def step_anchors() -> dict[str, Callable]:
    import q8

    def bnb(params):
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=1e-3)

    def torchao(params):
        import torchao.optim

        return torchao.optim.AdamW8bit(params, lr=1e-3)

    return {
        "q8 AdamW8bit": lambda params: q8.optim.AdamW8bit(params, lr=1e-3),
        "bitsandbytes AdamW8bit": bnb,
        "torchao AdamW8bit": torchao,
        "torch AdamW (fused)": lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
    }


def large_step(dtype: torch.dtype) -> dict[str, float | None]:
    """Median ms of one step on SIZES.layers dim x dim parameters of `dtype`, per optimizer;
    q8's steps after the warm-up run with host synchronization forbidden."""
    dim, layers = SIZES.dim, SIZES.layers
    g = torch.Generator().manual_seed(0)
    start = torch.randn(dim, dim, generator=g).to(DEVICE, dtype)
    grad = (torch.randn(dim, dim, generator=g) * 1e-2).to(DEVICE, dtype)
    times = {}
    for name, make in step_anchors().items():

        def run(make=make, name=name):
            params = [torch.nn.Parameter(start.clone()) for _ in range(layers)]
            for p in params:
                p.grad = grad
            opt = make(params)
            for _ in range(SIZES.warmup):
                opt.step()
            if name.startswith("q8"):
                no_sync_step(opt, dtype)
            return median_ms(opt.step)

        with triton_path():
            times[name] = attempt(f"{name} ({dtype})", run)
        if CUDA:
            torch.cuda.empty_cache()
    return times


def no_sync_step(opt: torch.optim.Optimizer, what: object) -> None:
    """One step with torch's synchronization detector raising on any host sync (CUDA)."""
    name = f"a q8 step ({what}) never synchronizes the host"
    if not CUDA:
        opt.step()
        target(name, None, "CUDA only")
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        target(name, True, 'set_sync_debug_mode("error") stayed silent')
    except RuntimeError as err:
        target(name, False, str(err).splitlines()[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def gpu_equals_cpu() -> bool:
    """AdamW8bit on a DEVICE parameter (the CUDA code path) and on a CPU copy (the C
    kernels): three steps with the same gradients end with the same bytes."""
    import q8

    n = SIZES.check // 2
    gen = torch.Generator().manual_seed(0)
    cpu = torch.nn.Parameter(torch.randn(n // 256, 256, generator=gen))
    dev = torch.nn.Parameter(cpu.detach().clone().to(DEVICE))
    opts = [q8.optim.AdamW8bit([p], lr=1e-3, min_8bit_size=0) for p in (cpu, dev)]
    for _ in range(3):
        cpu.grad = torch.randn(cpu.shape, generator=gen)
        dev.grad = cpu.grad.to(DEVICE)
        with triton_path(False):
            opts[0].step()
        with triton_path():
            opts[1].step()
    same = same_bytes(dev, cpu)
    for name in ("exp_avg", "exp_avg_sq"):
        ref, got = opts[0].state[cpu][name], opts[1].state[dev][name]
        same = same and same_bytes(got.codes, ref.codes) and same_bytes(got.absmax, ref.absmax)
    return same


def launches(step: Callable[[], object]) -> int | None:
    """GPU kernels one call of step() launches (torch.profiler; memory copies not counted);
    None without CUDA."""
    if not CUDA:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for e in kernels if not e.name.startswith(("Memcpy", "Memset")))


@contextlib.contextmanager
def batch_numel(numel: int):
    """q8's small-parameter batching limit set to `numel` (0: one launch per parameter)."""
    from q8.optim import cuda

    saved = cuda.BATCH_NUMEL
    cuda.BATCH_NUMEL = numel
    try:
        yield
    finally:
        cuda.BATCH_NUMEL = saved


def small_steps() -> list[tuple]:
    """SIZES.small nn.Linear(64, 64): eager steps of q8 (small parameters batched, and one
    launch per parameter as before) and torch, the kernels each launches, and q8's step
    captured in a CUDA graph (replayed; its result compared with the eager steps' bytes)."""
    import q8
    from q8.optim import cuda

    torch.manual_seed(0)
    template = [p.detach().to(DEVICE) for _ in range(SIZES.small) for p in torch.nn.Linear(64, 64).parameters()]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen).to(DEVICE) * 1e-2 for p in template]

    def q8_adamw(params):
        return q8.optim.AdamW8bit(params, lr=1e-3)

    makers = {
        ("q8 AdamW8bit", "eager, small parameters batched", cuda.BATCH_NUMEL): q8_adamw,
        ("q8 AdamW8bit", "eager, one launch per parameter", 0): q8_adamw,
        ("torch AdamW (foreach)", "eager", 0): lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        ("torch AdamW (fused)", "eager", 0): lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    }
    rows, times = [], {}
    for (name, how, numel), make in makers.items():
        params = [torch.nn.Parameter(t.clone()) for t in template]
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        with triton_path(), batch_numel(numel):
            opt = make(params)
            ms = times[how] = attempt(name, lambda opt=opt: median_ms(opt.step))
            count = attempt(name, lambda opt=opt: launches(opt.step))
            if name.startswith("q8") and numel:
                for p in params:
                    p.grad = p.grad.clone()  # new tensors: the step copies its batches' tables again
                no_sync_step(opt, f"{len(params)} small parameters batched, new .grad tensors")
        rows.append((name, how, fmt(count, "d"), fmt(ms)))
    batched, single = times["eager, small parameters batched"], times["eager, one launch per parameter"]
    speed = None if batched is None or single is None else single / batched
    print(f"q8's eager step, small parameters batched: {fmt(speed, '.2f', 'x')} as fast as one launch each\n")
    if CUDA:
        replay = graphed_step(q8_adamw, template, grads)
        rows.append(("q8 AdamW8bit", "CUDA graph replay", "1 graph", replay))
    else:
        target("a captured q8 step replays with eager bytes", None, "CUDA only")
    return rows


def graphed_step(make: Callable, template: list, grads: list) -> str:
    import q8

    eager_params = [torch.nn.Parameter(t.clone()) for t in template]
    params = [torch.nn.Parameter(t.clone()) for t in template]
    for p, grad in zip(params + eager_params, grads + grads, strict=True):
        p.grad = grad.clone()
    eager, graphed = make(eager_params), make(params)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graphed.step()  # creates the state and compiles the kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    ms = median_ms(graph.replay, repeats=SIZES.repeats)
    for _ in range(1 + 1 + SIZES.repeats):  # as many as the graphed optimizer took: warm-up + replays
        eager.step()
    torch.cuda.synchronize()
    same = all(same_bytes(a, b) for a, b in zip(params, eager_params, strict=True))
    for a, b in zip(params, eager_params, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = graphed.state[a][key], eager.state[b][key]
            if isinstance(x, q8.QTensor):
                same = same and same_bytes(x.codes, y.codes) and same_bytes(x.absmax, y.absmax)
            else:
                same = same and same_bytes(x, y)
    target("a captured q8 step replays with eager bytes", same, f"{SIZES.repeats + 2} steps, {len(params)} parameters")
    return fmt(ms)


def optimizer() -> None:
    dim, layers = SIZES.dim, SIZES.layers
    print(f"## AdamW step: {layers} parameters of {dim}x{dim} ({layers * dim * dim:,}), median GPU ms\n")
    rows, by_dtype = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        times = by_dtype[dtype] = large_step(dtype)
        base = times["q8 AdamW8bit"]
        for name, ms in times.items():
            ratio = None if ms is None or base is None else ms / base
            rows.append((name, str(dtype).removeprefix("torch."), fmt(ms), fmt(ratio, ".2f", "x")))
    table(("optimizer", "parameters", "ms / step", "time / q8's"), rows)
    same = gpu_equals_cpu()
    print(f"q8 AdamW8bit on {DEVICE} (CUDA code path) == the C kernels after 3 steps: {same}\n")
    target("q8 AdamW8bit on the GPU == CPU, byte for byte", same, str(same))
    print(f"## {SIZES.small} nn.Linear(64, 64): {2 * SIZES.small} small parameters, AdamW, median GPU ms\n")
    table(("optimizer", "step", "GPU kernels / step", "ms / step"), small_steps())
    for dtype, times in by_dtype.items():
        q8_ms = times["q8 AdamW8bit"]
        for anchor, factor in (("torch AdamW (fused)", 1.5), ("bitsandbytes AdamW8bit", 1.0)):
            other = times[anchor]
            speed = None if q8_ms is None or other is None else other / q8_ms
            met = None if speed is None else speed >= factor
            target(f"AdamW8bit ({dtype}) >= {factor}x as fast as {anchor}", met, fmt(speed, ".2f", "x"))


# ---- 4. save / load of GPU tensors ------------------------------------------------------------


def save_load() -> None:
    import q8
    import safetensors.torch

    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": (torch.randn(SIZES.dim, SIZES.dim, generator=g) * 0.02).to(DEVICE)
               for i in range(SIZES.tensors)}  # fmt: skip
    nbytes = sum(t.nbytes for t in tensors.values())
    print(f"## Save / load of {len(tensors)} fp32 tensors on {DEVICE} ({nbytes / 2**20:.0f} MiB)\n")
    rows, exact = [], True
    with tempfile.TemporaryDirectory() as folder:
        paths = {name: Path(folder, f"{name}.bin") for name in ("lossless", "quantized", "safetensors")}
        saves = {
            "q8 lossless": lambda: q8.save_file(tensors, paths["lossless"]),
            "q8 quantized": lambda: q8.save_file(tensors, paths["quantized"], quantize=True),
            "safetensors": lambda: safetensors.torch.save_file(tensors, paths["safetensors"]),
        }
        loads = {
            "q8 lossless": lambda: q8.load_file(paths["lossless"], device=DEVICE),
            "q8 quantized": lambda: q8.load_file(paths["quantized"], device=DEVICE),
            "safetensors": lambda: safetensors.torch.load_file(paths["safetensors"], device=DEVICE),
        }
        for (name, save), load, path in zip(saves.items(), loads.values(), paths.values(), strict=True):
            save_ms = median_ms(save, repeats=3)
            load_ms = median_ms(lambda load=load: (load(), sync()), repeats=3)
            rows.append((name, f"{path.stat().st_size / 2**20:.1f}", f"{save_ms / 1e3:.2f}", f"{load_ms / 1e3:.2f}"))
        lossless = q8.load_file(paths["lossless"], device=DEVICE)
        exact &= all(same_bytes(lossless[k], t) for k, t in tensors.items())
        on_gpu, on_cpu = q8.load_file(paths["quantized"], device=DEVICE), q8.load_file(paths["quantized"])
        exact &= all(v.device.type == torch.device(DEVICE).type and same_bytes(v, on_cpu[k]) for k, v in on_gpu.items())
        exact &= optimizer_round_trip(Path(folder, "opt.q8"))
    table(("format", "file MiB", "save s", f"load to {DEVICE} s"), rows)
    print(f"lossless exact, quantized decoded on {DEVICE} == on CPU, optimizer state round trip: {exact}\n")
    target("save / load of GPU tensors and GPU optimizer state exact", exact, str(exact))


def optimizer_round_trip(path: Path) -> bool:
    """An AdamW8bit with state on DEVICE (step counts on the device), saved and loaded into
    a fresh one: same state bytes, and the next step of both gives the same parameters."""
    import q8

    params = [torch.nn.Parameter(torch.randn(256, 256).to(DEVICE)) for _ in range(2)]
    with triton_path():
        opt = q8.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=0)
        for p in params:
            p.grad = torch.randn(p.shape).to(DEVICE)
        opt.step()
        q8.save_optimizer(opt, path)
        clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
        again = q8.optim.AdamW8bit(clones, lr=1e-3, min_8bit_size=0)
        q8.load_optimizer(again, path)
        for a, b in zip(params, clones, strict=True):
            b.grad = a.grad.clone()
        opt.step()
        again.step()
    sync()
    return all(same_bytes(a, b) for a, b in zip(params, clones, strict=True)) and all(
        same_bytes(opt.state[a]["exp_avg"].codes, again.state[b]["exp_avg"].codes)
        for a, b in zip(params, clones, strict=True)
    )


# ---- the command ------------------------------------------------------------------------------


def main() -> int:
    if not (SMOKE or torch.cuda.is_available()):
        print("benchmarks/gpu_check.py: no CUDA device here; the GPU check needs one (nothing run). "
              "--cpu-smoke runs its code paths on CPU under the Triton interpreter.")  # fmt: skip
        return 0
    warnings.filterwarnings("ignore")
    import q8  # noqa: F401  (before timing: imports triton, builds nothing)

    t0 = time.perf_counter()
    where = "--cpu-smoke: CPU under TRITON_INTERPRET=1, tiny sizes, figures meaningless"
    machine = where if SMOKE else f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"# q8 GPU check ({machine})\n")
    for section in (kernel_tests, codec, optimizer, save_load):
        attempt(section.__name__, section)
    print(f"took {time.perf_counter() - t0:.0f} s\n")
    for name, met, figure in TARGETS:
        verdict = "not measured" if met is None else "met" if met else "NOT met"
        print(f"target {name}: {figure} -- {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
