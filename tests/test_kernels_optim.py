"""The fused 8-bit Adam/AdamW kernel (q8.kernels.adam_update) against the CPU path.

The reference is q8.optim's own CPU step (the compiled fused update of optim/_native.c);
after every step the parameter bytes and the codes and absmax of both moments must be
identical. Where these tests run (CUDA here; without CUDA under the Triton interpreter,
in the child process of tests/test_kernels.py) is explained in tests/test_kernels.py.
"""

import os

import pytest
import q8
import torch
from q8.codec import rounding_key
from q8.kernels import adam_update
from q8.optim.fused import adam_hyper

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if ON_GPU else "cpu"
if not (ON_GPU or INTERPRETED):
    pytest.skip("no CUDA: runs in test_kernels.py::test_kernels_under_the_triton_interpreter", allow_module_level=True)

# numpy, under the interpreter, warns where a result overflows (the overflow test wants it)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8).cpu()


def gradient(n: int, step: int, dtype: torch.dtype) -> torch.Tensor:
    """Gradients over many decades, with exact zeros and a few sign flips of tiny values."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)
    x[::97] = 0.0
    x[5::101] = 1e-39  # an fp32 subnormal
    return x.clamp(-6e4, 6e4).to(dtype)  # finite in fp16 too


def assert_same_state(p_kernel, m, v, p_ref, opt):
    state = opt.state[p_ref]
    assert torch.equal(bits(p_kernel), bits(p_ref)), "parameter differs"
    for name, mine in (("exp_avg", m), ("exp_avg_sq", v)):
        ref = state[name]
        assert torch.equal(mine.codes.cpu(), ref.codes), f"{name} codes differ"
        assert torch.equal(bits(mine.absmax), bits(ref.absmax)), f"{name} absmax differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("rows", [5, 1])
@pytest.mark.parametrize("cls", [q8.optim.Adam8bit, q8.optim.AdamW8bit])
def test_adam_steps_match_the_cpu_optimizer(cls, rows, blocksize, dtype):
    """Rows of 2 * blocksize + 17 elements: 5 rows each ending in a partial block (the row
    layout), or 1 row (the flat layout)."""
    shape = (rows, 2 * blocksize + 17)
    n = rows * shape[1]
    p0 = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype)
    p_ref = torch.nn.Parameter(p0.clone())
    decay = {"weight_decay": 0.1}  # Adam: L2 term on the gradient; AdamW: decoupled decay
    opt = cls([p_ref], lr=1e-2, blocksize=blocksize, min_8bit_size=0, **decay)
    p = p0.to(DEVICE)
    m = q8.quantize(torch.zeros(shape, device=DEVICE), "dynamic", blocksize, row_length=shape[1])
    v = q8.quantize(torch.zeros(shape, device=DEVICE), "udynamic_sq", blocksize, row_length=shape[1])
    assert m.row_length == (shape[1] if rows > 1 else n)
    for step in range(1, 5):
        grad = gradient(n, step, dtype).view(shape)
        p_ref.grad = grad.clone()
        opt.step()
        hyper = adam_hyper(opt.param_groups[0], step, decoupled=cls is q8.optim.AdamW8bit)
        key = rounding_key(opt.state[p_ref]["seed"], step)
        assert adam_update(p, grad.to(DEVICE), m, v, hyper, key) == -1
        assert_same_state(p, m, v, p_ref, opt)


def test_a_moment_loaded_in_another_table_is_re_encoded_as_on_the_cpu():
    """A second moment in bitsandbytes' / an earlier q8's table: decoded with it, re-encoded
    in udynamic_sq by stochastic rounding (global indices from `offset`), as the C kernel does."""
    from q8.codec import get_code
    from q8.optim.fused import _native_adam

    n, g = 4 * 64 + 5, torch.Generator().manual_seed(3)
    p0, grad = torch.randn(n, generator=g), gradient(n, 3, torch.float32)
    m0 = q8.quantize(torch.randn(n, generator=g), "dynamic", 64)
    v0 = q8.quantize(torch.rand(n, generator=g) ** 6, "udynamic", 64)
    hyper = adam_hyper({"betas": (0.9, 0.999), "lr": 1e-2, "weight_decay": 0.1, "eps": 1e-8}, 3, decoupled=True)
    codes, key, offset = (get_code("dynamic"), get_code("udynamic_sq")), rounding_key(7, 3), 3 * 2**31
    ref = [p0.clone(), *(q8.QTensor(t.codes.clone(), t.absmax.clone(), t.code, 64, t.shape, t.dtype) for t in (m0, v0))]
    assert _native_adam(ref[0], grad, ref[1], ref[2], hyper, *codes, key, offset) == -1
    p, m, v = p0.to(DEVICE), m0.to(DEVICE), v0.to(DEVICE)
    assert adam_update(p, grad.to(DEVICE), m, v, hyper, key=key, offset=offset, codes=codes) == -1
    assert torch.equal(bits(p), bits(ref[0]))
    for mine, theirs in ((m, ref[1]), (v, ref[2])):
        assert torch.equal(mine.codes.cpu(), theirs.codes) and torch.equal(bits(mine.absmax), bits(theirs.absmax))


def test_overflow_reports_the_first_bad_block():
    n, blocksize = 8 * 64, 64
    p = torch.zeros(4, 128, device=DEVICE)
    m = q8.quantize(torch.zeros(n, device=DEVICE), "dynamic", blocksize)
    v = q8.quantize(torch.zeros(n, device=DEVICE), "udynamic_sq", blocksize)
    grad = torch.ones(4, 128, device=DEVICE)
    grad.view(-1)[[7 * 64, 3 * 64 + 5]] = 1e30  # g * g overflows fp32 in blocks 3 and 7
    hyper = adam_hyper({"betas": (0.9, 0.999), "lr": 1e-3, "weight_decay": 0.0, "eps": 1e-8}, 1, decoupled=True)
    assert adam_update(p, grad, m, v, hyper) == 3
    p_ref = torch.nn.Parameter(torch.zeros(4, 128))
    p_ref.grad = grad.cpu()
    with pytest.raises(FloatingPointError, match="block 3"):
        q8.optim.AdamW8bit([p_ref], lr=1e-3, weight_decay=0.0, blocksize=blocksize, min_8bit_size=0).step()


def test_argument_errors():
    n = 256
    p = torch.zeros(n, device=DEVICE)
    m = q8.quantize(torch.zeros(n, device=DEVICE), "dynamic", 64)
    v = q8.quantize(torch.zeros(n, device=DEVICE), "udynamic", 64)
    hyper = [0.9, 0.1, 0.999, 0.001, 1e-8, 1e-3, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="grad must be contiguous with 256 elements"):
        adam_update(p, torch.zeros(n + 1, device=DEVICE), m, v, hyper)
    with pytest.raises(ValueError, match="p must be contiguous"):
        adam_update(torch.zeros(16, 32, device=DEVICE).t(), torch.zeros(n, device=DEVICE), m, v, hyper)
    small_v = q8.quantize(torch.zeros(n, device=DEVICE), "udynamic", 128)
    with pytest.raises(ValueError, match="v has 256 elements in blocks of 128"):
        adam_update(p, torch.zeros(n, device=DEVICE), m, small_v, hyper)
    with pytest.raises(ValueError, match="hyper must hold 10 values"):
        adam_update(p, torch.zeros(n, device=DEVICE), m, v, hyper[:9])
    rows_v = q8.quantize(torch.zeros(8, 32, device=DEVICE), "udynamic_sq", 64, row_length=32)
    with pytest.raises(ValueError, match=r"v has 256 elements in blocks of 64 \(rows of 32\)"):
        adam_update(p, torch.zeros(n, device=DEVICE), m, rows_v, hyper)
    assert (m.codes == m.code.zero_index).all() and (m.absmax == 0).all()  # nothing was written


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [q8.optim.Adam8bit, q8.optim.AdamW8bit])
def test_optimizer_on_cuda_equals_cpu_end_to_end(cls, dtype):
    """The optimizer on CUDA parameters (the kernel) ends with the CPU run's bytes."""
    shapes = [(200, 300), (4096,), (77, 65)]
    gen = torch.Generator().manual_seed(0)
    cpu = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opts = [cls(ps, lr=1e-2, weight_decay=0.05, min_8bit_size=0) for ps in (cpu, gpu)]
    for step in range(1, 4):
        for p_cpu, p_gpu in zip(cpu, gpu, strict=True):
            p_cpu.grad = gradient(p_cpu.numel(), step, dtype).view(p_cpu.shape)
            p_gpu.grad = p_cpu.grad.cuda()
        for opt in opts:
            opt.step()
    for p_cpu, p_gpu in zip(cpu, gpu, strict=True):
        assert torch.equal(bits(p_gpu), bits(p_cpu))
        for name in ("exp_avg", "exp_avg_sq"):
            ref, got = opts[0].state[p_cpu][name], opts[1].state[p_gpu][name]
            assert got.device.type == "cuda"
            assert torch.equal(got.codes.cpu(), ref.codes) and torch.equal(bits(got.absmax), bits(ref.absmax))
