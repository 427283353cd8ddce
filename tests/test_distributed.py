"""q8 storage for torch.distributed.checkpoint: Q8StorageWriter / Q8StorageReader.

Single-process tests use `dcp.save/load(no_dist=True)`. The FSDP2 test spawns 2 gloo
ranks on CPU (bounded by a timeout) that train, save and reload through q8 storage, and
checks resharding both ways against a single-process model: 1 -> 2 ranks (the test
process saves, the ranks load) and 2 -> 1 (the ranks save, the test process loads).
"""

import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import q8
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from q8.integrations.distributed import Q8StorageReader, Q8StorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

SPAWN_TIMEOUT_S = 120


# -- helpers shared with the spawned ranks -------------------------------------------------


def spawn_ranks(fn, world: int, tmp_path: Path, *args) -> None:
    """Run `fn(rank, world, *args)` on `world` gloo ranks (fresh processes, file store);
    fail the test if any rank raises or all have not finished within SPAWN_TIMEOUT_S."""
    os.environ["PYTHONSAFEPATH"] = "1"  # children must not put the repo root (the q8 package) on sys.path
    store = tmp_path / f"store-{time.monotonic_ns()}"
    ctx = mp.start_processes(_rank_main, (fn, world, str(store), args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} on {world} ranks did not finish within {SPAWN_TIMEOUT_S}s")


def _rank_main(rank: int, fn, world: int, store: str, args: tuple) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while a peer still talks to it (seen: SIGABRT at exit)
    finally:
        dist.destroy_process_group()


def make_model() -> torch.nn.Module:
    """Uneven shapes on purpose: 65 and 17 rows split 33/32 and 9/8 over 2 ranks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(40, 65), torch.nn.Tanh(), torch.nn.Linear(65, 130), torch.nn.Tanh(), torch.nn.Linear(130, 17)
    )


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 40, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Model and optimizer state as full plain tensors (gathered if sharded)."""
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return {"model": msd, "optim": osd}


def assert_states_equal(a, b, where: str) -> None:
    """Same keys, lengths and exactly the same tensors and values, recursively."""
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_states_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_states_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def tensors_of(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(tensors_of(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def load_single(folder: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A fresh single-process model + AdamW loaded from a DCP checkpoint in q8 storage."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, storage_reader=Q8StorageReader(folder), no_dist=True)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return model, opt


# -- FSDP2, 2 ranks ------------------------------------------------------------------------


def fsdp2_worker(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    root = Path(root)
    mesh = init_device_mesh("cpu", (world,))

    def sharded() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def load(folder: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model, opt = sharded()
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, storage_reader=Q8StorageReader(folder))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return model, opt

    # 1 -> 2 ranks: the checkpoint the test process wrote, resharded onto this mesh.
    model, opt = load(root / "single")
    assert_states_equal(full_state(model, opt), torch.load(root / "single_ref.pt"), "1->2")

    # Train sharded, save lossless and quantized, reload on the same mesh.
    model, opt = sharded()
    train(model, opt, steps=3, seed=1)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=Q8StorageWriter(root / "lossless"))
    dcp.save({"model": msd, "optim": osd}, storage_writer=Q8StorageWriter(root / "quantized", quantize=True))
    ref = full_state(model, opt)
    if rank == 0:
        torch.save(ref, root / "sharded_ref.pt")
    model2, opt2 = load(root / "lossless")
    assert_states_equal(full_state(model2, opt2), ref, "2->2")
    dcp.async_save({"model": msd, "optim": osd}, storage_writer=Q8StorageWriter(root / "async")).result()
    model3, opt3 = load(root / "async")
    assert_states_equal(full_state(model3, opt3), ref, "2->2 after dcp.async_save")
    train(model, opt, steps=1, seed=2)
    train(model2, opt2, steps=1, seed=2)
    assert_states_equal(full_state(model2, opt2), full_state(model, opt), "2->2, one step later")


def test_fsdp2_adamw_through_q8_storage_reshards_both_ways(tmp_path):
    # The single-process checkpoint the ranks will load (1 -> 2).
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, steps=2, seed=0)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=Q8StorageWriter(tmp_path / "single"), no_dist=True)
    torch.save(full_state(model, opt), tmp_path / "single_ref.pt")

    spawn_ranks(fsdp2_worker, 2, tmp_path, str(tmp_path))

    # 2 -> 1 rank, lossless: bit-exact to the sharded run's gathered state.
    ref = torch.load(tmp_path / "sharded_ref.pt")
    model, opt = load_single(tmp_path / "lossless")
    assert_states_equal(full_state(model, opt), ref, "2->1")

    # Quantized: tensors of >= 4096 elements within the codec's error, the rest exact.
    model, opt = load_single(tmp_path / "quantized")
    got, want = tensors_of(full_state(model, opt)), tensors_of(ref)
    assert set(got) == set(want)
    quantized = [k for k, v in want.items() if v.is_floating_point() and v.numel() >= 4096]
    assert quantized, "the model must have tensors large enough to be quantized"
    for k, v in want.items():
        if k in quantized:
            err = q8.quant_error(v, got[k])
            assert 0 < err.rel_l2 < 0.02, f"{k}: {err}"
        else:
            assert torch.equal(got[k], v), k


# -- single process ------------------------------------------------------------------------


def sample_state() -> dict:
    torch.manual_seed(1)
    return {
        "w": torch.randn(96, 64),  # 6144 elements: quantized under quantize=True
        "half": torch.randn(70, 70).half(),
        "bf16": torch.randn(5000).bfloat16(),
        "small": torch.randn(3, 5),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "codes": torch.randint(0, 256, (5000,), dtype=torch.uint8),
        "opt.exp_avg.absmax": torch.rand(4096),
        "nan": torch.full((4096,), float("nan")),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
        "meta": {"step": 7, "name": "run", "betas": [0.9, 0.999], "none": None},
    }


def zeros_like_state(state: dict) -> dict:
    return {
        k: zeros_like_state(v) if isinstance(v, dict) else torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
        for k, v in state.items()
    }


def test_lossless_roundtrip_is_exact_for_every_kind_of_value(tmp_path):
    state = sample_state()
    dcp.save(state, storage_writer=Q8StorageWriter(tmp_path), no_dist=True)
    got = zeros_like_state(state)
    dcp.load(got, storage_reader=Q8StorageReader(tmp_path), no_dist=True)
    assert_states_equal(
        {k: v for k, v in got.items() if k != "nan"}, {k: v for k, v in state.items() if k != "nan"}, "state"
    )
    assert got["nan"].isnan().all()
    data_files = [p.name for p in tmp_path.iterdir() if p.suffix == ".q8"]
    assert len(data_files) == 1 and data_files[0].startswith("__0_")
    with q8.safe_open(tmp_path / data_files[0]) as f:  # tensor data is an ordinary q8 file
        assert {f.info(k)["encoding"] for k in f.keys()} <= {"raw", "planes"}


def test_quantize_true_quantizes_large_floats_and_keeps_the_rest_exact(tmp_path):
    state = sample_state()
    dcp.save(
        state, storage_writer=Q8StorageWriter(tmp_path, quantize=True, code="dynamic", blocksize=256), no_dist=True
    )
    got = zeros_like_state(state)
    dcp.load(got, storage_reader=Q8StorageReader(tmp_path), no_dist=True)
    for k in ("w", "half", "bf16"):
        assert got[k].dtype == state[k].dtype
        err = q8.quant_error(state[k].float(), got[k].float())
        assert 0 < err.rel_l2 < 0.02, f"{k}: {err}"
    # Small tensors, integers, 8-bit codes, optimizer absmax and non-finite tensors stay exact.
    for k in ("small", "ids", "mask", "codes", "opt.exp_avg.absmax", "scalar", "empty"):
        assert torch.equal(got[k], state[k]), k
    assert got["nan"].isnan().all() and got["meta"] == state["meta"]
    (data_file,) = tmp_path.glob("*.q8")
    with q8.safe_open(data_file) as f:
        encodings = {k.split(":", 1)[1]: f.info(k)["encoding"] for k in f.keys()}
    assert encodings["w"] == encodings["half"] == encodings["bf16"] == "blockwise"


def test_quantize_policy_chooses_by_key(tmp_path):
    state = {"keep": torch.randn(5000), "squash": torch.randn(5000)}
    seen = []

    def policy(fqn, whole):
        seen.append((fqn, tuple(whole.shape), whole.device.type))
        return fqn == "squash"

    dcp.save(state, storage_writer=Q8StorageWriter(tmp_path, quantize=policy), no_dist=True)
    assert sorted(seen) == [("keep", (5000,), "meta"), ("squash", (5000,), "meta")]
    got = zeros_like_state(state)
    dcp.load(got, storage_reader=Q8StorageReader(tmp_path), no_dist=True)
    assert torch.equal(got["keep"], state["keep"]) and not torch.equal(got["squash"], state["squash"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="blocksize"):
        Q8StorageWriter("x", blocksize=100)
    with pytest.raises(ValueError, match="code"):
        Q8StorageWriter("x", code="nope")
    with pytest.raises(TypeError, match="quantize"):
        Q8StorageWriter("x", quantize="yes")


def test_a_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    old = {"w": torch.randn(100, 50)}
    dcp.save(old, storage_writer=Q8StorageWriter(tmp_path), no_dist=True)
    before = sorted(p.name for p in tmp_path.iterdir())

    def failing_policy(fqn, whole):
        raise RuntimeError("disk full (simulated)")

    with pytest.raises(CheckpointException, match="disk full"):
        dcp.save(
            {"w": torch.randn(100, 50)}, storage_writer=Q8StorageWriter(tmp_path, quantize=failing_policy), no_dist=True
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    got = {"w": torch.zeros(100, 50)}
    dcp.load(got, storage_reader=Q8StorageReader(tmp_path), no_dist=True)
    assert torch.equal(got["w"], old["w"])
    # A later successful save replaces it and removes the old data file.
    new = {"w": torch.randn(100, 50)}
    dcp.save(new, storage_writer=Q8StorageWriter(tmp_path), no_dist=True)
    assert len(list(tmp_path.glob("*.q8"))) == 1
    dcp.load(got, storage_reader=Q8StorageReader(tmp_path), no_dist=True)
    assert torch.equal(got["w"], new["w"])


class Evil:
    """A pickle that, once loaded, creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_later_save_removes_temp_files_of_killed_saves(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead = int(dead.stdout)
    stale = [tmp_path / f".__1_0123456789abcdef.q8.{dead}.0123abcd.tmp", tmp_path / f"..metadata.{dead}.4567abcd.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    dcp.save({"w": torch.ones(4), "step": 1}, storage_writer=Q8StorageWriter(tmp_path), no_dist=True)
    assert not any(p.exists() for p in stale)
    assert len(list(tmp_path.iterdir())) == 2  # .metadata and the rank file


def test_reader_never_unpickles_metadata(tmp_path):
    # A checkpoint of DCP's own FileSystemWriter: told where it came from.
    dcp.save({"w": torch.randn(4)}, checkpoint_id=tmp_path / "plain", no_dist=True)
    with pytest.raises(CheckpointException, match="FileSystemWriter"):
        dcp.load({"w": torch.zeros(4)}, storage_reader=Q8StorageReader(tmp_path / "plain"), no_dist=True)
    with pytest.raises(CheckpointException, match="no DCP metadata"):
        dcp.load({"w": torch.zeros(4)}, storage_reader=Q8StorageReader(tmp_path / "missing"), no_dist=True)

    # A .metadata that would run code when unpickled: refused, nothing runs.
    folder, marker = tmp_path / "evil", tmp_path / "pwned"
    dcp.save({"w": torch.randn(4)}, storage_writer=Q8StorageWriter(folder), no_dist=True)
    (folder / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(q8.FormatError, match="q8 never unpickles"):
        Q8StorageReader(folder).read_metadata()
    with pytest.raises(CheckpointException, match="q8 never unpickles"):
        dcp.load({"w": torch.zeros(4)}, storage_reader=Q8StorageReader(folder), no_dist=True)
    assert not marker.exists()


def test_non_tensor_values_are_plain_data_never_a_pickle(tmp_path):
    """A rank file whose non-tensor value was replaced by a pickle that runs code (what
    DCP's planner would `torch.load`) is refused with q8.FormatError; nothing runs."""
    state = {"w": torch.randn(8), "step": 7, "name": "run", "extra": {"t": (1, "a", b"x", None, 2.5), "l": [1, 2]}}
    dcp.save(state, storage_writer=Q8StorageWriter(tmp_path), no_dist=True)
    got = zeros_like_state(state)
    dcp.load(got, storage_reader=Q8StorageReader(tmp_path), no_dist=True)
    assert_states_equal(got, state, "state")

    (data_file,) = tmp_path.glob("*.q8")
    marker = tmp_path / "pwned"
    with q8.safe_open(data_file) as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    payload = torch.frombuffer(bytearray(pickle.dumps(Evil(marker))), dtype=torch.uint8)
    names = [f"{i}:{k}" for i, k in enumerate(["w", "step", "name", "extra.t", "extra.l"])]
    old_layout = {n: payload.clone() for n in names if n not in tensors}  # no tree
    q8.save_file({**tensors, **old_layout}, data_file)
    with pytest.raises(CheckpointException, match="FormatError") as e:
        dcp.load(zeros_like_state(state), storage_reader=Q8StorageReader(tmp_path), no_dist=True)
    assert str(data_file) in str(e.value)
    assert not marker.exists()


def test_values_that_are_not_plain_data_are_refused_at_save(tmp_path):
    dcp.save({"w": torch.ones(3)}, storage_writer=Q8StorageWriter(tmp_path), no_dist=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    for value, match in [({1, 2}, "holds a set"), (Path("x"), "not plain data")]:
        with pytest.raises(CheckpointException, match=match):
            dcp.save({"w": torch.ones(3), "v": value}, storage_writer=Q8StorageWriter(tmp_path), no_dist=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def _edit_metadata(folder: Path, edit) -> None:
    tree = q8.load(folder / ".metadata")
    edit(tree)
    q8.save(tree, folder / ".metadata", {"format": "q8.dcp.metadata 1"})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t["storage"][0].__setitem__(3, "../../etc/passwd"), "bad storage entry"),
        (lambda t: t["storage"].pop(), "no storage entry"),
        (lambda t: t["storage"].append(list(t["storage"][0])), "two storage entries"),
        (lambda t: t["state_dict"]["w"].update(dtype="float128"), "dtype"),
        (lambda t: t["state_dict"]["w"]["chunks"][0][1].__setitem__(0, 99), "outside"),
        (lambda t: t["state_dict"]["w"].update(size=[-1]), "size"),
        (lambda t: t["planner_data"].update(w=("w", 1 << 40)), "planner_data"),
        (lambda t: t.update(version=3), "version"),
        (lambda t: t.update(storage_meta={"save_id": 1}), "storage_meta"),
        (lambda t: t.pop("storage"), "fields"),
    ],
)
def test_tampered_metadata_raises_format_error(tmp_path, edit, match):
    dcp.save({"w": torch.randn(4), "step": 1}, storage_writer=Q8StorageWriter(tmp_path), no_dist=True)
    _edit_metadata(tmp_path, edit)
    with pytest.raises(q8.FormatError, match=match):
        Q8StorageReader(tmp_path).read_metadata()


def test_corrupt_data_file_raises_format_error_naming_the_file(tmp_path):
    dcp.save({"w": torch.randn(64, 64)}, storage_writer=Q8StorageWriter(tmp_path), no_dist=True)
    (data_file,) = tmp_path.glob("*.q8")
    raw = bytearray(data_file.read_bytes())
    raw[200] ^= 0xFF  # inside the tensor data
    data_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointException, match=rf"FormatError: {data_file}.*checksum"):
        dcp.load({"w": torch.zeros(64, 64)}, storage_reader=Q8StorageReader(tmp_path), no_dist=True)


def test_uint8_codes_never_load_into_float_state(tmp_path):
    """8-bit codes where the state dict now expects fp32 (a 1-D parameter's state saved by a q8
    before the row layout): refused, where a cast would give state of 0..255."""
    dcp.save({"exp_avg": torch.arange(200, dtype=torch.uint8)}, storage_writer=Q8StorageWriter(tmp_path), no_dist=True)
    with pytest.raises(CheckpointException, match=r"holds uint8 .*expects torch\.float32"):
        dcp.load({"exp_avg": torch.zeros(200)}, storage_reader=Q8StorageReader(tmp_path), no_dist=True)
