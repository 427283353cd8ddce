"""The q8 demo: `make demo`. Each section shows one capability on data it builds itself."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import q8
import torch


def _table(rows: list[tuple], header: tuple) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def tiny_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small language-model-shaped checkpoint, briefly trained so its values are real:
    embedding, attention and MLP weights, norms, and AdamW moments."""
    g = torch.Generator().manual_seed(seed)
    vocab, dim = 512, 128
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(vocab, dim),
            "attn": torch.nn.Linear(dim, 3 * dim),
            "mlp_in": torch.nn.Linear(dim, 4 * dim),
            "mlp_out": torch.nn.Linear(4 * dim, dim),
            "norm": torch.nn.LayerNorm(dim),
            "head": torch.nn.Linear(dim, vocab, bias=False),
        }
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, vocab // 4, (64, 17), generator=g)  # a skewed vocabulary
    for _ in range(20):
        h = model["embed"](tokens[:, :-1])
        h = h + model["attn"](h)[..., :dim]
        h = h + model["mlp_out"](torch.relu(model["mlp_in"](h)))
        logits = model["head"](model["norm"](h))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        state = opt.state[p]
        tensors[f"adam.{name}.exp_avg"] = state["exp_avg"].clone()
        tensors[f"adam.{name}.exp_avg_sq"] = state["exp_avg_sq"].clone()
    return tensors


def section_codec(tensors: dict[str, torch.Tensor]) -> None:
    print("== Blockwise 8-bit codec: q8.quantize(x, code='auto', blocksize=256) ==")
    rows, before, after = [], 0, 0
    for name, x in tensors.items():
        if x.numel() < 4096:
            continue
        qt = q8.quantize(x, code="auto", blocksize=256)
        err = q8.quant_error(x, qt)
        size = x.numel() * x.element_size()
        before, after = before + size, after + qt.nbytes
        shape = "x".join(map(str, x.shape))
        rows.append((name, shape, qt.code.name, size, qt.nbytes, f"{size / qt.nbytes:.2f}x", f"{err.rel_l2:.2e}"))
    print(_table(rows, ("tensor", "shape", "code", "bytes before", "bytes after", "ratio", "rel L2 error")))
    print(f"total: {before:,} -> {after:,} bytes ({before / after:.2f}x), exact nearest rounding\n")


_KERNEL_CHECK = """
import torch
from q8 import kernels
from q8.codec import get_code, native
x = torch.randn(64_000, generator=torch.Generator().manual_seed(0)) ** 5
same = []
for code in map(get_code, ("dynamic", "udynamic", "linear", "ulinear")):
    data = x if code.signed else x.abs()
    for blocksize in (64, 2048):
        codes, absmax, _ = kernels.encode(data, code, blocksize)
        ref_codes, ref_absmax, _ = native.encode(data, code, blocksize)
        out, ref = kernels.decode(codes, absmax, code, blocksize), native.decode(ref_codes, ref_absmax, code, blocksize)
        same.append(torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax) and torch.equal(out, ref))
print(all(same), len(same))
"""


_STEP_CHECK = """
import torch, q8
from q8.optim import fused

def run(device, triton):
    fused.TRITON_DEVICES = {"cuda", device} if triton else {"cuda"}
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)]).to(device)
    opt = q8.optim.AdamW8bit(model.parameters(), lr=1e-2)
    for step in range(3):
        model(torch.randn(8, 64, generator=torch.Generator().manual_seed(step)).to(device)).square().mean().backward()
        opt.step()
        model.zero_grad()
    return [p.detach().cpu() for p in model.parameters()]

device = "cuda" if torch.cuda.is_available() else "cpu"
print(all(torch.equal(a, b) for a, b in zip(run(device, True), run("cpu", False), strict=True)))
"""


def section_gpu_kernels(tensors: dict[str, torch.Tensor]) -> None:
    print("== GPU kernels: q8.quantize / q8.dequantize on CUDA tensors give the CPU path's bytes ==")
    if torch.cuda.is_available():
        gpu = {name: q8.quantize(x.cuda(), blocksize=256) for name, x in tensors.items()}
        same = all(
            torch.equal(gpu[name].codes.cpu(), q8.quantize(x, blocksize=256).codes) for name, x in tensors.items()
        )
        print(f"{len(tensors)} tensors quantized on {torch.cuda.get_device_name()} and on the CPU; same codes: {same}")
        _print_gpu_step(subprocess.run([sys.executable, "-c", _STEP_CHECK], capture_output=True, text=True, check=True))
        return
    # No GPU: run the same kernels under the Triton interpreter, which must be switched on
    # before triton is imported, hence a fresh process.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONSAFEPATH": "1"}
    proc = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, check=True)
    same, cases = proc.stdout.split()
    print(
        "no CUDA here: the same Triton kernels ran under the Triton interpreter on CPU tensors (64,000 values, "
        f"{cases} code/blocksize cases); codes, absmax and decoded values identical to the CPU path: {same}"
    )
    _print_gpu_step(subprocess.run([sys.executable, "-c", _STEP_CHECK], env=env, capture_output=True, text=True,
                                   check=True))  # fmt: skip


def _print_gpu_step(proc: subprocess.CompletedProcess) -> None:
    print(
        "AdamW8bit, 3 steps of 6 nn.Linear(64, 64) through the GPU step (no host sync; the 12 small parameters in two "
        "launches per step: weights with 8-bit state, biases with fp32 state): parameters identical to the C "
        f"kernels': {proc.stdout.strip()}\n"
    )


def section_formats(tensors: dict[str, torch.Tensor]) -> None:
    print("== The container: q8.save_file lossless and quantized, q8.load_file, q8.verify ==")
    raw = sum(x.numel() * x.element_size() for x in tensors.values())
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label, kwargs in [("lossless", {}), ("quantized", {"quantize": True, "blocksize": 256})]:
            path = Path(d) / f"{label}.q8"
            q8.save_file(tensors, path, metadata={"demo": "tiny_checkpoint"}, **kwargs)
            q8.verify(path)  # every segment and index checksum
            loaded = q8.load_file(path)
            exact = sum(torch.equal(loaded[k], x) for k, x in tensors.items())
            worst = max(q8.quant_error(x, loaded[k]).rel_l2 for k, x in tensors.items())
            size = path.stat().st_size
            rows.append((label, f"{size:,}", f"{raw / size:.2f}x", f"{exact}/{len(tensors)}", f"{worst:.2e}"))
    print(_table(rows, ("file", "bytes", "vs raw", "tensors bit-exact", "worst rel L2")))
    print(f"raw tensors: {raw:,} bytes; both files verified and reloaded")
    with tempfile.TemporaryDirectory() as d:
        q8.save_file(tensors, Path(d) / "m.q8")
        with q8.safe_open(Path(d) / "m.q8", framework="pt", device="cpu") as f:  # safetensors' signature
            rows = f.get_slice("model.embed.weight")[100:132]  # reads about those rows only
        tied = torch.nn.Sequential(torch.nn.Embedding(512, 128), torch.nn.Linear(128, 512, bias=False))
        tied[1].weight = tied[0].weight
        try:
            q8.save_file(tied.state_dict(), Path(d) / "tied.q8")
        except ValueError as e:
            print(f"save_file of tied weights refuses, as safetensors does: {str(e)[:60]}...")
        q8.save_model(tied, Path(d) / "tied.q8")
        again = torch.nn.Sequential(torch.nn.Embedding(512, 128), torch.nn.Linear(128, 512, bias=False))
        again[1].weight = again[0].weight
        q8.load_model(again, Path(d) / "tied.q8")
        stored = len(q8.load_file(Path(d) / "tied.q8"))
        print(f"get_slice('model.embed.weight')[100:132] -> {tuple(rows.shape)}; q8.save_model stored the tie once "
              f"({stored} tensor), load_model kept it: {again[1].weight is again[0].weight}\n")  # fmt: skip


def section_checkpoint_io() -> None:
    print("== Checkpoint I/O off the training path: q8.async_save_file, and loads at the memory of the data ==")
    import time

    state = {f"layer{i}.weight": torch.randn(1024, 1024) * 0.02 for i in range(16)}  # 64 MiB of fp32
    expected = {k: x.clone() for k, x in state.items()}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label, save in [
            ("torch.save", lambda i: torch.save(state, Path(d) / "t.pt")),
            ("q8.save_file", lambda i: q8.save_file(state, Path(d) / "b.q8")),
            ("q8.async_save_file", lambda i: q8.async_save_file(state, Path(d) / f"a{i}.q8")),
        ]:
            stalls = []
            for i in range(3):
                t0 = time.perf_counter()
                future = save(i)
                stalls.append(time.perf_counter() - t0)
                if future is not None:
                    future.result()
            rows.append((label, f"{sorted(stalls)[1] * 1e3:.0f} ms"))
        print(_table(rows, ("save of 64 MiB", "caller blocked (median of 3)")))
        future = q8.async_save_file(state, Path(d) / "m.q8")
        for x in state.values():
            x.add_(1.0)  # the next optimizer step, while the file is written
        future.result()
        loaded = q8.load_file(Path(d) / "m.q8")
        same = all(torch.equal(loaded[k], x) for k, x in expected.items())
        print(f"tensors updated in place right after the call; the file holds the state of the call: {same}")
        code = (
            "import q8\nq8.load_file(r'{0}')\n"  # warm: threads and allocator arenas
            "open('/proc/self/clear_refs', 'w').write('5')\n"
            "hwm = lambda: next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "before = hwm(); out = q8.load_file(r'{0}')\n"
            "print((hwm() - before) / sum(x.nbytes for x in out.values()))"
        ).format(Path(d) / "m.q8")
        if Path("/proc/self/clear_refs").exists():
            env = {**os.environ, "PYTHONSAFEPATH": "1"}
            ratio = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout)
            print(f"q8.load_file in a fresh process: peak memory {ratio:.2f}x the tensors it returns "
                  "(decoded range by range straight into them)\n")  # fmt: skip


def section_q8convert(tensors: dict[str, torch.Tensor]) -> None:
    print("== q8convert: a safetensors checkpoint into q8 and back (in-process: q8.tools.convert.main) ==")
    import contextlib
    import io
    import json

    from q8.tools.convert import main as q8convert
    from safetensors.torch import load_file, save_file

    weights = {k.removeprefix("model."): x for k, x in tensors.items() if k.startswith("model.")}
    with tempfile.TemporaryDirectory() as d:
        src, dst, back = Path(d) / "model.safetensors", Path(d) / "model.q8", Path(d) / "restored.safetensors"
        save_file(weights, src, metadata={"format": "pt"})
        print(
            f"$ q8convert model.safetensors -o model.q8   ({src.stat().st_size:,} bytes in; default --model-error auto)"
        )
        q8convert([str(src), "-o", str(dst)])
        print("$ q8convert verify model.q8")
        q8convert(["verify", str(dst)])
        print("$ q8convert decode model.q8 -o restored.safetensors")
        q8convert(["decode", str(dst), "-o", str(back)])
        restored = load_file(back)
        worst = max(q8.quant_error(x, restored[k]).rel_l2 for k, x in weights.items())
        print(f"restored {len(restored)} tensors with safetensors; worst relative L2 error {worst:.2e}")
        print(
            "the size/error trade-off: the weights' error all together (--model-error), or per tensor (--target-error)"
        )
        rows = []
        settings = [("--code auto (one blocksize, 2048)", ["--code", "auto"]), ("--model-error auto (default)", [])]
        settings += [(f"--model-error {e:g}", ["--model-error", str(e)]) for e in (0.005, 0.02)]
        settings += [(f"--target-error {e:g}", ["--target-error", str(e)]) for e in (0.005, 0.02)]
        for label, argv in settings:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                q8convert([str(src), "-o", str(dst), "--overwrite", "--json", *argv])
            report = json.loads(out.getvalue())["files"][0]["tensors"]
            quantized = [t for t in report if t["encoding"] == "quantized"]
            norm2 = [float(weights[t["name"]].double().square().sum()) for t in quantized]
            together = math.sqrt(sum(t["rel_l2"] ** 2 * n for t, n in zip(quantized, norm2, strict=True)) / sum(norm2))
            size = dst.stat().st_size
            worst = max(t["rel_l2"] for t in report)
            rows.append((label, f"{size:,}", f"{src.stat().st_size / size:.2f}x", f"{together:.2e}", f"{worst:.2e}"))
        header = ("q8convert model.safetensors -o model.q8", "bytes", "ratio", "weights together", "worst tensor")
        print(_table(rows, header))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                q8convert(["info", str(dst), "--plot", str(Path(d) / "tradeoff.png")])
            print(
                "q8convert info model.q8 --plot tradeoff.png: drew each tensor's bits per element against its error\n"
            )
        except ImportError:
            print("(q8convert info --plot needs matplotlib: pip install 'q8[plot]')\n")


def section_distributed(tensors: dict[str, torch.Tensor]) -> None:
    print("== torch.distributed.checkpoint: Q8StorageWriter vs FileSystemWriter; FSDP2 on 2 ranks -> 1 process ==")
    import warnings

    import torch.distributed.checkpoint as dcp
    from q8.integrations.distributed import Q8StorageReader, Q8StorageWriter
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard

    storages = [
        ("FileSystemWriter", lambda p: FileSystemWriter(p), FileSystemReader),
        ("FileSystemWriter + zstd", lambda p: FileSystemWriter(p, _extensions=[ZStandard()]), FileSystemReader),
        ("Q8StorageWriter", lambda p: Q8StorageWriter(p), Q8StorageReader),
        ("Q8StorageWriter(quantize=True)", lambda p: Q8StorageWriter(p, quantize=True, blocksize=256), Q8StorageReader),
    ]
    rows, base = [], None
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        for label, writer, reader in storages:
            folder = Path(d) / label.replace(" ", "_")
            dcp.save(tensors, storage_writer=writer(folder), no_dist=True)
            loaded = {k: torch.zeros_like(x) for k, x in tensors.items()}
            dcp.load(loaded, storage_reader=reader(folder), no_dist=True)
            size = sum(f.stat().st_size for f in folder.iterdir())
            base = base or size
            exact = sum(torch.equal(loaded[k], x) for k, x in tensors.items())
            worst = max(q8.quant_error(x, loaded[k]).rel_l2 for k, x in tensors.items())
            rows.append((label, f"{size:,}", f"{base / size:.2f}x", f"{exact}/{len(tensors)}", f"{worst:.2e}"))
    print(_table(rows, ("storage", "bytes", "vs FileSystemWriter", "tensors bit-exact", "worst rel L2")))
    _fsdp2_to_one_process()


def _fsdp2_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(300, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))


def _fsdp2_train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    """The same batch on every rank: FSDP2's averaged gradients are the plain process's."""
    for step in steps:
        x = torch.randn(16, 300, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _fsdp2_rank(rank: int, world: int, folder: str) -> None:
    """One of the 2 ranks of `_fsdp2_to_one_process`: 3 steps of FSDP2 + AdamW8bit, then dcp.save."""
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from q8.integrations.distributed import Q8StorageWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    model = _fsdp2_model()
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    opt = q8.optim.AdamW8bit(model.parameters(), lr=1e-2)
    _fsdp2_train(model, opt, range(3))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=Q8StorageWriter(Path(folder) / "ckpt"))
    dist.barrier()
    dist.destroy_process_group()


def _fsdp2_to_one_process() -> None:
    """FSDP2 on 2 gloo ranks trains AdamW8bit and saves; this process, without FSDP, resumes."""
    import warnings

    import torch.distributed.checkpoint as dcp
    import torch.multiprocessing as mp
    from q8.integrations.distributed import Q8StorageReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' matmuls, to the bit
    try:
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.environ["PYTHONSAFEPATH"] = "1"  # the ranks must import the installed q8, not the folder
            mp.spawn(_fsdp2_rank, args=(2, d), nprocs=2)
            model = _fsdp2_model()
            opt = q8.optim.AdamW8bit(model.parameters(), lr=1e-2)
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, storage_reader=Q8StorageReader(Path(d) / "ckpt"), no_dist=True)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            saved = opt.state_dict()["state"][0]  # model[0].weight's: what the ranks wrote, gathered
            layout = f"{tuple(saved['exp_avg'].shape)} uint8 codes + {tuple(saved['exp_avg.absmax'].shape)} absmax"
            _fsdp2_train(model, opt, range(3, 5))
            straight = _fsdp2_model()
            straight_opt = q8.optim.AdamW8bit(straight.parameters(), lr=1e-2)
            _fsdp2_train(straight, straight_opt, range(5))
    finally:
        torch.set_num_threads(threads)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), straight.parameters(), strict=True))
    for p, q in zip(model.parameters(), straight.parameters(), strict=True):
        for key, value in opt.state[p].items():
            other = straight_opt.state[q][key]
            if isinstance(value, q8.QTensor):
                same &= torch.equal(value.codes, other.codes) and torch.equal(value.absmax, other.absmax)
    print(f"FSDP2 on 2 gloo ranks: AdamW8bit, 3 steps, dcp.save (exp_avg of the 512x300 weight: {layout});")
    print("this process, without FSDP: dcp.load + set_state_dict, 2 more steps: parameters and 8-bit state")
    print(f"identical to the uninterrupted run: {same}\n")


class _Evil:
    """A pickle that would create `marker` when loaded: what a hostile checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def section_security(tensors: dict[str, torch.Tensor]) -> None:
    print("== Hostile files and killed saves: refused with q8.FormatError, no debris left ==")
    import pickle
    import signal
    import warnings

    import torch.distributed.checkpoint as dcp
    from q8.integrations.distributed import Q8StorageReader, Q8StorageWriter

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.q8"
        q8.save_file(tensors, path)
        data = bytearray(path.read_bytes())
        data[4096] ^= 0x40  # one flipped bit inside a tensor
        path.write_bytes(bytes(data))
        for label, check in [("q8.verify", q8.verify), ("q8.load_file", q8.load_file)]:
            try:
                check(path)
            except q8.FormatError as e:
                print(f"{label} on a file with one flipped bit: FormatError: {str(e).removeprefix(d + '/')}")

        folder, marker = Path(d) / "ckpt", Path(d) / "pwned"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
            dcp.save({"w": torch.ones(4), "step": 7}, storage_writer=Q8StorageWriter(folder), no_dist=True)
            (folder / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
            try:
                Q8StorageReader(folder).read_metadata()
            except q8.FormatError as e:
                print(f"a DCP .metadata replaced by a code-running pickle: {str(e).split(': ', 1)[1]}")
        print(f"the pickle's code ran: {marker.exists()}")

        script = "import sys, time, torch, q8\nwith q8.Writer(sys.argv[1]) as w:\n"
        script += "    w.add('a', torch.ones(9)); print('ready', flush=True); time.sleep(60)\n"
        writer = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE)
        writer.stdout.readline()
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        debris = sorted(p.name for p in Path(d).glob(".m.q8.*"))
        q8.save_file({"w": torch.ones(3)}, path)
        left = sorted(p.name for p in Path(d).glob(".m.q8.*"))
        print(f"a save killed with SIGKILL left {debris}; the next save to m.q8 removed it: {left}\n")


def section_optim() -> None:
    print("== 8-bit optimizers: q8.optim.AdamW8bit vs torch.optim.AdamW, save_optimizer, bit-exact resume ==")
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    batches = [torch.randn(64, 256) for _ in range(8)]

    largest = {}  # optimizer -> largest single-step move of any weight, in learning rates

    def train(net, opt, steps):
        for x in steps:
            loss = (net(x) - x.roll(1, dims=1)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            before = [p.detach().clone() for p in net.parameters()]
            opt.step()
            moved = max((p - b).abs().max().item() for p, b in zip(net.parameters(), before, strict=True))
            largest[opt] = max(largest.get(opt, 0.0), moved / opt.param_groups[0]["lr"])
        return loss.item()

    ref_model = copy.deepcopy(model)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-3)
    opt = q8.optim.AdamW8bit(model.parameters(), lr=1e-3)
    ref_loss, loss = train(ref_model, ref, batches), train(model, opt, batches)
    bound = q8.optim.fused.moment_bound((0.9, 0.999), 8) * (1 - 0.999**8) ** 0.5 / (1 - 0.9**8)
    torch_bytes = sum(t.nbytes for s in ref.state.values() for t in s.values() if t.dim())
    rows = [
        ("torch.optim.AdamW", f"{torch_bytes:,}", "1.00x", f"{ref_loss:.4f}"),
        ("q8.optim.AdamW8bit", f"{opt.state_nbytes():,}", f"{torch_bytes / opt.state_nbytes():.2f}x", f"{loss:.4f}"),
    ]
    print(_table(rows, ("optimizer", "state bytes", "smaller", "loss after 8 steps")))
    print(f"largest step of any weight: torch {largest[ref]:.2f} lr, q8 {largest[opt]:.2f} lr (8-bit Adam is held to "
          f"exact Adam's own bound, {bound:.2f} lr at step 8: docs/OPTIMIZER_STATE.md)")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "opt.q8"
        q8.save_optimizer(opt, path)  # 8-bit state as it is: at the speed of torch.save
        size = path.stat().st_size
        q8.save_optimizer(opt, path, compress_codes=True)  # entropy-coded: the smallest file
        compressed = path.stat().st_size
        resumed = copy.deepcopy(model)
        resumed_opt = q8.optim.AdamW8bit(resumed.parameters(), lr=1e-3)
        q8.load_optimizer(resumed_opt, path)
    more = [torch.randn(64, 256) for _ in range(4)]
    train(model, opt, more)
    train(resumed, resumed_opt, more)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters(), strict=True))
    print(f"q8.save_optimizer -> {size:,} bytes ({compressed:,} with compress_codes=True); q8.load_optimizer "
          f"into a fresh optimizer, 4 more steps: parameters identical to the uninterrupted run: {same}")  # fmt: skip
    try:  # uint8 codes read as floats would be garbage: torch refuses q8's state dict (its extra mark group)
        torch.optim.AdamW(model.parameters()).load_state_dict(opt.state_dict())
    except ValueError as e:
        print(f"torch.optim.AdamW.load_state_dict(AdamW8bit's state_dict()) refuses it: {e}; "
              "opt.to_torch_state_dict() is the export it takes")  # fmt: skip
    print(_table(_fused_rows(model, batches[:6]), ("optimizer", "fused step ms", "reference step ms", "same bytes")))


def _fused_rows(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[tuple]:
    """Every q8 optimizer's fused step (one C call for all CPU parameters; the Triton kernel
    on CUDA) against its torch reference (`rule = None`): median time of the steps after
    the first, identical bytes."""
    import copy
    import statistics
    import time

    optimizers = {"Adam8bit": {}, "AdamW8bit": {}, "SGD8bit": {"momentum": 0.9}, "Lion8bit": {},
                  "RMSprop8bit": {"momentum": 0.5, "centered": True}, "Adagrad8bit": {}, "LAMB8bit": {},
                  "LARS8bit": {"momentum": 0.9}}  # fmt: skip
    rows = []
    for name, kwargs in optimizers.items():
        runs = []
        for fused in (True, False):
            net = copy.deepcopy(model)
            opt = getattr(q8.optim, name)(net.parameters(), lr=1e-3, **kwargs)
            if not fused:
                opt.rule = None  # the generic path: decode, the class's torch `update`, encode
            seconds = []
            for x in batches:
                opt.zero_grad()
                (net(x) - x).pow(2).mean().backward()
                t0 = time.perf_counter()
                opt.step()
                seconds.append(time.perf_counter() - t0)
            state = [
                t
                for s in opt.state.values()
                for v in s.values()
                if isinstance(v, q8.QTensor)
                for t in (v.codes, v.absmax)
            ]
            runs.append(
                (1e3 * statistics.median(seconds[1:]), [*net.parameters(), *state])
            )  # the first creates the state
        same = all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
        rows.append((name, f"{runs[0][0]:.2f}", f"{runs[1][0]:.2f}", str(same)))
    return rows


def section_hf_trainer() -> None:
    print("== Hugging Face Trainer: Q8Trainer(q8_optim='adamw8bit') vs Trainer with torch AdamW ==")
    try:
        import transformers
        from q8.integrations.hf import Q8Trainer, q8_optimizer_cls_and_kwargs
        from q8.tools.convert import main as q8convert
        from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments
    except ImportError as e:
        print(f"skipped: {e} (pip install transformers accelerate)\n")
        return
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=256, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 256, (32, 32), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]

    def run(trainer_cls, folder, resume=None, q8_optimizer=None, **kwargs):
        torch.manual_seed(0)
        args = TrainingArguments(folder, max_steps=8, save_steps=4, per_device_train_batch_size=4, report_to="none",
                                 use_cpu=True, disable_tqdm=True, seed=0, optim="adamw_torch")  # fmt: skip
        model = GPT2LMHeadModel(config)
        if q8_optimizer:  # a plain Trainer with a q8 optimizer, through its own argument
            kwargs["optimizer_cls_and_kwargs"] = q8_optimizer_cls_and_kwargs(q8_optimizer, args, model)
        trainer = trainer_cls(model, args, train_dataset=data, **kwargs)
        trainer.remove_callback(PrinterCallback)  # no metrics dicts in the demo's output
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    with tempfile.TemporaryDirectory() as d:
        run(Trainer, f"{d}/plain")
        full = run(Q8Trainer, f"{d}/q8", q8_optim="adamw8bit")
        plain_pt, q8_ckpt = Path(d, "plain/checkpoint-4/optimizer.pt"), Path(d, "q8/checkpoint-4")
        rows = [("Trainer, torch AdamW", "optimizer.pt", f"{plain_pt.stat().st_size:,}", "1.00x")]
        size = (q8_ckpt / "optimizer.q8").stat().st_size
        rows.append(("Q8Trainer, AdamW8bit", "optimizer.q8", f"{size:,}", f"{plain_pt.stat().st_size / size:.2f}x"))
        rows.append(("", "optimizer.pt", f"{(q8_ckpt / 'optimizer.pt').stat().st_size:,}", "placeholder"))
        print(_table(rows, ("checkpoint-4 of", "file", "bytes", "smaller")))
        resumed = run(Q8Trainer, f"{d}/resumed", resume=str(q8_ckpt), q8_optim="adamw8bit")
        same = all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True))
        print(f"resumed from checkpoint-4, 4 more steps: weights identical to the uninterrupted run: {same}")
        run(Q8Trainer, f"{d}/async", q8_optim="adamw8bit", async_save=True)
        a, b = q8.load(f"{d}/async/checkpoint-8/optimizer.q8"), q8.load(f"{d}/q8/checkpoint-8/optimizer.q8")
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
        print(f"Q8Trainer(async_save=True): checkpoints written in the background, renamed into place when "
              f"complete; optimizer.q8 identical to the synchronous run's: {same}")  # fmt: skip
        try:
            run(Trainer, f"{d}/wrong", resume=str(q8_ckpt))
        except RuntimeError as e:
            print(f"a plain Trainer resuming it fails loudly (optimizer.pt is a placeholder): {str(e)[:96]}...")
        q8convert([str(q8_ckpt), "-o", f"{d}/ckpt.q8", "-q"])  # weights exact (a training checkpoint)
        q8convert(["decode", f"{d}/ckpt.q8", "-o", f"{d}/restored", "-q"])  # optimizer.pt: AdamW8bit's state_dict()
        print(f"$ q8convert checkpoint-4 -o ckpt.q8; q8convert decode ckpt.q8 -o restored\n"
              f"  restored: {', '.join(sorted(os.listdir(f'{d}/restored')))}")  # fmt: skip
        plain = run(Trainer, f"{d}/plain-resumed", resume=f"{d}/restored", q8_optimizer="adamw8bit")
        same = all(torch.equal(a, b) for a, b in zip(full.model.parameters(), plain.model.parameters(), strict=True))
        print("a plain Trainer (AdamW8bit via optimizer_cls_and_kwargs) resumes the decoded folder, 4 more steps: "
              f"weights identical to the uninterrupted run: {same}\n")  # fmt: skip


def main() -> None:
    torch.manual_seed(0)
    print(f"q8 {q8.__version__} demo (torch {torch.__version__})\n")
    tensors = tiny_checkpoint()
    section_codec(tensors)
    section_gpu_kernels(tensors)
    section_formats(tensors)
    section_checkpoint_io()
    section_q8convert(tensors)
    section_distributed(tensors)
    section_security(tensors)
    section_optim()
    section_hf_trainer()


if __name__ == "__main__":
    main()
