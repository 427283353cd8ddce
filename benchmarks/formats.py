"""Container benchmark: size and save/load time of q8 vs safetensors, torch.save, zstd and ZipNN.

Data: a ~1 GB (fp32) state dict shaped like a 260M-parameter decoder (32000x1024
embedding, 18 layers of attention + MLP Linear weights, LayerNorm weights and biases) and
the same in bf16. There is no network here, so no downloaded checkpoint: values are
drawn with realistic per-tensor statistics — embedding N(0, 1), Linear weights
N(0, 0.02) with a per-output-row log-normal scale (rows of trained weights differ in norm),
a few large outliers (as in trained LLMs), LayerNorm weights 1 + N(0, 0.05) and biases
N(0, 0.01). Lossless ratios depend on the exponent distribution only (mantissa bytes are
incompressible either way); ZipNN gets 1.20x / 1.50x on this data, close to the 1.22x /
1.5x reported for real checkpoints.

Contenders, same run, same data: q8 lossless (`save_file`), q8 quantized (`quantize=True`,
code="auto", blocksize 2048), safetensors `save_file`/`load_file`, `torch.save`/`torch.load`
(weights_only), zstd (level 3, 2 threads) on each tensor's raw bytes, and ZipNN 0.5.4
(ratio and compress time; it mutates its input, so it gets a copy). Times are medians of
REPEATS runs. A load counts until one byte of every page of every tensor has been read
(safetensors maps its file lazily). Saves go to the local disk through the page cache;
q8's saves are atomic and fsync the file, the others do not, so safetensors is also timed
followed by an fsync.
GPU load (q8 `load_file(device="cuda")` vs safetensors + `.cuda()`) runs only where CUDA
exists.

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/formats.py [--scale 0.25]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import q8
import safetensors.torch
import torch
import zstandard

REPEATS = 3


def state_dict(dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab, dim, layers = int(32000 * scale), 1024, max(1, int(18 * scale))
    sd: dict[str, torch.Tensor] = {}

    def linear(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=g) * 0.02
        w *= torch.exp(torch.randn(rows, 1, generator=g) * 0.3)  # row norms differ
        idx = torch.randint(0, w.numel(), (w.numel() // 10000,), generator=g)
        w.view(-1)[idx] *= 8  # outliers
        return w

    sd["embed.weight"] = torch.randn(vocab, dim, generator=g)
    for i in range(layers):
        p = f"layers.{i}."
        sd[p + "attn.qkv.weight"] = linear(3 * dim, dim)
        sd[p + "attn.qkv.bias"] = torch.randn(3 * dim, generator=g) * 0.01
        sd[p + "attn.out.weight"] = linear(dim, dim)
        sd[p + "mlp.up.weight"] = linear(4 * dim, dim)
        sd[p + "mlp.down.weight"] = linear(dim, 4 * dim)
        sd[p + "norm1.weight"] = 1 + torch.randn(dim, generator=g) * 0.05
        sd[p + "norm2.weight"] = 1 + torch.randn(dim, generator=g) * 0.05
    sd["norm.weight"] = 1 + torch.randn(dim, generator=g) * 0.05
    return {k: v.to(dtype) for k, v in sd.items()}


def median_s(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def touch(tensors: dict[str, torch.Tensor]) -> None:
    """Read one byte of every 4 KiB page, so lazily memory-mapped loads (safetensors) pay for
    bringing their data in, as the others do."""
    for x in tensors.values():
        flat = x.reshape(-1).view(torch.uint8)
        int(flat[::4096].sum())


def fsynced(save: Callable, sd: dict[str, torch.Tensor], path: Path) -> None:
    """`save`, then fsync: what q8's atomic save includes, for a like-for-like time."""
    save(sd, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def zstd_save(sd: dict[str, torch.Tensor], path: Path) -> None:
    cctx = zstandard.ZstdCompressor(level=3, threads=2)
    with open(path, "wb") as f:
        for x in sd.values():
            frame = cctx.compress(x.contiguous().view(-1).view(torch.uint8).numpy())
            f.write(len(frame).to_bytes(8, "little"))
            f.write(frame)


def zstd_load(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    dctx = zstandard.ZstdDecompressor()
    out = {}
    with open(path, "rb") as f:
        for name, x in sd.items():
            frame = f.read(int.from_bytes(f.read(8), "little"))
            raw = bytearray(dctx.decompress(frame))
            out[name] = torch.frombuffer(raw, dtype=torch.uint8).view(x.dtype).view(x.shape)
    return out


def zipnn_ratio_and_time(sd: dict[str, torch.Tensor]) -> tuple[float, float] | None:
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    raw = packed = 0
    t = 0.0
    for x in sd.values():
        name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[x.dtype]
        data = bytearray(x.contiguous().view(-1).view(torch.uint8).numpy().tobytes())  # a copy: ZipNN mutates it
        zpn = ZipNN(input_format="byte", bytearray_dtype=name)
        t0 = time.perf_counter()
        packed += len(zpn.compress(data))
        t += time.perf_counter() - t0
        raw += x.numel() * x.element_size()
    return raw / packed, t


def run(dtype: torch.dtype, scale: float, folder: Path) -> list[tuple]:
    sd = state_dict(dtype, scale)
    raw = sum(x.numel() * x.element_size() for x in sd.values())
    print(f"\n{dtype}: {len(sd)} tensors, {raw / 1e9:.3f} GB raw")
    contenders = {
        "safetensors": (
            lambda p: safetensors.torch.save_file(sd, p),
            safetensors.torch.load_file,
        ),
        "safetensors + fsync": (lambda p: fsynced(safetensors.torch.save_file, sd, p), safetensors.torch.load_file),
        "torch.save": (lambda p: torch.save(sd, p), lambda p: torch.load(p, weights_only=True)),
        "zstd raw (l3)": (lambda p: zstd_save(sd, p), lambda p: zstd_load(sd, p)),
        "q8 lossless": (lambda p: q8.save_file(sd, p), q8.load_file),
        "q8 quantized": (lambda p: q8.save_file(sd, p, quantize=True), q8.load_file),
    }
    rows, sizes = [], {}
    for name, (save, load) in contenders.items():
        path = folder / "ckpt.bin"
        t_save = median_s(lambda save=save, path=path: save(path))
        sizes[name] = path.stat().st_size
        t_load = median_s(lambda load=load, path=path: touch(load(path)))
        if name == "q8 lossless":  # every tensor back bit for bit
            out = q8.load_file(path)
            assert all(torch.equal(out[k].view(-1).view(torch.uint8), sd[k].view(-1).view(torch.uint8)) for k in sd)
        path.unlink()
        rows.append([name, sizes[name], raw / sizes[name], t_save, raw / t_save / 1e6, t_load, raw / t_load / 1e6])
    zipnn = zipnn_ratio_and_time(sd)
    if zipnn:
        ratio, t = zipnn
        rows.append(["ZipNN (compress only)", int(raw / ratio), ratio, t, raw / t / 1e6, float("nan"), float("nan")])
    print(
        f"{'contender':24} {'bytes':>14} {'ratio':>7} {'save s':>8} {'save MB/s':>10} {'load s':>8} {'load MB/s':>10}"
    )
    for r in rows:
        print(f"{r[0]:24} {r[1]:>14,} {r[2]:>6.3f}x {r[3]:>8.2f} {r[4]:>10.0f} {r[5]:>8.2f} {r[6]:>10.0f}")
    st, ql, qq = sizes["safetensors"], sizes["q8 lossless"], sizes["q8 quantized"]
    t_save = {r[0]: r[3] for r in rows}
    print(f"q8 lossless vs ZipNN ratio: {st / ql:.3f}x vs {zipnn[0]:.3f}x" if zipnn else "ZipNN not installed")
    for anchor in ("safetensors", "safetensors + fsync"):
        print(f"q8 lossless save throughput / {anchor}: {t_save[anchor] / t_save['q8 lossless']:.2f}")
    print(f"q8 quantized: {st / qq:.2f}x smaller than safetensors")
    if torch.cuda.is_available():
        gpu_rows(sd, folder)
    return rows


def gpu_rows(sd: dict[str, torch.Tensor], folder: Path) -> None:
    qpath, spath = folder / "q.q8", folder / "s.safetensors"
    q8.save_file(sd, qpath, quantize=True)
    safetensors.torch.save_file(sd, spath)

    def q8_cuda():
        q8.load_file(qpath, device="cuda")
        torch.cuda.synchronize()

    def st_cuda():
        {k: v.cuda() for k, v in safetensors.torch.load_file(spath).items()}
        torch.cuda.synchronize()

    print(f"GPU load: q8 quantized {median_s(q8_cuda):.2f} s, safetensors + .cuda() {median_s(st_cuda):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the ~1 GB fp32 state dict")
    args = parser.parse_args()
    print(f"q8 {q8.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, {REPEATS} repeats")
    with tempfile.TemporaryDirectory(dir=os.environ.get("Q8_BENCH_DIR")) as d:
        for dtype in (torch.float32, torch.bfloat16):
            run(dtype, args.scale, Path(d))


if __name__ == "__main__":
    main()
