"""q8convert benchmark: throughput and peak memory on a multi-GB sharded checkpoint.

Builds a synthetic sharded safetensors checkpoint (fp32, LLM-like shapes: 4096x4096 and
4096x1024 matrices with N(0, 0.02) entries, 1-D norms) and runs, each as a subprocess
whose peak RSS is read with os.wait4:

  - q8convert's default (--model-error auto: a first pass over a sample of every tensor,
    then the per-tensor search for each one's share), the search for one per-tensor target
    (--target-error 0.009, no first pass), the same without a target (--code auto: every
    tensor at blocksize 2048, the lower-error table; the default before targets) and
    q8convert --lossless;
  - anchors on the same bytes: safetensors load_file + save_file shard by shard, and
    zstd (level 1, the python zstandard binding, streaming) of the shard files.

Reports medians over REPEATS runs of MB/s of fp32 input (wall clock), CPU seconds,
peak RSS against the bound 2 x largest tensor + 300 MB, output size and ratio. The input
is read from the page cache (warm), as the anchors are.

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/convert.py [--gb 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

Q8CONVERT = str(Path(sys.executable).with_name("q8convert"))
SAFETENSORS_ROUNDTRIP = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for shard in sorted(src.glob("*.safetensors")):
    save_file(load_file(shard), dst / shard.name)
"""
ZSTD_STREAM = """
import sys
from pathlib import Path
import zstandard
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
cctx = zstandard.ZstdCompressor(level=1)
for shard in sorted(src.glob("*.safetensors")):
    with open(shard, "rb") as fin, open(dst / (shard.name + ".zst"), "wb") as fout:
        cctx.copy_stream(fin, fout)
"""


def build_checkpoint(folder: Path, gb: float) -> tuple[int, int]:
    """Shards of about 1 GB until `gb` GB of fp32; returns (total bytes, largest tensor bytes)."""
    g = torch.Generator().manual_seed(0)
    layer = {"attn.weight": (4096, 4096), "mlp.up.weight": (4096, 1024), "mlp.down.weight": (1024, 4096),
             "o.weight": (4096, 4096), "norm.weight": (4096,)}  # fmt: skip
    layer_bytes = sum(4 * torch.Size(s).numel() for s in layer.values())
    nlayers = max(1, round(gb * 1e9 / layer_bytes))
    per_shard = max(1, int(1e9 // layer_bytes))
    weight_map, total = {}, 0
    nshards = -(-nlayers // per_shard)
    for s in range(nshards):
        name = f"model-{s + 1:05d}-of-{nshards:05d}.safetensors"
        shard = {}
        for i in range(s * per_shard, min(nlayers, (s + 1) * per_shard)):
            for k, shape in layer.items():
                shard[f"layers.{i}.{k}"] = (
                    (torch.randn(shape, generator=g) * 0.02) if len(shape) > 1 else torch.ones(shape)
                )
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
        total += sum(t.nbytes for t in shard.values())
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total, 4 * 4096 * 4096


# A child's peak RSS starts at its parent's at fork time (Linux keeps the high-water mark
# across exec), and this process holds torch: commands are started from a small launcher.
LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
_, status, ru = os.wait4(proc.pid, 0)
print(json.dumps([time.perf_counter() - t0, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024, status]))
"""


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, cpu s, peak RSS bytes) of a command."""
    launcher = [sys.executable, "-S", "-c", LAUNCHER, *cmd]
    out = subprocess.run(launcher, env={**os.environ, "PYTHONSAFEPATH": "1"}, capture_output=True, text=True)
    wall, cpu, rss, status = json.loads(out.stdout.strip().splitlines()[-1])
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}:\n{out.stderr}")
    return wall, cpu, rss


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=3.0, help="checkpoint size in GB of fp32 (default 3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="q8-bench-convert-", dir=args.dir))
    try:
        src = root / "src"
        src.mkdir()
        total, largest = build_checkpoint(src, args.gb)
        index = str(src / "model.safetensors.index.json")
        out, q8_out = root / "out", root / "model.q8"
        methods = {
            "q8convert (default: --model-error auto)": ([Q8CONVERT, index, "-o", str(q8_out), "-q"], q8_out),
            "q8convert --target-error 0.009": (
                [Q8CONVERT, index, "-o", str(q8_out), "--target-error", "0.009", "-q"],
                q8_out,
            ),
            "q8convert --code auto (bs 2048, no target)": (
                [Q8CONVERT, index, "-o", str(q8_out), "--code", "auto", "-q"],
                q8_out,
            ),
            "q8convert --lossless": ([Q8CONVERT, index, "-o", str(q8_out), "--lossless", "-q"], q8_out),
            "safetensors load+save": ([sys.executable, "-c", SAFETENSORS_ROUNDTRIP, str(src), str(out)], out),
            "zstd -1 (stream)": ([sys.executable, "-c", ZSTD_STREAM, str(src), str(out)], out),
        }
        bound = 2 * largest + 300e6
        nshards = len(list(src.glob("*.safetensors")))
        print(f"checkpoint: {total / 1e9:.2f} GB fp32 in {nshards} shards, largest tensor {largest / 1e6:.0f} MB")
        print(f"peak RSS bound: 2 x largest tensor + 300 MB = {bound / 1e6:.0f} MB")
        results = {name: [] for name in methods}
        for r in range(args.repeats):  # interleaved, so machine load hits every method alike
            for name, (cmd, dst) in methods.items():
                wall, cpu, rss = measure(cmd)
                results[name].append((wall, cpu, rss, size_of(dst)))
                print(f"  run {r + 1}: {name}: {wall:.1f} s, cpu {cpu:.1f} s, rss {rss / 1e6:.0f} MB", flush=True)
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        rows = []
        q8_speed = None
        for name, runs in results.items():
            wall = statistics.median(x[0] for x in runs)
            cpu = statistics.median(x[1] for x in runs)
            rss = max(x[2] for x in runs)
            stored = runs[-1][3]
            speed = total / 1e6 / wall
            q8_speed = q8_speed or speed
            rows.append((name, f"{speed:.0f}", f"{total / 1e6 / cpu:.0f}", f"{rss / 1e6:.0f}",
                         "yes" if rss <= bound else "NO", f"{stored / 1e6:.0f}", f"{total / stored:.2f}x",
                         f"{q8_speed / speed:.2f}x"))  # fmt: skip
        header = ("method", "MB/s (wall)", "MB/s (cpu)", "peak RSS MB", "<= bound", "output MB", "ratio", "q8 speed vs")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for i, r in enumerate([header, *rows]):
            print(
                "  ".join(
                    str(c).ljust(w) if j == 0 else str(c).rjust(w)
                    for j, (c, w) in enumerate(zip(r, widths, strict=True))
                )
            )
            if i == 0:
                print("  ".join("-" * w for w in widths))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
