"""The fused optimizer kernels on the GPU path (q8.kernels.optim, optim/cuda.py) against the
CPU path, and the GPU step's promise: no host-device synchronization.

The shared vectors of tests/optim_vectors.py run through the CUDA code path (the Triton
kernels, the device-side finiteness flags and step counts) and through the C kernels; every
byte of parameters and state must match. Where these tests run (CUDA here; without CUDA
under the Triton interpreter, in the child process of tests/test_kernels.py, with CPU
tensors sent down the CUDA code path) is explained in tests/test_kernels.py.
"""

import contextlib
import math
import os
import warnings

import optim_vectors
import pytest
import q8
import torch
from q8.optim import cuda as optim_cuda
from q8.optim import fused

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if ON_GPU else "cpu"
if not (ON_GPU or INTERPRETED):
    pytest.skip("no CUDA: runs in test_kernels.py::test_kernels_under_the_triton_interpreter", allow_module_level=True)

# numpy, under the interpreter, warns where a result overflows (the overflow test wants it)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture
def gpu_path(monkeypatch):
    """Parameters on DEVICE take the Triton kernels (CPU tensors too, under the interpreter),
    and nothing falls back to the generic path."""
    monkeypatch.setattr(fused, "TRITON_DEVICES", {"cuda", DEVICE})
    monkeypatch.setattr(fused, "generic_update", None)


def cpu_run(name: str):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "TRITON_DEVICES", {"cuda"})
        return optim_vectors.run(name)


@pytest.mark.parametrize("name", list(optim_vectors.OPTIMIZERS))
def test_rules_match_the_cpu_kernels(name, gpu_path):
    optim_vectors.assert_same(optim_vectors.run(name, DEVICE), cpu_run(name))


class DeviceRead(AssertionError):
    pass


@contextlib.contextmanager
def no_device_reads():
    """Every way a step could read a device value back to the host raises inside."""

    def refuse(*args, **kwargs):
        raise DeviceRead("the step read a device value on the host")

    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
    with pytest.MonkeyPatch.context() as patch:
        for name in names:
            patch.setattr(torch.Tensor, name, refuse)
        patch.setattr(torch.cuda, "synchronize", refuse)
        yield


@pytest.mark.parametrize("name", ["adamw", "rmsprop-centered-momentum", "lamb", "lars"])
def test_a_step_never_reads_the_device(name, gpu_path):
    """Steps after the first (which creates the state) read nothing back: the finiteness
    check, the step count, the bias corrections, LAMB's / LARS's norms and the overflow
    report all stay on the device. The test fails if such a read is put back."""
    opt, params = optim_vectors.make(name, DEVICE)
    for step in range(1, optim_vectors.STEPS + 1):
        for i, p in enumerate(params):
            p.grad = optim_vectors.gradient(p.shape, p.dtype, step, seed=i).to(DEVICE)
        if step == 1:
            opt.step()
            continue
        with no_device_reads():
            opt.step()
    optim_vectors.assert_same((opt, params), cpu_run(name))
    with pytest.raises(DeviceRead), no_device_reads():  # the guard works
        opt.report()


def test_a_non_finite_gradient_skips_on_the_device_and_is_reported_later(gpu_path):
    p = torch.nn.Parameter(torch.randn(8, 64, device=DEVICE))
    q = torch.nn.Parameter(torch.randn(8, 64, device=DEVICE))
    opt = q8.optim.AdamW8bit([p, q], lr=1e-2, min_8bit_size=0, blocksize=64)
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    before = p.detach().clone(), opt.state[p]["exp_avg"].codes.clone(), int(opt.state[p]["step"])
    p.grad = torch.ones_like(p)
    p.grad[3, 5] = math.nan
    q_before = q.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing reported during the step itself
        with no_device_reads():
            opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(opt.state[p]["exp_avg"].codes, before[1])
    assert int(opt.state[p]["step"]) == before[2] == 1 and int(opt.state[q]["step"]) == 2
    assert not torch.equal(q.detach(), q_before)
    with pytest.warns(RuntimeWarning, match="1 parameter update"):
        opt.report()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.report()  # reported once


def test_overflowed_state_is_reported_at_the_next_sync_point(gpu_path):
    p = torch.nn.Parameter(torch.zeros(4, 128, device=DEVICE))
    opt = q8.optim.AdamW8bit([p], lr=1e-3, weight_decay=0.0, min_8bit_size=0, blocksize=64)
    p.grad = torch.ones(4, 128, device=DEVICE)
    p.grad[1, 70] = 1e30  # g * g overflows fp32 in one block of v
    opt.step()
    with pytest.raises(FloatingPointError, match=r"parameter 0 .*overflowed fp32 in 1 block"):
        opt.state_dict()  # a sync point


def test_step_counts_are_device_tensors_and_plain_ints_in_the_state_dict(gpu_path):
    opt, params = optim_vectors.run("adamw", DEVICE)
    assert all(isinstance(opt.state[p]["step"], torch.Tensor) for p in params)
    sd = opt.state_dict()
    assert all(s["step"] == optim_vectors.STEPS and type(s["step"]) is int for s in sd["state"].values())
    again, _ = optim_vectors.make("adamw", DEVICE)
    again.load_state_dict(sd)
    assert again.state[again.param_groups[0]["params"][0]]["step"] == optim_vectors.STEPS


def test_argument_errors():
    from q8.kernels import step

    n = 256
    p = torch.zeros(n, device=DEVICE)
    m = q8.quantize(torch.zeros(n, device=DEVICE), "dynamic", 64)
    flags = {
        "ok": torch.ones((), dtype=torch.int64, device=DEVICE),
        "step_count": torch.zeros((), dtype=torch.int64, device=DEVICE),
        "report": torch.zeros(3, dtype=torch.int64, device=DEVICE),
        "seed": 0,
        "trust": torch.ones((), device=DEVICE),
    }
    args = ("adam", p, torch.zeros(n, device=DEVICE), [m, None, None], [m.code, None, None], [0.0] * 10, [0.0] * 4)
    with pytest.raises(ValueError, match="grad must be contiguous with 256 elements"):
        step(*args[:2], torch.zeros(n + 1, device=DEVICE), *args[3:], **flags, layout=(n, 64))
    with pytest.raises(ValueError, match=r"slot 0 has 256 elements in blocks of 64 \(rows of 256\), expected"):
        step(*args, **flags, layout=(n, 128))
    assert (m.codes == m.code.zero_index).all() and (m.absmax == 0).all()  # nothing was written


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_a_captured_step_replays_exactly(name):
    """torch.cuda.graphs: a step captured after a warm-up replays step after step with the
    bytes of eager steps (the step count and bias corrections are read on the device)."""
    eager, eager_params = optim_vectors.make(name, "cuda")
    graphed, params = optim_vectors.make(name, "cuda")
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g

    def load(step, targets):
        for i, (p, t) in enumerate(zip(params, targets, strict=True)):
            t.copy_(optim_vectors.gradient(p.shape, p.dtype, step, seed=i))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        load(1, grads)
        graphed.step()  # creates the state and compiles the kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for step in range(2, 6):
        load(step, grads)
        graph.replay()
    for step in range(1, 6):
        for i, p in enumerate(eager_params):
            p.grad = optim_vectors.gradient(p.shape, p.dtype, step, seed=i).cuda()
        eager.step()
    torch.cuda.synchronize()
    optim_vectors.assert_same((graphed, params), (eager, eager_params))


def test_an_empty_parameter_steps(gpu_path):
    p, empty = (torch.nn.Parameter(torch.ones(s, device=DEVICE)) for s in ((4, 300), (0, 300)))
    opt = q8.optim.AdamW8bit([empty, p], lr=1e-2, min_8bit_size=0, blocksize=64)
    for _ in range(2):
        empty.grad, p.grad = torch.zeros_like(empty), torch.ones_like(p)
        opt.step()
    assert int(opt.state[empty]["step"]) == int(opt.state[p]["step"]) == 2


# ---- small parameters batched: one launch per group and kind ---------------------------------

BATCHED = [  # shape, dtype: three launches (fp32 / bf16 parameters with 8-bit state, fp32 state) and one alone
    ((5, 145), torch.float32),
    ((2, 4100), torch.float32),  # 130 blocks: three programs of 64 blocks
    ((3, 64), torch.float32),
    ((3, 128), torch.bfloat16),
    ((4, 70), torch.bfloat16),
    ((40,), torch.float32),  # vectors: fp32 state
    ((100,), torch.float32),
    ((3, 3000), torch.float32),  # above the batch limit set below: its own launch
]
SKIPPED = 1  # its gradient holds a NaN at step 2: skipped in the middle of its batch


class Launches:
    """Counts the launches of a Triton kernel (wraps `kernel[grid]`)."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


def batched_run(name: str, device: str, reads_ok: bool = True) -> tuple:
    """STEPS steps of optimizer `name` on BATCHED (steps after the first under
    `no_device_reads` unless `reads_ok`)."""
    cls, kwargs = optim_vectors.OPTIMIZERS[name]
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype).to(device)) for s, dtype in BATCHED]
    opt = cls(params, **kwargs, **optim_vectors.OPTIONS)
    for step in range(1, optim_vectors.STEPS + 1):
        for i, p in enumerate(params):
            p.grad = optim_vectors.gradient(p.shape, p.dtype, step, seed=i).to(device)
        if step == 2:
            params[SKIPPED].grad.view(-1)[4100 + 77] = math.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the CPU path warns about the skip at once
            with no_device_reads() if step > 1 and not reads_ok else contextlib.nullcontext():
                opt.step()
    return opt, params


@pytest.fixture
def launches(monkeypatch):
    from q8.kernels import optim as kernel_optim

    monkeypatch.setattr(optim_cuda, "BATCH_NUMEL", 8200)
    counts = Launches(kernel_optim._step_kernel), Launches(kernel_optim._batched_step_kernel)
    monkeypatch.setattr(kernel_optim, "_step_kernel", counts[0])
    monkeypatch.setattr(kernel_optim, "_batched_step_kernel", counts[1])
    return counts


@pytest.mark.parametrize("name", ["adamw", "adam-l2-maximize", "sgd-nesterov", "lion", "rmsprop-centered-momentum",
                                  "adagrad"])  # fmt: skip
def test_small_parameters_step_in_one_launch_per_kind_with_the_same_bytes(name, gpu_path, launches):
    """Mixed sizes (a member of several programs), fp32 and 8-bit state, bf16 parameters and a
    parameter skipped in the middle of its batch: the CPU path's bytes, one launch per kind
    of small parameter, and no read of a device value."""
    opt, params = batched_run(name, DEVICE, reads_ok=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "TRITON_DEVICES", {"cuda"})
        ref = batched_run(name, "cpu")
    optim_vectors.assert_same((opt, params), ref)
    assert int(opt.state[params[SKIPPED]]["step"]) == optim_vectors.STEPS - 1
    assert launches[1].count == 3 * optim_vectors.STEPS and launches[0].count == optim_vectors.STEPS
    with pytest.warns(RuntimeWarning, match="1 parameter update"):
        opt.report()


def test_batch_tables_are_copied_only_when_the_tensors_change(gpu_path, launches, monkeypatch):
    """Steady steps reuse the device tables; new gradient tensors rebuild them; while a graph
    is captured, changed tensors take one launch each and tables read then are kept."""
    from q8.kernels import optim as kernel_optim

    opt, params = batched_run("adamw", DEVICE)
    tables = {key: (t.params, t.tiles) for key, t in opt._batches.items()}
    assert len(tables) == 3
    for p in params:
        p.grad.copy_(torch.ones_like(p.grad))  # the same tensors, new values
    opt.step()
    assert all(opt._batches[key].params is t[0] and opt._batches[key].tiles is t[1] for key, t in tables.items())
    monkeypatch.setattr(kernel_optim, "_capturing", lambda device: True)
    before = launches[0].count, launches[1].count
    opt.step()  # "captured", nothing changed: the kept tables, three launches
    assert (launches[0].count, launches[1].count) == (before[0] + 1, before[1] + 3)
    assert all(t.captured == [(t.params, t.tiles)] for t in opt._batches.values())
    params[0].grad = params[0].grad.clone()  # a new tensor: its batch cannot use its tables
    opt.step()
    assert (launches[0].count, launches[1].count) == (before[0] + 2 + 3, before[1] + 3 + 2)
    monkeypatch.setattr(kernel_optim, "_capturing", lambda device: False)
    opt.step()  # eager again: rebuilt, the captured tables still kept
    assert sum(len(t.captured) for t in opt._batches.values()) == 3
    assert sum(opt._batches[key].params is not t[0] for key, t in tables.items()) == 1  # params[0]'s
