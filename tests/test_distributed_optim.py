"""q8 8-bit optimizers on FSDP2 (DTensor) parameters: the single process's bytes on any
number of ranks, and their state through DCP from any number of ranks to any other.

The test process trains the reference: one plain process (no FSDP), gradients set by hand
(the same on every mesh, so the comparison isolates the optimizer), and records the full
state after every step. Spawned gloo ranks (2, 3, then 4; see test_distributed.spawn_ranks)
then, each in one process group:

- train from scratch and match the reference bit for bit after every step (parameters,
  codes, absmax, fp32 state), for AdamW8bit (fused C path) and LAMB8bit / LARS8bit
  (generic path, whole-parameter norms summed over the ranks);
- continue a DCP checkpoint in q8 storage written by the previous mesh and match the
  uninterrupted reference: 1 -> 2 -> 3 -> 4 ranks (3 ranks save with dcp.async_save), then
  the test process loads the 4-rank checkpoint in one plain process (4 -> 1) and checks
  2 -> 1 too.

The model has uneven shapes on purpose: rows that cut blocks (row lengths 96, 130, 3 with
blocksize 64), rows of whole blocks (64), 96/130/300 rows split unevenly over 3 and 4
ranks, 3 rows over 4 ranks (one rank holds none), and a 300-element bias (1-D: fp32 state
although it is larger than min_8bit_size).
"""

import copy
from pathlib import Path

import pytest
import q8
import torch
import torch.distributed.checkpoint as dcp
from q8.integrations.distributed import Q8StorageReader, Q8StorageWriter
from test_distributed import assert_states_equal, spawn_ranks
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

OPTIMIZERS = {
    "AdamW8bit": lambda params: q8.optim.AdamW8bit(params, lr=1e-2, blocksize=64, min_8bit_size=256),
    "LAMB8bit": lambda params: q8.optim.LAMB8bit(params, lr=1e-2, weight_decay=0.01, blocksize=64, min_8bit_size=256),
    "LARS8bit": lambda params: q8.optim.LARS8bit(params, lr=0.5, weight_decay=1e-4, blocksize=64, min_8bit_size=256),
}
STEPS = 3  # from scratch, on every mesh
CHAIN = {1: 2, 2: 3, 3: 4, 4: 5}  # ranks -> the step its checkpoint holds (ranks - 1 -> ranks, one step)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.Linear(96, 130), torch.nn.Linear(130, 3), torch.nn.Linear(3, 300)
    )


def set_grads(model: torch.nn.Module, step: int) -> None:
    """The gradients of step `step`, whole or as this rank's shard of them."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    gen = torch.Generator().manual_seed(step)
    for i, p in enumerate(model.parameters()):
        g = torch.randn(p.shape, generator=gen) * (1 + i)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g


def train(model, opt, steps: range) -> None:
    for step in steps:
        set_grads(model, step)
        opt.step()


def full_state(model, opt) -> dict:
    """Parameters and optimizer state as full plain CPU tensors (gathered on rank 0 if sharded),
    copied: unsharded, get_state_dict gives the live tensors, which the next step changes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, opt, options=options)
    return copy.deepcopy({"model": msd, "optim": osd})


def save(model, opt, folder: Path, asynchronous: bool = False, **kwargs) -> None:
    msd, osd = get_state_dict(model, opt)
    state, writer = {"model": msd, "optim": osd}, Q8StorageWriter(folder)
    if asynchronous:
        dcp.async_save(state, storage_writer=writer, **kwargs).result()
    else:
        dcp.save(state, storage_writer=writer, **kwargs)


def load(model, opt, folder: Path, **kwargs) -> None:
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, storage_reader=Q8StorageReader(folder), **kwargs)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


# -- the ranks -------------------------------------------------------------------------------


def sharded(mesh, name: str = "AdamW8bit"):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, OPTIMIZERS[name](model.parameters())


def mesh_worker(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    root = Path(root)
    refs = torch.load(root / "refs.pt", weights_only=True)
    mesh = init_device_mesh("cpu", (world,))

    def check(model, opt, want: dict, where: str) -> None:
        got = full_state(model, opt)
        if rank == 0:
            assert_states_equal(got, want, f"{world} ranks, {where}")

    # From scratch: every step equals the single process's.
    for name in OPTIMIZERS:
        model, opt = sharded(mesh, name)
        for step in range(1, STEPS + 1):
            train(model, opt, range(step, step + 1))
            check(model, opt, refs[name][step], f"{name} step {step}")
    if rank == 0:  # gathered 8-bit state stays 8-bit: uint8 codes shaped like the weight, (rows, K) absmax
        state = full_state(model, opt)["optim"]["state"]["1.weight"]
        assert state["momentum_buffer"].dtype == torch.uint8 and state["momentum_buffer"].shape == (130, 96)
        assert state["momentum_buffer.absmax"].shape == (130, 2)
    else:
        full_state(model, opt)

    # The previous mesh's checkpoint (world - 1 ranks, or the plain process), one step on.
    model, opt = sharded(mesh)
    load(model, opt, root / f"ck{world - 1}")
    check(model, opt, refs["AdamW8bit"][CHAIN[world - 1]], "loaded")
    step = CHAIN[world]
    train(model, opt, range(step, step + 1))
    check(model, opt, refs["AdamW8bit"][step], f"{world - 1} -> {world} ranks, one step on")
    save(model, opt, root / f"ck{world}", asynchronous=world == 3)

    if world == 2:
        extras(rank, mesh, refs, root)


def local_state(opt) -> list:
    """A copy of this rank's state: step counts, codes, absmax and fp32 entries."""
    return [
        {k: (v.codes.clone(), v.absmax.clone()) if isinstance(v, q8.QTensor) else v for k, v in s.items()}
        for s in opt.state.values()
    ]


def extras(rank: int, mesh, refs: dict, root: Path) -> None:
    """On 2 ranks: a full state dict scattered into a sharded optimizer, a non-finite gradient
    on one rank, the torch.optim export, and the placements q8 refuses."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    # set_state_dict takes the single process's full state dict; training goes on exactly.
    model, opt = sharded(mesh)
    want = refs["AdamW8bit"][1]
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(model, opt, model_state_dict=want["model"], optim_state_dict=want["optim"], options=options)
    train(model, opt, range(2, 3))
    got = full_state(model, opt)
    if rank == 0:
        assert_states_equal(got, refs["AdamW8bit"][2], "full state dict -> 2 ranks, one step on")

    # A NaN in the last rank's rows only: every rank skips the step.
    before = local_state(opt)
    set_grads(model, 9)
    for p in model.parameters():
        if rank == 1 and p.to_local().numel():
            p.grad.to_local().view(-1)[-1] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert_states_equal(local_state(opt), before, "after a NaN gradient on rank 1")

    # Decoded into torch.optim.AdamW on the same shards.
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch_opt.load_state_dict(opt.to_torch_state_dict())
    w = model[1].weight
    assert torch.equal(torch_opt.state[w]["exp_avg"].to_local(), opt.state[w]["exp_avg"].dequantize())

    # Placements whose shards may cut blocks are refused when the parameter joins.
    base = torch.randn(8, 512)
    cases = {
        "Shard(dim=1)": distribute_tensor(base, mesh, [Shard(1)]),
        "Replicate()": distribute_tensor(base, mesh, [Replicate()]),
        "2-D mesh": distribute_tensor(base, init_device_mesh("cpu", (1, 2)), [Replicate(), Shard(0)]),
    }
    for what, p in cases.items():
        with pytest.raises(NotImplementedError, match=rf"parameter 0 \(shape \(8, 512\)\).*{what.split('(')[0]}"):
            q8.optim.AdamW8bit([torch.nn.Parameter(p)])
        ok = q8.optim.LAMB8bit(model.parameters())
        with pytest.raises(NotImplementedError, match=r"LAMB8bit: parameter 8 \(shape \(8, 512\)\)"):
            ok.add_param_group({"params": [torch.nn.Parameter(p)]})


# -- the test --------------------------------------------------------------------------------


def test_fsdp2_state_is_the_single_process_state_on_any_mesh(tmp_path):
    refs = {}
    for name, make in OPTIMIZERS.items():
        model = make_model()
        opt = make(model.parameters())
        refs[name] = {}
        for step in range(1, CHAIN[4] + 2):
            train(model, opt, range(step, step + 1))
            refs[name][step] = full_state(model, opt)
            if name == "AdamW8bit" and step == CHAIN[1]:
                save(model, opt, tmp_path / "ck1", no_dist=True)
    torch.save(refs, tmp_path / "refs.pt")
    w = refs["AdamW8bit"][1]["optim"]["state"]["1.weight"]  # rows of 96 cut blocks of 64: the row layout
    assert w["exp_avg"].shape == (130, 96) and w["exp_avg.absmax"].shape == (130, 2)
    assert refs["AdamW8bit"][1]["optim"]["state"]["3.bias"]["exp_avg"].dtype == torch.float32  # 1-D: fp32

    for world in (2, 3, 4):
        spawn_ranks(mesh_worker, world, tmp_path, str(tmp_path))

    # 4 ranks -> one plain process (no FSDP, no process group), one step on; and 2 -> 1.
    for ranks in (4, 2):
        model = make_model()
        opt = OPTIMIZERS["AdamW8bit"](model.parameters())
        load(model, opt, tmp_path / f"ck{ranks}", no_dist=True)
        assert_states_equal(full_state(model, opt), refs["AdamW8bit"][CHAIN[ranks]], f"{ranks} -> 1")
        train(model, opt, range(CHAIN[ranks] + 1, CHAIN[ranks] + 2))
        assert_states_equal(full_state(model, opt), refs["AdamW8bit"][CHAIN[ranks] + 1], f"{ranks} -> 1, one step on")

    # On disk the moments stay 8-bit: uint8 codes plus fp32 absmax.
    infos = {}
    for data_file in (tmp_path / "ck4").glob("*.q8"):
        with q8.safe_open(data_file) as f:
            infos.update({k.split(":", 1)[1]: f.info(k) for k in f.keys()})
    assert infos["optim.state.1.weight.exp_avg"]["dtype"] == torch.uint8
    assert infos["optim.state.1.weight.exp_avg_sq.absmax"]["dtype"] == torch.float32


def test_exact_norms_do_not_depend_on_order_or_split():
    """The norms of LAMB and LARS (optim/norms.py): the same bits for any order of the
    elements (any split over ranks: test_fsdp2_state_is_the_single_process_state_on_any_mesh),
    within fp32 rounding of the fp64 norm."""
    from q8.optim.norms import exact_norms

    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(100_003, generator=g) * torch.exp(4 * torch.randn(100_003, generator=g)),
              torch.tensor([3.0, 4.0]), torch.full((7,), 1e-40), torch.zeros(5)):  # fmt: skip
        (norm,) = exact_norms([x])
        assert norm.dtype == torch.float32 and norm.dim() == 0
        assert torch.equal(exact_norms([x.flip(0)])[0], norm)
        assert torch.equal(exact_norms([x[torch.randperm(x.numel(), generator=g)]])[0], norm)
        want = float(x.double().norm())
        assert abs(float(norm) - want) <= 1e-6 * want
    assert float(exact_norms([torch.tensor([3.0, 4.0])])[0]) == 5.0
    assert torch.isinf(exact_norms([torch.tensor([1.0, float("inf")])])[0])
