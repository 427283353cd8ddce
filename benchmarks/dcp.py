"""DCP benchmark: checkpoint size and save/load time of q8 storage vs DCP's FileSystemWriter,
and resharding 4 -> 2 -> 1 ranks.

Part 1. Two gloo ranks on CPU train an FSDP2 MLP (4 x Linear(2048, 2048), 16.8M parameters) for
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

Part 2, resharding. The same MLP trains on 4 ranks and is saved; 2 ranks load it, check it
and save it again; one plain process (no FSDP, no process group, `no_dist=True`) loads that.
For torch AdamW through FileSystemWriter and AdamW8bit through FileSystemWriter and
Q8StorageWriter: checkpoint size, median save time on 4 ranks, median load time (dcp.load +
set_state_dict) on 2 ranks and on 1 process, and whether every reload equals the 4-rank
state bit for bit (gathered with full_state_dict=True).

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
RESHARD = (4, 2, 1)  # ranks of each stage: train and save, load and save, load


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
    """The MLP and its optimizer: FSDP2-sharded on `mesh`, or plain for mesh None."""
    import q8.optim
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    if mesh is not None:
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


RESHARD_RUNS = (
    ("AdamW (fp32)", "FileSystemWriter"),
    ("AdamW8bit", "FileSystemWriter"),
    ("AdamW8bit", "Q8StorageWriter"),
)


def reshard_worker(rank: int, world: int, stage: int, root: str, repeats: int, results) -> None:
    """Stage 0: train on RESHARD[0] ranks and save; later stages: load the previous stage's
    checkpoint on RESHARD[stage] ranks (one plain process for 1), check it, save it again."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    plain = world == 1
    if not plain:
        dist.init_process_group("gloo", init_method=f"file://{root}/store-{stage}", rank=rank, world_size=world)
    mesh = None if plain else init_device_mesh("cpu", (world,))

    def timed(fn, *args) -> float:
        if not plain:
            dist.barrier()
        t0 = time.perf_counter()
        fn(*args)
        if not plain:
            dist.barrier()
        return time.perf_counter() - t0

    def full_state(model, opt) -> dict[str, torch.Tensor]:
        msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.clone() for k, v in flat_tensors({"model": msd, "optim": osd})}

    def save(model, opt, writer) -> None:
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, storage_writer=writer, no_dist=plain)

    def load(model, opt, reader) -> None:
        msd, osd = get_state_dict(model, opt)
        target = {"model": msd, "optim": osd}
        dcp.load(target, storage_reader=reader, no_dist=plain)
        set_state_dict(model, opt, model_state_dict=target["model"], optim_state_dict=target["optim"])

    for optimizer, storage in RESHARD_RUNS:
        make_writer, reader_cls, _ = writers()[storage]
        folder = Path(root) / f"reshard-{optimizer}-{storage}".replace(" ", "_")
        here, previous = folder / f"{world}-ranks", folder / f"{RESHARD[stage - 1]}-ranks"
        model, opt = build(mesh, optimizer)
        same = True
        if stage == 0:
            gen = torch.Generator().manual_seed(1)
            for _ in range(STEPS):
                model(torch.randn(16, WIDTH, generator=gen)).square().mean().backward()
                opt.step()
                opt.zero_grad()
            reference = full_state(model, opt)
            if rank == 0:
                torch.save(reference, folder.with_suffix(".pt"))
            seconds = [timed(save, model, opt, make_writer(here)) for _ in range(repeats)]
        else:
            seconds = []
            for _ in range(repeats):
                model, opt = build(mesh, optimizer)
                seconds.append(timed(load, model, opt, reader_cls(previous)))
            got = full_state(model, opt)
            if rank == 0:
                want = torch.load(folder.with_suffix(".pt"), weights_only=True)
                same = got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
            if stage + 1 < len(RESHARD):
                save(model, opt, make_writer(here))
        if rank == 0:
            size = sum(f.stat().st_size for f in here.iterdir() if f.is_file()) if stage == 0 else 0
            results.append((optimizer, storage, stage, size, statistics.median(seconds), same))
    if not plain:
        dist.destroy_process_group()


def reshard(root: str, repeats: int) -> list[tuple]:
    """Run the stages of RESHARD one after another, each in fresh processes."""
    with mp.Manager() as manager:
        results = manager.list()
        for stage, world in enumerate(RESHARD):
            mp.spawn(reshard_worker, args=(world, stage, root, repeats, results), nprocs=world)
        return list(results)


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
        resharded = reshard(root, args.repeats)
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

    print()
    print(
        f"Resharding {' -> '.join(map(str, RESHARD))} ranks (1: one plain process, no FSDP); medians of {args.repeats}"
    )
    header = (
        f"{'optimizer':<14} {'storage':<17} {'size MB':>8} {'vs torch':>8} {'save s (4)':>10} "
        f"{'load s (4->2)':>13} {'load s (2->1)':>13}  bit-exact"
    )
    print(header)
    print("-" * len(header))
    by_run = {(o, s, stage): (size, sec, same) for o, s, stage, size, sec, same in resharded}
    torch_size = by_run[(*RESHARD_RUNS[0], 0)][0]
    for optimizer, storage in RESHARD_RUNS:
        (size, save_s, _), (_, load2, same2), (_, load1, same1) = (by_run[(optimizer, storage, k)] for k in range(3))
        print(
            f"{optimizer:<14} {storage:<17} {size / 1e6:>8.1f} {torch_size / size:>7.2f}x {save_s:>10.2f} "
            f"{load2:>13.2f} {load1:>13.2f}  {'yes' if same1 and same2 else 'NO'}"
        )


if __name__ == "__main__":
    main()
