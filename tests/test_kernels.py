"""The Triton kernels (q8.kernels) against the CPU path (q8.codec.native), byte for byte.

Where each test runs:

- With CUDA: here, on cuda tensors through the compiled kernels, plus end to end through
  `q8.quantize` / `q8.dequantize`.
- Without CUDA: under the Triton interpreter, on CPU tensors. TRITON_INTERPRET=1 has to be
  set before triton is first imported (triton decorates its own `tl.*` helpers then) and
  stays in force for the whole process. Inside a shared pytest process that is both too
  late (another test file may have imported triton already) and too wide (it would change
  every later file's triton code). So `test_kernels_under_the_triton_interpreter` runs
  this file again in a child pytest with TRITON_INTERPRET=1 and reports its outcome; here
  the kernel tests are skipped. It runs tests/test_kernels_optim.py the same way.
  `TRITON_INTERPRET=1 pytest tests/test_kernels.py` shows them one by one.
- `test_compiled_ptx_is_exact` compiles the kernels for sm_90 without a GPU and checks the
  PTX for the exactness rules (no FMA, no flush-to-zero, IEEE division, int64 indexing).
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import q8
import torch
from q8 import kernels
from q8.codec import get_code, native
from q8.kernels import blockwise as kernel_codec
from q8.kernels.quant import EXACT

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if ON_GPU else "cpu"
NAMES = ("dynamic", "udynamic", "linear", "ulinear")
BLOCKSIZES = (64, 256, 1024, 4096)

runs_kernels = pytest.mark.skipif(
    not (ON_GPU or INTERPRETED), reason="no CUDA: runs in test_kernels_under_the_triton_interpreter"
)
compiled_only = pytest.mark.skipif(INTERPRETED, reason="needs compiled (not interpreted) kernels")
# numpy, under the interpreter, warns where results overflow to inf or divide by a NaN
# absmax; both are expected here (inf on overflow is the spec, NaN blocks are reported).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def quantile_test_code() -> q8.Code:
    g = torch.Generator().manual_seed(7)
    return q8.quantile_code(torch.randn(50_000, generator=g) ** 3, blocksize=256)


def all_codes() -> list[q8.Code]:
    return [get_code(name) for name in NAMES] + [quantile_test_code()]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for exact comparison (NaN and -0.0 included)."""
    return t.contiguous().view(torch.uint8).cpu()


def assert_same_as_cpu(x: torch.Tensor, code: q8.Code, blocksize: int, row_length: int | None = None) -> None:
    """Encode and decode `x` with the kernels and with the CPU path (flat, or in rows of
    `row_length`); all bytes must match."""
    ref_codes, ref_absmax, ref_bad = native.encode(x.float().contiguous(), code, blocksize, row_length)
    codes, absmax, bad = kernels.encode(x.to(DEVICE), code, blocksize, row_length)
    assert bad == ref_bad
    if bad >= 0:
        return
    assert torch.equal(bits(absmax), bits(ref_absmax))
    first = (codes.cpu() != ref_codes).nonzero().flatten()[:5]
    assert first.numel() == 0, (
        f"codes differ at {first.tolist()}: x={x.flatten()[first].tolist()} "
        f"kernel={codes.cpu()[first].tolist()} cpu={ref_codes[first].tolist()}"
    )
    ref_out = native.decode(ref_codes, ref_absmax, code, blocksize, row_length)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = kernels.decode(codes, absmax, code, blocksize, dtype, row_length)
        assert out.dtype == dtype
        assert torch.equal(bits(out), bits(ref_out.to(dtype))), f"decode to {dtype} differs"


def varied(n: int, seed: int, signed: bool = True) -> torch.Tensor:
    """Random values over many magnitudes, with all-zero and outlier blocks mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)
    x[: min(n, 300)] = 0.0
    x[n // 2] = 1e30
    return x if signed else x.abs()


@runs_kernels
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("code", all_codes(), ids=lambda c: c.name)
def test_random_data_matches_cpu(code, blocksize):
    n = 3 * blocksize + 37  # partial last block
    assert_same_as_cpu(varied(n, seed=blocksize, signed=code.signed), code, blocksize)


@runs_kernels
@pytest.mark.parametrize("row_length,blocksize", [(100, 64), (1, 64), (63, 64), (300, 256), (5000, 4096)])
def test_row_layout_matches_cpu(row_length, blocksize):
    """Blocks that restart at every row (partial blocks inside the tensor): the CPU bytes."""
    x = varied(7 * row_length, seed=row_length)
    assert_same_as_cpu(x, get_code("dynamic"), blocksize, row_length)
    x[3 * row_length + row_length // 2] = math.nan  # row 3: the kernel names the CPU path's block
    per_row = -(-row_length // blocksize)
    want = 3 * per_row + row_length // 2 // blocksize
    assert kernels.encode(x.to(DEVICE), get_code("dynamic"), blocksize, row_length)[2] == want
    assert native.encode(x, get_code("dynamic"), blocksize, row_length)[2] == want


def adversarial(code: q8.Code, blocksize: int = 64) -> torch.Tensor:
    """Blocks whose normalised values q = x / absmax sit on and next to every threshold
    and table value, under absmax scales that keep q exact (powers of two, 1.0), make it
    rounded (3.7) or push x and absmax into the subnormals."""
    inf = torch.tensor(math.inf)
    t, v = code.thresholds, code.values
    q = torch.cat([t, torch.nextafter(t, inf), torch.nextafter(t, -inf), v, -v, -t, torch.tensor([0.0, -0.0])])
    q = q[q.abs() <= 1]
    per_block = blocksize - 1
    q = torch.nn.functional.pad(q, (0, -q.numel() % per_block)).view(-1, per_block)
    blocks = []
    for i, scale in enumerate([1.0, 2.0**-20, 2.0**100, 3.7, 1e-38, 2.0**-140, 5e-45]):
        sign = -1.0 if i % 2 else 1.0  # the absmax element negative in every other block
        head = torch.full((q.shape[0], 1), sign * scale)
        blocks.append(torch.cat([head, q * scale], dim=1))
    return torch.cat(blocks).flatten()


@runs_kernels
@pytest.mark.parametrize("code", all_codes(), ids=lambda c: c.name)
def test_thresholds_ties_zeros_subnormals_match_cpu(code):
    x = adversarial(code)
    assert (x.abs() < torch.finfo(torch.float32).tiny).sum() > 100  # subnormals really present
    assert_same_as_cpu(x, code, 64)
    assert_same_as_cpu(x, code, 256)


@runs_kernels
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_nonfinite_reports_the_first_bad_block(blocksize):
    code = get_code("dynamic")
    n = 300 * 64 + 5
    for bad_positions in ([n - 1], [70 * 64 + 3, 5 * 64, 200 * 64], [0], [4096 * 3 + 1, 4096 * 2]):
        for value in (math.nan, math.inf, -math.inf):
            x = varied(n, seed=1)
            x[[p for p in bad_positions if p < n]] = value
            _, _, bad = kernels.encode(x.to(DEVICE), code, blocksize)
            assert bad == native.encode(x, code, blocksize)[2] == min(bad_positions) // blocksize


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_widened_exactly(dtype):
    code = get_code("dynamic")
    x = varied(5000, seed=3).clamp(-6e4, 6e4).to(dtype)
    x[:50] = torch.tensor([torch.finfo(dtype).smallest_normal / 3], dtype=dtype)  # half subnormals
    ref = native.encode(x.float(), code, 256)
    codes, absmax, bad = kernels.encode(x.to(DEVICE), code, 256)
    assert bad == -1 and torch.equal(codes.cpu(), ref[0]) and torch.equal(bits(absmax), bits(ref[1]))


@runs_kernels
def test_half_precision_output_rounds_like_a_cast():
    """Products v * absmax that overflow fp16, fall into its subnormals or sit near its
    rounding midpoints: writing fp16/bf16 directly equals decoding to fp32 and casting."""
    code = get_code("linear")
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (64 * 40,), dtype=torch.uint8, generator=g)
    absmax = torch.cat([torch.tensor([1e5, 65504.0, 6e-5, 1e-7, 3.0, 2.0**-24]), torch.rand(34, generator=g) * 1e3])
    ref = native.decode(codes, absmax, code, 64)
    for dtype in (torch.float16, torch.bfloat16):
        out = kernels.decode(codes.to(DEVICE), absmax.to(DEVICE), code, 64, dtype)
        assert torch.equal(bits(out), bits(ref.to(dtype)))
    assert torch.isinf(ref.to(torch.float16)).any() and (ref.to(torch.float16).abs() < 6.1e-5).any()


@runs_kernels
@pytest.mark.parametrize(("dtype", "bits_kept"), [(torch.float16, 11), (torch.bfloat16, 8)])
def test_half_precision_output_ties_go_to_even(dtype, bits_kept):
    """A table whose entries are exact midpoints between neighbouring fp16 (bf16) values of
    [0.5, 1), scaled by powers of two (also into the subnormals and past the maximum)."""
    odd = (2 * torch.arange(128, dtype=torch.float64) + 1) * 2.0 ** -(bits_kept + 1)
    code = q8.Code("midpoints", torch.cat([-(0.5 + odd[:127]).flip(0), torch.zeros(1), 0.5 + odd]))
    codes = torch.arange(256, dtype=torch.uint8).repeat(8)
    absmax = torch.tensor([1.0, 2.0**-14, 2.0**-20, 2.0**-130, 2.0**15, 2.0**16, 2.0**120, 2.0**128 * 0.75])
    ref = native.decode(codes, absmax, code, 256)
    out = kernels.decode(codes.to(DEVICE), absmax.to(DEVICE), code, 256, dtype)
    assert torch.equal(bits(out), bits(ref.to(dtype)))


@runs_kernels
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65])
def test_tiny_inputs(n):
    code = get_code("udynamic")
    assert_same_as_cpu(varied(max(n, 1), seed=n, signed=False)[:n], code, 64)
    codes, absmax, bad = kernels.encode(torch.zeros(n, device=DEVICE), code, 64)
    assert bad == -1 and (codes.cpu() == code.zero_index).all() and (absmax.cpu() == 0).all()


@runs_kernels
def test_argument_errors():
    code = get_code("dynamic")
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="x must be a contiguous 1-D"):
        kernels.encode(x, code, 64)
    with pytest.raises(ValueError, match="x must be a contiguous 1-D"):
        kernels.encode(x.t().reshape(-1)[::2], code, 64)
    with pytest.raises(ValueError, match="x must be a contiguous 1-D tensor of"):
        kernels.encode(x.flatten().double(), code, 64)
    codes, absmax, _ = kernels.encode(x.flatten(), code, 64)
    with pytest.raises(ValueError, match="need 4 absmax values"):
        kernels.decode(codes, absmax[:3], code, 64)
    with pytest.raises(ValueError, match="absmax must be"):
        kernels.decode(codes, absmax.half(), code, 64)
    with pytest.raises(ValueError, match="dtype must be one of"):
        kernels.decode(codes, absmax, code, 64, torch.int32)


@runs_kernels
def test_tables_are_copied_once_per_device():
    code = quantile_test_code()
    tree, values = kernel_codec.device_tables(code, torch.device(DEVICE))
    assert kernel_codec.device_tables(code, torch.device(DEVICE))[0] is tree
    assert tree.device.type == DEVICE and values.device.type == DEVICE
    assert torch.equal(values.cpu(), code.values)
    # breadth-first order: the root is the median threshold, the deepest level the even ones
    t = code.thresholds
    assert tree[0] == t[127] and torch.equal(tree[1:3].cpu(), t[[63, 191]]) and torch.equal(tree[127:].cpu(), t[::2])
    assert torch.equal(tree.sort().values.cpu(), t)


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="CPU tensors are valid input under the interpreter")
def test_cpu_tensors_are_refused_by_compiled_kernels():
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.encode(torch.zeros(64), get_code("dynamic"), 64)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_on_cuda_equals_cpu_end_to_end(dtype):
    xt = varied(3 * 2053, seed=9).clamp(-6e4, 6e4).to(dtype).view(3, -1).t()  # non-contiguous
    for code in [*NAMES, "auto", quantile_test_code()]:
        for blocksize in (64, 2048):
            ref = q8.quantize(xt, code, blocksize)
            qt = q8.quantize(xt.cuda(), code, blocksize)
            assert qt.device.type == "cuda" and qt.code == ref.code and qt.shape == xt.shape
            assert torch.equal(qt.codes.cpu(), ref.codes) and torch.equal(bits(qt.absmax), bits(ref.absmax))
            for out_dtype in (None, torch.float32, torch.float16, torch.bfloat16):
                y = q8.dequantize(qt, out_dtype)
                assert y.device.type == "cuda" and y.shape == xt.shape
                assert torch.equal(bits(y), bits(q8.dequantize(ref, out_dtype)))
    with pytest.raises(ValueError, match="NaN or inf in block 1"):
        q8.quantize(torch.tensor([0.0] * 64 + [math.nan], device="cuda"), blocksize=64)


@pytest.mark.skipif(not ON_GPU or torch.cuda.mem_get_info()[0] < 14 << 30, reason="needs CUDA and 14 GiB free")
def test_more_than_2_31_elements_on_cuda():
    """Blocks past element 2**31 encode as the CPU path encodes them (blocks are independent)."""
    n = (1 << 31) + 3 * 4096 + 5
    x = torch.randn(n, device="cuda", dtype=torch.float16)
    code = get_code("dynamic")
    codes, absmax, bad = kernels.encode(x, code, 4096)
    start = (1 << 31) - 4096
    tail = x[start:].float().cpu()
    ref_codes, ref_absmax, _ = native.encode(tail, code, 4096)
    assert bad == -1 and torch.equal(codes[start:].cpu(), ref_codes)
    assert torch.equal(absmax[start // 4096 :].cpu(), ref_absmax)
    del x
    out = kernels.decode(codes, absmax, code, 4096, torch.float16)
    assert torch.equal(bits(out[start:]), bits(native.decode(ref_codes, ref_absmax, code, 4096).half()))


def kernel_ptx(kernel, signature: dict, constexprs: dict) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
    options = {**EXACT, "num_warps": kernel_codec.NUM_WARPS}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def assert_exact_ptx(ptx: str) -> None:
    for forbidden in ("fma.", ".ftz", "div.full", "div.approx", "rcp.approx", "mad.f32", "mad.rn"):
        assert forbidden not in ptx, f"kernel PTX contains {forbidden!r}: not bit-identical to the CPU path"


@compiled_only
@pytest.mark.parametrize("in_dtype", ["fp32", "fp16", "bf16"])
def test_compiled_ptx_is_exact(in_dtype):
    """The rules of q8.kernels.quant hold in the code the GPU would run (checked offline)."""
    blocksize = 256
    rows = kernel_codec.TILE // blocksize
    encode_ptx = kernel_ptx(
        kernel_codec._encode_kernel,
        {"x_ptr": f"*{in_dtype}", "tree_ptr": "*fp32", "codes_ptr": "*u8", "absmax_ptr": "*fp32",
         "bad_ptr": "*i64", "row_length": "i32", "per_row": "i32", "nblocks": "i32", "zero_code": "i32"},
        {"BLOCKSIZE": blocksize, "ROWS": rows},
    )  # fmt: skip
    assert_exact_ptx(encode_ptx)
    assert "div.rn.f32" in encode_ptx
    assert re.search(r"setp\.\w+\.s64", encode_ptx), "element offsets are not compared as int64"
    decode_ptx = kernel_ptx(
        kernel_codec._decode_kernel,
        {"codes_ptr": "*u8", "absmax_ptr": "*fp32", "values_ptr": "*fp32", "out_ptr": f"*{in_dtype}",
         "row_length": "i32", "per_row": "i32", "nblocks": "i32"},
        {"BLOCKSIZE": blocksize, "ROWS": rows},
    )  # fmt: skip
    assert_exact_ptx(decode_ptx)
    assert "mul.rn.f32" in decode_ptx
    if in_dtype == "fp16":
        assert "cvt.rn.f16.f32" in decode_ptx, "fp16 output is not rounded to nearest even"


@compiled_only
@pytest.mark.parametrize("p_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("rule", ["adam", "sgd", "lion", "rmsprop", "adagrad", "lamb"])
def test_compiled_optimizer_ptx_is_exact(rule, p_dtype):
    """The fused step kernel with each rule: no FMA (Triton contracts by default), IEEE
    division and square roots, in binary32 and in the binary64 bias corrections."""
    from q8.kernels import optim as kernel_optim

    signature = {"p_ptr": f"*{p_dtype}", "g_ptr": f"*{p_dtype}", "ok_ptr": "*i64", "step_ptr": "*i64",
                 "report_ptr": "*i64"}  # fmt: skip
    for s in "abc":
        signature.update({f"{s}_ptr": "*u8", f"{s}_absmax": "*fp32", f"{s}_table": "*fp32", f"{s}_tree": "*fp32",
                          f"{s}_values": "*fp32", f"{s}_zero": "i32"})  # fmt: skip
    signature.update(dict.fromkeys(["row_length", "per_row", "nblocks", "offset", "seed", "param"], "i64"))
    signature.update(dict.fromkeys([f"h{i}" for i in range(12)], "fp32"))
    signature.update(dict.fromkeys(["lr_bits", "beta1_bits", "beta2_bits", "lr_decay_bits"], "i64"))
    signature.update({"trust_ptr": "*fp32", "out_ptr": "*fp32"})
    constexprs = {"RULE": kernel_optim.RULES[rule], "KIND_A": 2, "KIND_B": 3, "KIND_C": 1, "NEGATE": False,
                  "TERMS": False, "BLOCKSIZE": 256, "ROWS": kernel_codec.TILE // 256}  # fmt: skip
    ptx = kernel_ptx(kernel_optim._step_kernel, signature, constexprs)
    assert_exact_ptx(ptx)
    assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx and "div.rn.f32" in ptx  # codec divisions at least
    if rule in ("adam", "rmsprop", "adagrad", "lamb"):
        assert "sqrt.rn.f32" in ptx
    if rule in ("adam", "lamb", "adagrad"):  # bias corrections in binary64, correctly rounded
        assert "div.rn.f64" in ptx and "cvt.rn.f32.f64" in ptx
    if rule in ("adam",):
        assert "sqrt.rn.f64" in ptx


@compiled_only
@pytest.mark.parametrize("rule", ["adam", "rmsprop"])
def test_compiled_batched_optimizer_ptx_is_exact(rule):
    """The launch of many small parameters (addresses read from an int64 table and cast to
    typed pointers) compiles for the GPU, under the same exactness rules (its rules compile
    above; here the skeleton around them: binary64 constants, three slots)."""
    from q8.kernels import optim as kernel_optim

    signature = {"params_ptr": "*i64", "tiles_ptr": "*i64", "ok_ptr": "*i64", "report_ptr": "*i64"}
    for s in "abc":
        signature.update({f"{s}_tree": "*fp32", f"{s}_values": "*fp32", f"{s}_zero": "i32"})
    signature.update(dict.fromkeys([f"h{i}" for i in range(12)], "fp32"))
    signature.update(dict.fromkeys(["lr_bits", "beta1_bits", "beta2_bits", "lr_decay_bits"], "i64"))
    signature["trust_ptr"] = "*fp32"
    constexprs = {"P_DTYPE": kernel_optim.TL_DTYPES[torch.bfloat16], "G_DTYPE": kernel_optim.TL_DTYPES[torch.float32],
                  "RULE": kernel_optim.RULES[rule], "KIND_A": 2, "KIND_B": 3, "KIND_C": 1, "NEGATE": True,
                  "BLOCKSIZE": 256, "ROWS": kernel_codec.TILE // 256}  # fmt: skip
    ptx = kernel_ptx(kernel_optim._batched_step_kernel, signature, constexprs)
    assert_exact_ptx(ptx)
    assert "mul.rn.f32" in ptx and "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
    if rule == "adam":
        assert "div.rn.f64" in ptx and "cvt.rn.f32.f64" in ptx


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the kernel tests run in this process")
def test_kernels_under_the_triton_interpreter():
    """Without CUDA: run the kernel tests (tests/test_kernels*.py) in a child process
    under TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONSAFEPATH": "1"}
    files = sorted(str(f) for f in Path(__file__).parent.glob("test_kernels*.py"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *files]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"kernel tests failed under the interpreter:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    )
    assert " passed" in proc.stdout and " failed" not in proc.stdout
