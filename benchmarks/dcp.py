"""DCP benchmark: checkpoint size and save/load time of q8 storage vs DCP's FileSystemWriter.

Two gloo ranks on CPU train an FSDP2 MLP (4 x Linear(2048, 2048), 16.8M parameters) for
STEPS steps with torch.optim.AdamW (fp32 state) or q8.optim.AdamW8bit (8-bit state), then
save model + optimizer state (`get_state_dict`, `dcp.save`) with each writer:

- `FileSystemWriter`             DCP's default (torch.save per chunk, no compression)
- `FileSystemWriter + zstd`      with its experimental `_extensions=[ZStandard()]`
- `Q8StorageWriter`              q8 container, lossless (default)
- `Q8StorageWriter(quantize=True)`  float tensors of >= 4096 elements as 8-bit codes (lossy)

Reported: bytes on disk (whole checkpoint folder), ratio vs FileSystemWriter, median save
and load time over REPEATS (rank 0's wall time between barriers; load includes
`set_state_dict`), and for lossy storage the largest relative L2 error of a reloaded
tensor. Loads are checked exact for the lossless writers.

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/dcp.py [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

WIDTH, LAYERS, STEPS, WORLD = 2048, 4, 3, 2


def writers():
    from q8.integrations.distributed import Q8StorageReader, Q8StorageWriter
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard

    return {
        "FileSystemWriter": (lambda p: FileSystemWriter(p), FileSystemReader, True),
        "FileSystemWriter + zstd": (lambda p: FileSystemWriter(p, _extensions=[ZStandard()]), FileSystemReader, True),
        "Q8StorageWriter": (lambda p: Q8StorageWriter(p), Q8StorageReader, True),
        "Q8StorageWriter(quantize=True)": (lambda p: Q8StorageWriter(p, quantize=True), Q8StorageReader, False),
    }


def build(mesh, optimizer: str):
    import q8.optim
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if optimizer == "AdamW (fp32)":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = q8.optim.AdamW8bit(model.parameters(), lr=1e-3)
    return model, opt


def flat_tensors(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat_tensors(v, f"{prefix}{k}.")
    elif isinstance(obj, torch.Tensor):
        yield prefix[:-1], obj


def worker(rank: int, root: str, repeats: int, results) -> None:
    import q8
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))

    def timed(fn, *args) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn(*args)
        dist.barrier()
        return time.perf_counter() - t0

    def gathered(model, opt) -> dict[str, torch.Tensor]:
        msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        return dict(flat_tensors({"model": msd, "optim": osd}))

    def save(state, writer) -> None:
        dcp.save(state, storage_writer=writer)

    def load(target, model2, opt2, reader) -> None:
        dcp.load(target, storage_reader=reader)
        set_state_dict(model2, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"])

    for optimizer in ("AdamW (fp32)", "AdamW8bit"):
        model, opt = build(mesh, optimizer)
        gen = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            model(torch.randn(16, WIDTH, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        full = gathered(model, opt)
        for name, (make_writer, reader_cls, lossless) in writers().items():
            folder = Path(root) / f"{optimizer}-{name}".replace(" ", "_")
            saves, loads = [], []
            for _ in range(repeats):
                if rank == 0:
                    shutil.rmtree(folder, ignore_errors=True)
                dist.barrier()
                saves.append(timed(save, state, make_writer(folder)))
                model2, opt2 = build(mesh, optimizer)
                msd2, osd2 = get_state_dict(model2, opt2)
                loads.append(timed(load, {"model": msd2, "optim": osd2}, model2, opt2, reader_cls(folder)))
            got = gathered(model2, opt2)
            assert got.keys() == full.keys() and full, f"{name}: reloaded state has other keys"
            worst = 0.0
            for key, want in full.items():
                if lossless:
                    assert torch.equal(got[key], want), f"{name}: {key} not exact after reload"
                elif want.is_floating_point():
                    worst = max(worst, q8.quant_error(want.float(), got[key].float()).rel_l2)
            if rank == 0:
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                results.append((optimizer, name, size, statistics.median(saves), statistics.median(loads), worst))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["PYTHONSAFEPATH"] = "1"
    root = tempfile.mkdtemp(prefix="q8-dcp-bench-")
    try:
        with mp.Manager() as manager:
            results = manager.list()
            mp.spawn(worker, args=(root, args.repeats, results), nprocs=WORLD)
            rows = list(results)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    params = LAYERS * (WIDTH * WIDTH + WIDTH)
    print(
        f"FSDP2 MLP, {params / 1e6:.1f}M parameters, {WORLD} gloo ranks on CPU, {STEPS} steps; "
        f"medians of {args.repeats} save/load runs"
    )
    header = f"{'optimizer':<14} {'storage':<31} {'size MB':>9} {'vs FSW':>7} {'save s':>7} {'load s':>7}  max rel L2"
    print(header)
    print("-" * len(header))
    for optimizer, name, size, save_s, load_s, worst in rows:
        base = next(r[2] for r in rows if r[0] == optimizer and r[1] == "FileSystemWriter")
        err = "exact" if worst == 0 else f"{worst:.2e}"
        print(
            f"{optimizer:<14} {name:<31} {size / 1e6:>9.1f} {base / size:>6.2f}x {save_s:>7.2f} {load_s:>7.2f}  {err}"
        )


if __name__ == "__main__":
    main()
