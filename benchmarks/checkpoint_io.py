"""Checkpoint I/O off the training path: async save stall, load time and memory, optimizer files.

Three studies, same run, same data:

1. Save stall: how long a save blocks the caller, on a ~1 GB fp32 state dict shaped like a
   260M-parameter decoder (benchmarks/formats.py). `q8.async_save_file` returns after the
   snapshot (first call: fresh buffers; then: buffers reused from the pool) against the
   blocking `torch.save`, `safetensors.torch.save_file` and `q8.save_file`, and against
   `torch.distributed.checkpoint.async_save` (one process). Each save's background part is
   waited for before the next one starts; "done" is the time until the file is complete.
2. Load: time and peak extra memory, each load in a fresh process (VmHWM after writing 5
   to /proc/self/clear_refs, minus the resident size before the load), until one byte of
   every page of every tensor was read: `q8.load_file` (lossless and 8-bit files),
   `safetensors.torch.load_file` (lazy map), `torch.load(weights_only=True)`, and ZipNN
   0.5.4 (its per-tensor blobs read from one file and decompressed on the same threads). The
   lossless decode throughput compares q8's load (read + checksum + decode) with ZipNN's
   (read + decompress, no checksum) and with ZipNN's decompression alone.
3. Optimizer file round trip: AdamW8bit state of a GPT-2-shaped model after a few steps,
   `q8.save_optimizer` / `q8.load_optimizer` (8-bit state stored as is, the default, and
   entropy-coded with `compress_codes=True`) against `torch.save(opt.state_dict())` /
   `opt.load_state_dict(torch.load(...))`, interleaved round by round, the file sizes, and
   the stall of `q8.async_save_optimizer`. q8's saves fsync the file (atomic, durable);
   `torch.save` + fsync is shown too.

Times are medians of REPEATS (loads: of LOAD_ROUNDS rounds, each loading every file once);
the machine's load average is printed with them (compare within one run). Run:
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/checkpoint_io.py [--scale 1.0] [--plot out.png]
    (--only load: section 2 alone, the lossless decode against ZipNN; --only optimizer: section 3)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import q8
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).parent))
from formats import REPEATS, fsynced, state_dict, touch


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# -- 1. save stall -------------------------------------------------------------------------


def stall_and_done(start: Callable[[], Callable[[], object]]) -> tuple[float, float]:
    """(seconds until `start()` returns, seconds until the wait it returns is over)."""
    t0 = time.perf_counter()
    wait = start()
    t1 = time.perf_counter()
    wait()
    return t1 - t0, time.perf_counter() - t0


def blocking(save: Callable[[], object]) -> Callable[[], Callable[[], None]]:
    def start():
        save()
        return lambda: None

    return start


def save_stalls(sd: dict[str, torch.Tensor], folder: Path) -> list[tuple[str, float, float]]:
    import torch.distributed.checkpoint as dcp

    q8.formats.release_buffers()
    first = stall_and_done(lambda: q8.async_save_file(sd, folder / "a.q8").result)
    contenders = {
        "torch.save": blocking(lambda: torch.save(sd, folder / "t.pt")),
        "torch.save + fsync": blocking(lambda: fsynced(torch.save, sd, folder / "t.pt")),
        "safetensors.save_file": blocking(lambda: safetensors.torch.save_file(sd, folder / "s.safetensors")),
        "q8.save_file (blocking)": blocking(lambda: q8.save_file(sd, folder / "b.q8")),
        "dcp.async_save": lambda: dcp.async_save(sd, checkpoint_id=str(folder / "dcp")).result,
        "q8.async_save_file": lambda: q8.async_save_file(sd, folder / "a.q8").result,
    }
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group is initialized
        for name, start in contenders.items():
            runs = [stall_and_done(start) for _ in range(REPEATS)]
            rows.append((name, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)))
    rows.insert(-1, ("q8.async_save_file, first call", *first))
    return rows


# -- 2. loads in fresh processes -------------------------------------------------------------


def zipnn(threads: int):
    from zipnn import ZipNN

    return lambda dtype: ZipNN(input_format="byte", bytearray_dtype={torch.float32: "float32"}[dtype], threads=threads)


def zipnn_save(sd: dict[str, torch.Tensor], path: Path) -> None:
    make = zipnn(torch.get_num_threads())
    with open(path, "wb") as f:
        for x in sd.values():
            blob = make(x.dtype).compress(bytearray(x.contiguous().view(-1).view(torch.uint8).numpy().tobytes()))
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)


def zipnn_load(path: Path, like: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """The tensors, and the seconds spent in ZipNN's decompression alone."""
    make = zipnn(torch.get_num_threads())
    out, decompress = {}, 0.0
    with open(path, "rb") as f:
        for name, (dtype, shape) in like.items():
            blob = f.read(int.from_bytes(f.read(8), "little"))
            t0 = time.perf_counter()
            raw = make(dtype).decompress(blob)
            decompress += time.perf_counter() - t0
            out[name] = torch.frombuffer(raw, dtype=dtype).view(shape)
    return out, decompress


def child_load(kind: str, path: str, layout: str) -> None:
    """In a fresh process: load, touch every page; print seconds and the peak memory it added."""
    like = {name: (getattr(torch, dtype), tuple(shape)) for name, (dtype, shape) in json.loads(layout).items()}
    loaders = {
        "q8": q8.load_file,
        "safetensors": safetensors.torch.load_file,
        "torch.load": lambda p: torch.load(p, weights_only=True),
        "zipnn": lambda p: zipnn_load(Path(p), like),
    }
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    out = loaders[kind](path)
    out, decompress = out if kind == "zipnn" else (out, None)
    touch(out)
    seconds = time.perf_counter() - t0
    extra = _status("VmHWM") - before
    data = sum(x.numel() * x.element_size() for x in out.values())
    print(json.dumps({"seconds": seconds, "extra": extra, "data": data, "decompress": decompress}))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


LOAD_ROUNDS = 5
"""Rounds of fresh-process loads; each round loads every file once, so a spell of load
from other jobs on the machine hits every contender alike."""


def fresh_load(kind: str, path: Path, sd: dict[str, torch.Tensor]) -> dict:
    layout = json.dumps({k: (str(v.dtype).removeprefix("torch."), list(v.shape)) for k, v in sd.items()})
    command = [sys.executable, __file__, "--child", kind, str(path), layout]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"loading {path} with {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def loads(sd: dict[str, torch.Tensor], folder: Path) -> list[tuple[str, int, list[dict]]]:
    """(contender, file size, its runs: one per round)."""
    files = {
        "q8 lossless": ("q8", folder / "l.q8", lambda p: q8.save_file(sd, p)),
        "q8 8-bit": ("q8", folder / "q.q8", lambda p: q8.save_file(sd, p, quantize=True)),
        "safetensors": ("safetensors", folder / "s.safetensors", lambda p: safetensors.torch.save_file(sd, p)),
        "torch.load": ("torch.load", folder / "t.pt", lambda p: torch.save(sd, p)),
        "ZipNN": ("zipnn", folder / "z.zipnn", lambda p: zipnn_save(sd, p)),
    }
    for _, path, save in files.values():
        save(path)
    runs: dict[str, list[dict]] = {name: [] for name in files}
    for _ in range(LOAD_ROUNDS):
        for name, (kind, path, _) in files.items():
            runs[name].append(fresh_load(kind, path, sd))
    rows = [(name, path.stat().st_size, runs[name]) for name, (_, path, _) in files.items()]
    for _, path, _ in files.values():
        path.unlink()
    return rows


def summary(runs: list[dict]) -> dict:
    """The median time and the worst memory of a contender's runs."""
    seconds = statistics.median(r["seconds"] for r in runs)
    decompress = [r["decompress"] for r in runs if r["decompress"] is not None]
    return {
        "seconds": seconds,
        "extra": max(r["extra"] for r in runs),
        "data": runs[0]["data"],
        "decompress": statistics.median(decompress) if decompress else None,
    }


# -- 3. optimizer files ----------------------------------------------------------------------


OPTIMIZER_ROUNDS = 11


def optimizer_round_trip(folder: Path) -> tuple[list[tuple[str, float, float | None]], dict, dict[str, int]]:
    """Rows (contender, median save s, median load s), the q8 / torch ratios of every round
    and the file sizes. Each round saves and loads with every contender once, so a spell of
    load on the machine hits them alike."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=8192, n_positions=256, n_embd=512, n_layer=8, n_head=8)
    model = GPT2LMHeadModel(config)
    opt = q8.optim.AdamW8bit(model.parameters(), lr=1e-3)
    for _ in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 64))
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    tensors = sum(len(s) - 1 for s in opt.state.values())
    print(f"\nAdamW8bit state: {tensors} tensors, {opt.state_nbytes() / 1e6:.1f} MB (GPT-2 n_embd 512, 8 layers)")
    pt, fast, small = folder / "opt.pt", folder / "opt.q8", folder / "opt-compressed.q8"
    saves = {
        "torch.save": lambda: torch.save(opt.state_dict(), pt),
        "torch.save + fsync": lambda: fsynced(torch.save, opt.state_dict(), pt),
        "q8.save_optimizer": lambda: q8.save_optimizer(opt, fast),
        "q8.save_optimizer(compress_codes=True)": lambda: q8.save_optimizer(opt, small, compress_codes=True),
    }
    loads = {
        "torch.save": lambda: opt.load_state_dict(torch.load(pt, weights_only=True)),
        "q8.save_optimizer": lambda: q8.load_optimizer(opt, fast),
        "q8.save_optimizer(compress_codes=True)": lambda: q8.load_optimizer(opt, small),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(OPTIMIZER_ROUNDS):
        for kind, contenders in (("save", saves), ("load", loads)):
            for name, run in contenders.items():
                t0 = time.perf_counter()
                run()
                times.setdefault((kind, name), []).append(time.perf_counter() - t0)
    stall = statistics.median(
        stall_and_done(lambda: q8.async_save_optimizer(opt, folder / "a.q8").result)[0] for _ in range(REPEATS)
    )
    median = {key: statistics.median(values) for key, values in times.items()}
    rows = [(name, median["save", name], median.get(("load", name))) for name in saves]
    rows.append(("q8.async_save_optimizer (caller blocked)", stall, None))
    ratios = {
        kind: [q / t for q, t in zip(times[kind, "q8.save_optimizer"], times[kind, "torch.save"], strict=True)]
        for kind in ("save", "load")
    }
    sizes = {"optimizer.pt": pt.stat().st_size, "optimizer.q8": fast.stat().st_size,
             "optimizer.q8 (compress_codes=True)": small.stat().st_size}  # fmt: skip
    return rows, ratios, sizes


# -- report ----------------------------------------------------------------------------------


SECTIONS = ("save", "load", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the ~1 GB fp32 state dict")
    parser.add_argument("--plot", type=Path, help="write the figures as a PNG here (needs every section)")
    parser.add_argument("--only", choices=SECTIONS, help="run this section alone (1. save, 2. load, 3. optimizer)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_load(*args.child)
    if args.only and args.plot:
        parser.error("--plot draws every section: drop --only")
    print(f"q8 {q8.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, {REPEATS} repeats")
    sd = state_dict(torch.float32, args.scale)
    raw = sum(x.numel() * x.element_size() for x in sd.values())
    with tempfile.TemporaryDirectory(dir=os.environ.get("Q8_BENCH_DIR")) as d:
        folder = Path(d)
        stalls = report_stalls(sd, raw, folder) if args.only in (None, "save") else None
        rows = report_loads(sd, raw, folder) if args.only in (None, "load") else None
        if args.only in (None, "optimizer"):
            report_optimizer(folder)
    if args.plot:
        plot(stalls, rows, raw, args.plot)


def report_stalls(sd: dict[str, torch.Tensor], raw: int, folder: Path) -> list[tuple[str, float, float]]:
    print(f"\n1. save stall, {len(sd)} fp32 tensors, {raw / 1e9:.3f} GB (load average {load_average()})")
    stalls = save_stalls(sd, folder)
    q8.formats.release_buffers()
    print(f"{'contender':34} {'stall s':>8} {'done s':>8}")
    for name, stall, done in stalls:
        print(f"{name:34} {stall:>8.3f} {done:>8.3f}")
    t_save = dict((n, s) for n, s, _ in stalls)
    steady = t_save["q8.async_save_file"]
    print(f"q8 async stall / torch.save: {steady / t_save['torch.save']:.2f} (target <= 0.5)")
    print(f"q8 async stall / dcp.async_save stall: {steady / t_save['dcp.async_save']:.2f}")
    return stalls


def report_loads(sd: dict[str, torch.Tensor], raw: int, folder: Path) -> list[tuple[str, int, dict]]:
    print(f"\n2. load in a fresh process, medians of {LOAD_ROUNDS} rounds (load average {load_average()})")
    runs = loads(sd, folder)
    rows = [(name, size, summary(r)) for name, size, r in runs]
    print(f"{'contender':14} {'file MB':>9} {'load s':>7} {'MB/s':>7} {'extra memory':>13} {'/ data':>7}")
    for name, size, r in rows:
        print(
            f"{name:14} {size / 1e6:>9.1f} {r['seconds']:>7.3f} {raw / r['seconds'] / 1e6:>7.0f} "
            f"{r['extra'] / 1e6:>10.1f} MB {r['extra'] / r['data']:>6.2f}x"
        )
    by = {name: r for name, _, r in rows}
    q8_s, zip_s, zip_decode = by["q8 lossless"]["seconds"], by["ZipNN"]["seconds"], by["ZipNN"]["decompress"]
    pairs = dict((name, r) for name, _, r in runs)
    ratios = [z["seconds"] / q["seconds"] for q, z in zip(pairs["q8 lossless"], pairs["ZipNN"], strict=True)]
    print(
        f"lossless throughput: q8 load {raw / q8_s / 1e6:.0f} MB/s, ZipNN read + decompress "
        f"{raw / zip_s / 1e6:.0f} MB/s, ZipNN decompress alone {raw / zip_decode / 1e6:.0f} MB/s"
    )
    print(
        f"q8 load throughput / ZipNN's, each round: {' '.join(f'{x:.2f}' for x in ratios)}; "
        f"median {statistics.median(ratios):.2f}x (target >= 1)"
    )
    print(f"q8 lossless peak extra memory: {by['q8 lossless']['extra'] / raw:.3f}x the data (target <= 1.15)")
    print(f"(load average {load_average()})")
    return rows


def report_optimizer(folder: Path) -> None:
    print(f"\n3. optimizer file, {OPTIMIZER_ROUNDS} interleaved rounds (load average {load_average()})")
    rows, ratios, sizes = optimizer_round_trip(folder)
    print(f"{'contender (save / load)':44} {'save s':>8} {'load s':>8}")
    for name, save, load in rows:
        print(f"{name:44} {save:>8.3f} {load:>8.3f}" if load else f"{name:44} {save:>8.3f}")
    by = {name: (save, load) for name, save, load in rows}
    (q_save, q_load), (t_save, t_load) = by["q8.save_optimizer"], by["torch.save"]
    print(
        f"q8 / torch, medians: save {q_save / t_save:.2f} ({q_save / by['torch.save + fsync'][0]:.2f} of torch.save "
        f"+ fsync), load {q_load / t_load:.2f} (targets <= 1.0)"
    )
    for kind, values in ratios.items():
        print(f"q8 / torch {kind}, each round: {' '.join(f'{x:.2f}' for x in values)}")
    print("files: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    print(f"(load average {load_average()})")


def plot(stalls: list, rows: list, raw: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    names = [n for n, _, _ in stalls]
    axes[0].barh(names, [s for _, s, _ in stalls], color=["#4c72b0" if "q8" in n else "#999999" for n in names])
    axes[0].set_xlabel("seconds the caller is blocked (save stall)")
    axes[0].invert_yaxis()
    names = [n for n, _, _ in rows]
    colors = ["#4c72b0" if "q8" in n else "#999999" for n in names]
    axes[1].barh(names, [r["seconds"] for _, _, r in rows], color=colors)
    axes[1].set_xlabel("load seconds (fresh process, every page read)")
    axes[1].invert_yaxis()
    axes[2].barh(names, [r["extra"] / raw for _, _, r in rows], color=colors)
    axes[2].axvline(1.15, color="#c44e52", linestyle="--", label="target 1.15x")
    axes[2].set_xlabel("peak extra memory of the load / data")
    axes[2].invert_yaxis()
    axes[2].legend(loc="lower right")
    fig.suptitle(f"Checkpoint I/O, {raw / 1e9:.2f} GB fp32 state dict, {torch.get_num_threads()} CPU threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
