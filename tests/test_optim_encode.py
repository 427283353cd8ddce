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
