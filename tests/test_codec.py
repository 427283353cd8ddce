"""The codec against its spec (docs/CODEC.md): tables, exact nearest rounding, edge cases."""

import math
from pathlib import Path

import numpy as np
import pytest
import q8
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from q8.codec import AUTO_CODES, get_code, mix32, quantize_stochastic, rounding_key
from q8.codec.blockwise import _encode_stochastic_torch

DATA = Path(__file__).parent / "data"
NAMES = ("dynamic", "udynamic", "udynamic_sq", "linear", "ulinear")


def brute_force_codes(x: torch.Tensor, code: q8.Code, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference encoder: argmin over the table of |x/absmax - v|, ties to the lower index."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = padded.abs().amax(1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    q = (padded / scale[:, None]).reshape(-1)[:n]  # IEEE fp32 division, like the spec
    dist = (q.double()[:, None] - code.values.double()[None, :]).abs()
    return dist.argmin(1).to(torch.uint8), absmax  # argmin returns the first (lower) index


def assert_exact(x: torch.Tensor, code_name: str | q8.Code, blocksize: int) -> q8.QTensor:
    code = get_code(code_name)
    qt = q8.quantize(x, code, blocksize)
    ref_codes, ref_absmax = brute_force_codes(x, code, blocksize)
    assert torch.equal(qt.absmax, ref_absmax)
    mismatch = (qt.codes != ref_codes).nonzero()
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} codes differ from exact nearest, first at {mismatch[:5].tolist()}"
    )
    return qt


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_dynamic_tables_equal_bitsandbytes_bit_for_bit(kind):
    ref = torch.tensor([float(v) for v in (DATA / f"bnb_dynamic_{kind}.txt").read_text().split()])
    code = q8.dynamic_code(signed=kind == "signed")
    assert torch.equal(code.values.view(torch.int32), ref.view(torch.int32))


def test_signed_dynamic_table_shape():
    v = q8.dynamic_code().values
    assert (v < 0).sum() == 127 and (v == 0).sum() == 1 and (v > 0).sum() == 128
    assert v[-1] == 1.0 and not (v == -1.0).any()


@pytest.mark.parametrize("name", NAMES)
def test_tables_are_valid(name):
    code = get_code(name)
    v = code.values
    assert v.dtype == torch.float32 and v.numel() == 256
    assert (v[1:] > v[:-1]).all() and v[code.zero_index] == 0
    assert v.abs().max() >= 1.0


def test_linear_tables():
    assert torch.equal(q8.linear_code().values, (torch.arange(-128, 128, dtype=torch.float64) / 127).float())
    assert torch.equal(q8.linear_code(signed=False).values, (torch.arange(256, dtype=torch.float64) / 255).float())


def test_coarser_linear_tables():
    """linear-N: k/N for the same k; a block uses the 2N+1 entries in [-1, 1], so its step
    is absmax/N and fewer levels give a larger error and fewer distinct codes."""
    assert q8.linear_code(levels=64) == get_code("linear-64")
    assert get_code("linear-64").values[128 + 64] == 1.0 and get_code("ulinear-100").values[100] == 1.0
    assert torch.equal(get_code("linear-90").values, (torch.arange(-128, 128, dtype=torch.float64) / 90).float())
    assert get_code("linear-127") != get_code("linear")  # same values, another name
    for bad in ("linear-0", "linear-128", "ulinear-256", "linear-", "linear-090", "linear-x", "dynamic-3"):
        with pytest.raises(ValueError, match="unknown code name"):
            get_code(bad)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    errors = []
    for levels in (127, 64, 16):
        qt = q8.quantize(x, q8.linear_code(levels=levels), 256)
        assert int(qt.codes.min()) >= 128 - levels and int(qt.codes.max()) == 128 + levels
        errors.append(q8.quant_error(x, qt).rel_l2)
    assert errors == sorted(errors) and errors[2] > 6 * errors[0]


@pytest.mark.parametrize("name", NAMES)
def test_thresholds_split_ties_to_the_lower_entry(name):
    code = get_code(name)
    v, t = code.values.double(), code.thresholds
    mid = (v[:-1] + v[1:]) / 2
    assert (t.double() > mid).all()
    below = torch.nextafter(t, torch.tensor(-math.inf)).double()
    assert (below <= mid).all()


def test_code_validation():
    good = q8.linear_code().values
    with pytest.raises(ValueError, match="256 values"):
        q8.Code("x", good[:-1])
    with pytest.raises(ValueError, match="strictly increasing"):
        q8.Code("x", good.flip(0))
    with pytest.raises(ValueError, match=r"contain 0\.0"):
        q8.Code("x", torch.linspace(-1, 1, 256))
    with pytest.raises(ValueError, match="finite"):
        q8.Code("x", torch.cat([good[:-1], torch.tensor([math.inf])]))
    with pytest.raises(ValueError, match="unknown code"):
        q8.quantize(torch.ones(4), code="nope")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_random_data_is_exact_nearest(name, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    x = torch.randn(3 * blocksize + 17, generator=g) * torch.exp(4 * torch.randn(3 * blocksize + 17, generator=g))
    if name.startswith("u"):
        x = x.abs()
    assert_exact(x, name, blocksize)


@pytest.mark.parametrize("name", NAMES)
def test_adversarial_values_are_exact_nearest(name):
    """Exact midpoints, thresholds and their fp32 neighbours, table entries, 0, -0."""
    code = get_code(name)
    t = code.thresholds
    inf = torch.tensor(math.inf)
    mids = ((code.values.double()[:-1] + code.values.double()[1:]) / 2).float()
    probes = torch.cat(
        [t, torch.nextafter(t, -inf), torch.nextafter(t, inf), mids, code.values, torch.tensor([0.0, -0.0])]
    )
    if not code.signed:
        probes = probes.abs()
    probes = probes.clamp(-1, 1)
    # One block per probe, each holding +1.0 so that absmax is 1 and q equals the probe.
    blocks = torch.zeros(probes.numel(), 64)
    blocks[:, 0] = 1.0
    blocks[:, 1] = probes
    assert_exact(blocks, code, 64)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True), min_size=1, max_size=300
    ),
    name=st.sampled_from(NAMES),
    blocksize=st.sampled_from([64, 128, 256]),
)
def test_property_exact_nearest(values, name, blocksize):
    x = torch.tensor(values, dtype=torch.float32)
    if name.startswith("u"):
        x = x.abs()
    qt = assert_exact(x, name, blocksize)
    y = q8.dequantize(qt)
    assert torch.isfinite(y).all()
    assert (y.abs() <= qt.absmax.repeat_interleave(blocksize)[: x.numel()] * qt.code.values.abs().max()).all()


def test_tiny_subnormal_and_huge_ranges():
    tiny = torch.tensor([1e-45, -1e-45, 1e-40, 1e-38, -3e-39, 2e-44] * 20)
    huge = torch.tensor([3e38, -1e-30, 1e-20, -3.4e38, 7.0, 1e-45] * 20)
    for x in (tiny, huge, torch.cat([tiny, huge])):
        for name in ("dynamic", "linear"):
            assert_exact(x, name, 64)


@pytest.mark.parametrize("repeat", [1, 4096])  # 4096: 1M elements, run on several threads
def test_flush_denormal_mode_does_not_change_codes(repeat):
    x = torch.tensor([1e-38, 3e-39, -2e-39, 1e-45] * 64).repeat(repeat)
    expected = q8.quantize(x, "dynamic", 64)
    assert torch.equal(expected.codes[:256], brute_force_codes(x[:256], q8.dynamic_code(), 64)[0])
    decoded = q8.dequantize(expected)
    assert 0 < decoded[1] < torch.finfo(torch.float32).tiny  # a subnormal, which flush-to-zero would lose
    torch.set_flush_denormal(True)
    try:
        assert torch.equal(q8.quantize(x, "dynamic", 64).codes, expected.codes)
        assert torch.equal(q8.dequantize(expected), decoded)
    finally:
        torch.set_flush_denormal(False)


def test_absmax_and_its_negative():
    x = torch.tensor([2.0, -2.0, 1.0, 0.0] * 16)
    qt = q8.quantize(x, "dynamic", 64)
    assert qt.absmax.tolist() == [2.0]
    y = q8.dequantize(qt)
    assert y[0] == 2.0  # +1.0 is in the table
    assert y[1] == pytest.approx(-2.0 * 0.992968738079071)  # -1.0 is not: nearest is -0.99297
    assert qt.codes[1] == 0


def test_all_zero_block_decodes_to_positive_zero():
    x = torch.cat([torch.zeros(64), -torch.zeros(64), torch.randn(64)])
    for name in NAMES:
        y = q8.dequantize(q8.quantize(x.abs() if name.startswith("u") else x, name, 64))
        assert (y[:128] == 0).all() and not torch.signbit(y[:128]).any()
        assert not torch.isnan(y).any()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises_naming_the_block(bad):
    x = torch.randn(1000)
    x[700] = bad
    with pytest.raises(ValueError, match=r"NaN or inf in block 2 \(flat elements 512\.\.767\)"):
        q8.quantize(x, "dynamic", 256)


def test_non_finite_input_on_several_threads_names_the_first_bad_block():
    x = torch.randn(1 << 20)  # split across threads: each range reports its own first bad block
    x[-1] = math.nan
    x[256 * 100 + 5] = math.inf
    with pytest.raises(ValueError, match=r"NaN or inf in block 100 "):
        q8.quantize(x, "dynamic", 256)


@pytest.mark.parametrize("blocksize", [0, 32, 100, 8192, 2048.0, True, "256"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        q8.quantize(torch.randn(10), blocksize=blocksize)


def test_bad_input_types():
    with pytest.raises(TypeError, match="float32"):
        q8.quantize(torch.arange(10))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        q8.quantize([1.0, 2.0])
    with pytest.raises(TypeError, match="QTensor"):
        q8.dequantize(torch.zeros(3))


@pytest.mark.parametrize(
    "x",
    [
        torch.empty(0),
        torch.empty(3, 0, 5),
        torch.tensor(3.5),
        torch.randn(7, 9).t(),  # non-contiguous
        torch.randn(5, 300)[:, ::3],  # strided
        torch.randn(2049),  # partial last block
    ],
    ids=["empty", "empty3d", "0d", "transposed", "strided", "partial"],
)
def test_shapes_round_trip(x):
    qt = q8.quantize(x, "dynamic", 2048)
    y = q8.dequantize(qt)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert qt.absmax.numel() == -(-x.numel() // 2048)
    if x.numel():
        assert q8.quant_error(x, y).rel_l2 < 0.02
    assert_exact(x, "dynamic", 2048)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_encode_their_fp32_value(dtype):
    x = torch.randn(1000).to(dtype)
    qt = q8.quantize(x, "dynamic", 256)
    assert torch.equal(qt.codes, q8.quantize(x.float(), "dynamic", 256).codes)
    y = qt.dequantize()
    assert y.dtype == dtype
    assert torch.equal(y, q8.dequantize(qt, torch.float32).to(dtype))


def test_decode_rule_is_table_times_absmax():
    x = torch.randn(5000)
    qt = q8.quantize(x, "linear", 512)
    expected = qt.code.values[qt.codes.long()] * qt.absmax.repeat_interleave(512)[:5000]
    assert torch.equal(q8.dequantize(qt), expected)


def test_multithreaded_encode_matches_reference():
    n = (1 << 20) + 333  # large enough to be split across threads
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))
    qt = q8.quantize(x, "dynamic", 256)
    head = (n - (1 << 14)) // 256 * 256  # the last thread's tail, incl. the partial block
    ref, ref_absmax = brute_force_codes(x[head:], q8.dynamic_code(), 256)
    assert torch.equal(qt.codes[head:], ref)
    assert torch.equal(qt.absmax[head // 256 :], ref_absmax)
    torch.set_num_threads(1)
    try:
        single = q8.quantize(x, "dynamic", 256)
    finally:
        torch.set_num_threads(2)
    assert torch.equal(single.codes, qt.codes) and torch.equal(single.absmax, qt.absmax)


def test_auto_picks_lowest_error_deterministically():
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(64, 256, generator=g) * 2 - 1  # uniform: linear wins
    outliers = torch.randn(64, 256, generator=g) * torch.exp(3 * torch.randn(64, 256, generator=g))  # dynamic wins
    for x, winner in ((weights, "linear"), (outliers, "dynamic"), (weights.abs(), "ulinear")):
        qt = q8.quantize(x, "auto", 256)
        errors = {name: q8.quant_error(x, q8.quantize(x, name, 256)).rel_l2 for name in AUTO_CODES[bool((x < 0).any())]}
        assert qt.code.name == min(errors, key=errors.get) == winner
        assert torch.equal(q8.quantize(x, "auto", 256).codes, qt.codes)


def test_quantize_best_returns_the_winner_and_its_error():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 256, generator=g) * torch.exp(3 * torch.randn(64, 256, generator=g))
    qt, err = q8.codec.quantize_best(x, ("linear", "dynamic"), 256)
    errors = {name: q8.quant_error(x, q8.quantize(x, name, 256)) for name in ("linear", "dynamic")}
    assert qt.code.name == "dynamic" and err == errors["dynamic"] < errors["linear"]
    assert torch.equal(qt.codes, q8.quantize(x, "auto", 256).codes)
    with pytest.raises(ValueError, match="no candidate"):
        q8.codec.quantize_best(x, (), 256)


def test_quant_error_is_chunked_fp64():
    """Over several chunks (and a partial one) the error equals the whole-tensor fp64 result,
    for values whose squares overflow fp32 and differences whose squares underflow it."""
    g = torch.Generator().manual_seed(3)
    for scale in (1e30, 1.0, 1e-30):
        x = torch.randn(3 * (1 << 20) + 777, generator=g) * scale
        for approx in (q8.quantize(x, "dynamic", 256), x * (1 + 1e-6 * torch.randn(x.shape, generator=g))):
            y = approx.dequantize(torch.float32) if isinstance(approx, q8.QTensor) else approx
            diff = x.double() - y.double()
            expected = float(diff.norm() / x.double().norm())
            err = q8.quant_error(x, approx)
            assert err.rel_l2 == pytest.approx(expected, rel=1e-9) and 0 < err.rel_l2 < 0.02
            assert err.max_abs == float(diff.abs().max())


def test_quant_error_of_a_qtensor_is_against_its_fp32_decoding():
    """The compiled per-block pass (CPU QTensors, flat or in rows) gives the error of the
    fp32 decoding, for half inputs too, and agrees with measuring the decoded tensor."""
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(3, 1000, generator=g) * 0.02).to(dtype)
        for qt in (q8.quantize(x, "linear", 128), q8.quantize(x, "dynamic", 64, row_length=1000)):
            got, ref = q8.quant_error(x, qt), q8.quant_error(x.float(), qt.dequantize(torch.float32))
            assert got.rel_l2 == pytest.approx(ref.rel_l2, rel=1e-12) and got.max_abs == ref.max_abs


def test_quant_error_measures():
    x = torch.tensor([3.0, 4.0])
    err = q8.quant_error(x, torch.tensor([3.0, 4.5]))
    assert err.rel_l2 == pytest.approx(0.1) and err.max_abs == 0.5
    assert err.snr_db == pytest.approx(20.0)
    assert q8.quant_error(x, x).snr_db == math.inf
    assert q8.quant_error(torch.zeros(0), torch.zeros(0)).rel_l2 == 0.0


def test_quantile_code_uses_every_code_about_equally():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100_000, generator=g) ** 3
    code = q8.quantile_code(x, blocksize=256)
    assert (code.values[1:] > code.values[:-1]).all() and (code.values == 0).any()
    usage = torch.bincount(q8.quantize(x, code, 256).codes.long(), minlength=256) / x.numel()
    assert usage.max() < 2 / 256  # a linear code puts ~90/256 of this data in one code
    assert_exact(x[:5000], code, 256)
    constant = q8.quantile_code(torch.ones(1000))  # repeated quantiles are spread apart
    assert (constant.values[1:] > constant.values[:-1]).all()


def test_qtensor_validates_its_parts():
    qt = q8.quantize(torch.randn(300), blocksize=64)
    with pytest.raises(ValueError, match="absmax"):
        q8.QTensor(qt.codes, qt.absmax[:-1], qt.code, 64, qt.shape, qt.dtype)
    with pytest.raises(ValueError, match="codes"):
        q8.QTensor(qt.codes.float(), qt.absmax, qt.code, 64, qt.shape, qt.dtype)
    assert qt.nbytes == 300 + 4 * 5
    assert "QTensor(shape=(300,)" in repr(qt)


# --- stochastic rounding (optimizer state) --------------------------------------------------


def lowbias32(x: int) -> int:
    """The hash of the spec, written out on Python ints."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_squared_dynamic_table_is_udynamic_squared():
    sq, u = get_code("udynamic_sq"), get_code("udynamic")
    assert torch.equal(sq.values, (u.values.double() ** 2).float()) and sq.zero_index == 0
    assert 1e-13 < sq.values[1] < 1.1e-13  # the smallest positive entry: (3.25e-7)^2


def test_stochastic_rounding_follows_the_spec():
    """quantize_stochastic (compiled CPU path) against the rule of docs/CODEC.md evaluated
    element by element in numpy float32 with the hash on Python ints, and the torch-ops
    path (what CUDA tensors take) against it."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(700, generator=g) ** 6
    x[::50] = 0.0
    x[7] = 1e-20  # below the first positive entry: never rounds to 0.0
    code, blocksize, key, offset = get_code("udynamic_sq"), 256, rounding_key(12, 34), 2**32 - 300
    qt = quantize_stochastic(x, code, blocksize, key, offset)
    values = code.values.numpy()
    for i, xi in enumerate(x.numpy()):
        absmax = np.float32(np.abs(x.numpy()[i // blocksize * blocksize :][:blocksize]).max())
        q = np.float32(xi) / absmax
        f = int(np.searchsorted(values, q, side="right")) - 1
        if f < 255:
            frac = np.float32(q - values[f]) / np.float32(values[f + 1] - values[f])
            index = offset + i
            u = lowbias32(lowbias32((index & 0xFFFFFFFF) ^ key) ^ (index >> 32))
            f += bool(np.float32(u >> 8) * np.float32(2.0**-24) < frac)
        if f == 0 and xi > 0:
            f = 1
        assert qt.codes[i] == f, i
    assert int(mix32(torch.tensor([123456789]))[0]) == mix32(123456789) == lowbias32(123456789)
    codes, absmax, bad = _encode_stochastic_torch(x, code, blocksize, x.numel(), key, offset)  # CUDA's ops
    assert bad == -1 and torch.equal(codes, qt.codes) and torch.equal(absmax, qt.absmax)


def test_stochastic_rounding_is_unbiased_and_keeps_positive_values_positive():
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0)) ** 8  # eight decades
    decoded = [quantize_stochastic(x, "udynamic_sq", 256, rounding_key(seed, 1)).dequantize() for seed in range(300)]
    mean = torch.stack(decoded).mean(0)
    nearest = q8.quantize(x, "udynamic_sq", 256).dequantize()
    assert ((mean - x).abs() / x).median() < 0.005 < ((nearest - x).abs() / x).median()
    assert all(bool((d > 0).all()) for d in decoded)


def test_stochastic_rounding_keys_on_the_global_index():
    """A shard encoded with its offset gets the bytes of the same elements in the whole
    tensor (blocks aligned), whatever the sharding; another key or step gives other bytes."""
    x = torch.rand(4096, generator=torch.Generator().manual_seed(1)) ** 4
    key = rounding_key(5, 7)
    whole = quantize_stochastic(x, "udynamic_sq", 256, key)
    for start in (0, 1024, 3072):
        part = quantize_stochastic(x[start : start + 1024], "udynamic_sq", 256, key, offset=start)
        assert torch.equal(part.codes, whole.codes[start : start + 1024])
    again = quantize_stochastic(x, "udynamic_sq", 256, key)
    assert torch.equal(again.codes, whole.codes)
    for other in (rounding_key(5, 8), rounding_key(6, 7)):
        assert not torch.equal(quantize_stochastic(x, "udynamic_sq", 256, other).codes, whole.codes)


def test_stochastic_rounding_in_the_row_layout():
    """Rows of 100 with blocks of 64 (rows cut blocks): each row rounds as that row alone
    numbered from its global start, on the compiled path and in torch ops alike."""
    x = torch.rand(6, 100, generator=torch.Generator().manual_seed(2)) ** 4
    key = rounding_key(1, 2)
    qt = quantize_stochastic(x, "udynamic_sq", 64, key, offset=1000, row_length=100)
    assert qt.row_length == 100 and qt.absmax.numel() == 12
    rows = [quantize_stochastic(r, "udynamic_sq", 64, key, offset=1000 + 100 * i) for i, r in enumerate(x)]
    assert torch.equal(qt.codes, torch.cat([r.codes for r in rows]))
    assert torch.equal(qt.absmax, torch.cat([r.absmax for r in rows]))
    codes, absmax, _ = _encode_stochastic_torch(x.reshape(-1), get_code("udynamic_sq"), 64, 100, key, 1000)
    assert torch.equal(codes, qt.codes) and torch.equal(absmax, qt.absmax)


# -- the row layout (docs/CODEC.md "Block layout") ---------------------------------------------


@pytest.mark.parametrize(
    "shape,blocksize",
    [((7, 100), 64), ((3, 5, 40), 64), ((4, 1000), 256), ((9, 17), 64), ((2, 4100), 4096), ((0, 100), 64)],
)
def test_row_layout_is_every_row_quantized_on_its_own(shape, blocksize):
    """Blocks never cross a row: the codes and absmax of the whole tensor are those of each
    row quantized alone (flat), concatenated, and every code is the exact nearest."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))
    row = math.prod(shape[1:])
    qt = q8.quantize(x, "dynamic", blocksize, row_length=row)
    assert qt.row_length == (row if x.numel() else 0)  # an empty tensor has no blocks to cut
    assert qt.absmax.numel() == shape[0] * -(-row // blocksize)
    rows = [q8.quantize(r, "dynamic", blocksize) for r in x.reshape(shape[0], row)]
    assert torch.equal(qt.codes, torch.cat([r.codes for r in rows] + [torch.empty(0, dtype=torch.uint8)]))
    assert torch.equal(qt.absmax, torch.cat([r.absmax for r in rows] + [torch.empty(0)]))
    for r, ref in zip(x.reshape(shape[0], row), rows, strict=True):
        ref_codes, ref_absmax = brute_force_codes(r, get_code("dynamic"), blocksize)
        assert torch.equal(ref.codes, ref_codes) and torch.equal(ref.absmax, ref_absmax)
    y = qt.dequantize()
    assert y.shape == x.shape
    assert torch.equal(y.reshape(-1), torch.cat([r.dequantize() for r in rows] + [torch.empty(0)]))


def test_row_layout_equal_to_flat_is_normalised():
    """Rows of whole blocks, or a single row, are the flat layout: row_length becomes numel."""
    x = torch.randn(6, 128)
    for row_length in (128, 768):
        qt = q8.quantize(x, "dynamic", 64, row_length=row_length)
        flat = q8.quantize(x, "dynamic", 64)
        assert qt.row_length == flat.row_length == x.numel()
        assert torch.equal(qt.codes, flat.codes) and torch.equal(qt.absmax, flat.absmax)
    assert q8.quantize(x, "dynamic", 256, row_length=128).row_length == 128  # half a block per row


def test_row_layout_errors_name_the_argument_and_the_block():
    with pytest.raises(ValueError, match="row_length must be a positive int dividing the 600 elements"):
        q8.quantize(torch.randn(6, 100), row_length=7)
    with pytest.raises(ValueError, match="row_length must be an int"):
        q8.quantize(torch.randn(6, 100), row_length=100.0)
    qt = q8.quantize(torch.randn(6, 100), "dynamic", 64, row_length=100)
    with pytest.raises(ValueError, match=r"10 absmax values, expected 12 blocks of 64 in rows of 100"):
        q8.QTensor(qt.codes, qt.absmax[:10], qt.code, 64, qt.shape, qt.dtype, 100)
    assert "row_length=100" in repr(qt)
    x = torch.randn(6, 100)
    x[2, 70] = math.nan  # row 2, its second block: block 5, elements 264..299
    with pytest.raises(ValueError, match=r"NaN or inf in block 5 \(flat elements 264\.\.299\)"):
        q8.quantize(x, "dynamic", 64, row_length=100)


def test_row_layout_quant_error_and_auto():
    """quant_error decodes a row-layout QTensor chunk by chunk (whole rows): the same as decoding
    it at once; code="auto" keeps the row layout."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 700, generator=g)  # 2.1M elements: three chunks
    qt = q8.quantize(x, "auto", 256, row_length=700)
    assert qt.row_length == 700 and qt.code.name in ("dynamic", "linear")
    diff = x.double() - qt.dequantize().double()
    assert q8.quant_error(x, qt).rel_l2 == pytest.approx(float(diff.norm() / x.double().norm()), rel=1e-9)
