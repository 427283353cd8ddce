"""The fused optimizer's block encoders on chosen values: the bucket-table form (AVX-512)
against the search-tree form and the portable build, and all three against the codec's
reference (`q8.quantize`, `quantize_stochastic`): exact thresholds and keys, their fp32
neighbours, every bucket's ends, +-0, subnormals, +-absmax, every tail length of a block."""

import pytest
import torch
from q8.codec import get_code, quantize, quantize_stochastic
from q8.codec.codes import BUCKET_ENTRIES, bucket_counts, bucket_table
from q8.optim import _native
from q8.optim.fused import _bits

KEY, INDEX0 = 0x9E3779B9, (1 << 32) - 40  # an index range crossing 2^32 (the draw's high word)
LENGTHS = [*range(1, 18), 31, 32, 33, 255, 256, 4096]


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    inf = torch.tensor(float("inf"))
    return torch.cat([x, torch.nextafter(x, inf), torch.nextafter(x, -inf)])


def adversarial(code, keys: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """Values q in [-1, 1] at every decision point of the code (a block of them with absmax 1
    encodes q itself)."""
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-39, -1e-39, 1.0, -1.0, 0.5, -0.5])
    parts = [special, _neighbours(keys), _neighbours(code.values)]
    if table is not None:
        shift, base, n, _ = table[:4].tolist()
        first = (torch.arange(n, dtype=torch.int64) + base) << shift
        ends = torch.cat([first, first + (1 << shift) - 1]).clamp(max=0x3F800000).to(torch.int32).view(torch.float32)
        parts += [ends, -ends]
    parts.append(torch.rand(4000, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    q = torch.cat(parts)
    return q[(q.abs() <= 1) & ~q.isnan()]


def encode(x: torch.Tensor, code, tree: torch.Tensor, table: torch.Tensor | None, stochastic: bool):
    codes = torch.empty(x.numel(), dtype=torch.uint8)
    kind = 3 if stochastic else 2
    absmax = _native.encode_block(
        x.numpy().tobytes(),
        codes.numpy(),
        kind,
        tree.data_ptr(),
        0 if table is None else table.data_ptr(),
        code.values.data_ptr(),
        _bits(float(code.values[0])),
        code.zero_index,
        KEY,
        INDEX0,
    )
    return absmax, codes


CASES = [("dynamic", False), ("linear", False), ("udynamic_sq", True), ("udynamic", True), ("ulinear", True)]


@pytest.mark.parametrize(("name", "stochastic"), CASES)
def test_bucket_encoder_matches_the_tree_and_the_reference(name, stochastic):
    code = get_code(name)
    keys = code.values[1:] if stochastic else code.thresholds
    tree = code.search_trees[1 if stochastic else 0]
    table = code.bucket_tables[1 if stochastic else 0]
    assert table is not None, f"{name}: the built-in tables all have a bucket table"
    q = adversarial(code, keys, table)
    assert torch.equal(bucket_counts(table, q), torch.searchsorted(keys, q, right=True))
    for length in LENGTHS:
        x = q[torch.randperm(q.numel(), generator=torch.Generator().manual_seed(length))[:length]].clone()
        x[length // 2] = 1.0  # absmax 1: the quotients are the chosen values
        for chunk in x.split(length):
            if stochastic:
                ref = quantize_stochastic(chunk, code, 4096, KEY, INDEX0, row_length=length).codes
            else:
                ref = quantize(chunk, code, 4096, row_length=length).codes
            before = _native.set_simd(True)
            try:
                got = {"buckets": encode(chunk, code, tree, table, stochastic)}
                got["tree"] = encode(chunk, code, tree, None, stochastic)
                _native.set_simd(False)
                got["portable"] = encode(chunk, code, tree, table, stochastic)
            finally:
                _native.set_simd(before)
            for form, (absmax, codes) in got.items():
                assert absmax == 1.0
                assert torch.equal(codes, ref.flatten()), f"{name}, {length} elements, {form}"


def test_bucket_encoder_scales_by_absmax_and_refuses_non_finite_blocks():
    code = get_code("dynamic")
    tree, table = code.search_trees[0], code.bucket_tables[0]
    x = torch.randn(300, generator=torch.Generator().manual_seed(1)) * 1e-3
    absmax, codes = encode(x, code, tree, table, False)
    assert absmax == float(x.abs().max())
    assert torch.equal(codes, quantize(x, code, 4096, row_length=300).codes.flatten())
    zeros = encode(torch.zeros(20), code, tree, table, False)
    assert zeros[0] == 0.0 and bool((zeros[1] == code.zero_index).all())
    x[7] = float("nan")
    assert encode(x, code, tree, table, False)[0] is None


def test_bucket_table_is_none_where_one_comparison_cannot_decide():
    assert bucket_table(torch.tensor([-0.5, 0.0, 0.5])) is None  # a key at 0
    crowded = torch.cat([torch.tensor([1e-30]), torch.linspace(0.25, 1.0, 255)[1:]])  # many binades: too big
    assert bucket_table(crowded) is None
    one = torch.tensor(1.0)
    below = torch.nextafter(one, torch.tensor(0.0))
    keys = torch.stack([torch.nextafter(below, torch.tensor(0.0)), below])  # neighbours: one-ulp buckets
    table = bucket_table(keys)
    assert table is not None and table[0] == 0 and table.numel() - 4 <= BUCKET_ENTRIES
    q = _neighbours(torch.cat([keys, one[None], -keys]))
    assert torch.equal(bucket_counts(table, q), torch.searchsorted(keys, q, right=True))


def _quotients(x: torch.Tensor, m: float) -> torch.Tensor:
    out = torch.empty_like(x)
    _native.quotients(x.numpy().tobytes(), out.numpy(), m)
    return out


@pytest.mark.skipif(not _native.AVX512, reason="the binary64 quotient is the AVX-512 encoders'")
def test_encoder_quotients_are_the_division_bit_for_bit():
    """x / absmax without the divider (codec/q8_codec.h::q8_quotient16) on values whose exact
    quotients lie next to rounding midpoints, on subnormal quotients (where it divides) and on
    random fp32 over every exponent, for absmax of every size."""
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 0x7F800000, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    randoms = bits.view(torch.float32)
    ms = [6.0, 3.0, 0.7372, 1.0 / 3.0, 1e-30, 3e-38, 1.5e-40, 7.1e25, float(torch.finfo(torch.float32).max)]
    ms += (torch.rand(40, generator=g, dtype=torch.float64) * 60 - 30).exp2().float().tolist()
    for m in ms:
        mt = torch.tensor(m, dtype=torch.float32)
        # x = m * (a binary32 midpoint), rounded, and its neighbours: quotients next to midpoints
        mids = (torch.rand(3000, generator=g) * 2 - 1).double()
        mids = mids + torch.sign(mids) * mids.abs() * 2.0**-24
        near = _neighbours((mids * mt.double()).float())
        tiny = torch.tensor([3 * 2.0**-149, 2.0**-149, 5 * 2.0**-149, 2.0**-126, 2.0**-127, 1e-42]) * (m / 6.0)
        x = torch.cat([near, -near, randoms[randoms.abs() <= mt], -randoms[randoms.abs() <= mt], tiny, -tiny, mt[None]])
        x = x[x.isfinite() & (x.abs() <= mt)]
        got, want = _quotients(x, m), x / mt
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"absmax {m!r}"
    # subnormal ties: T M 2^-149 / (2 M) = T 2^-150 exactly, halfway between two subnormals
    # (to even); for M = 49 and these T the binary64 product x * RN64(1 / m) misses the tie
    # and would round the other way
    for big in (5, 49, 51):
        ties = torch.tensor([t * big * 2.0**-149 for t in (1, 3, 7, 15)])
        assert torch.equal(_quotients(ties, 2.0 * big), ties / torch.tensor(2.0 * big)), big
