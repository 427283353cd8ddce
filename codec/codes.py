"""Code tables: the 256 sorted fp32 values an 8-bit code stands for.

A `Code` is immutable and validated on construction. Every table is strictly increasing,
finite and contains 0.0 exactly, so an all-zero block always decodes to +0.0. The
encoding rule (exact nearest entry, ties to the lower entry) is expressed through the
255 fp32 `thresholds` derived here once per table; see docs/CODEC.md.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from fractions import Fraction

import torch

__all__ = [
    "CODE_NAMES",
    "Code",
    "dynamic_code",
    "get_code",
    "linear_code",
    "quantile_code",
]

CODE_SIZE = 256


class Code:
    """A named 256-entry fp32 code table, sorted and strictly increasing.

    Args:
        name: identifier stored in files ("dynamic", "udynamic", "udynamic_sq", "linear",
            "ulinear", "quantile" or any user name).
        values: 256 finite values, strictly increasing, containing 0.0.

    Example:
        >>> code = q8.Code("tiny", torch.linspace(-1, 1, 255).tolist() + [2.0])  # doctest: +SKIP
    """

    __slots__ = ("_buckets", "_hash", "_thresholds", "_trees", "name", "signed", "values", "zero_index")

    def __init__(self, name: str, values: torch.Tensor | list[float]) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"code name must be a non-empty str, got {name!r}")
        table = torch.as_tensor(values, dtype=torch.float32).detach().to("cpu").flatten().clone()
        if table.numel() != CODE_SIZE:
            raise ValueError(f"code {name!r}: needs {CODE_SIZE} values, got {table.numel()}")
        if not bool(torch.isfinite(table).all()):
            raise ValueError(f"code {name!r}: values must be finite")
        if not bool((table[1:] > table[:-1]).all()):
            raise ValueError(f"code {name!r}: values must be strictly increasing")
        if not bool((table == 0).any()):
            raise ValueError(f"code {name!r}: values must contain 0.0 (all-zero blocks decode to it)")
        self.name = name
        self.values = table
        self.zero_index = int(torch.nonzero(table == 0)[0, 0])  # the code of an all-zero block
        self.signed = bool(table[0] < 0)  # whether the table has negative entries
        self._hash = hash((name, tuple(table.tolist())))
        self._thresholds: torch.Tensor | None = None
        self._trees: torch.Tensor | None = None
        self._buckets: tuple[torch.Tensor | None, torch.Tensor | None] | None = None

    @property
    def thresholds(self) -> torch.Tensor:
        """255 fp32 decision thresholds: code(q) = number of thresholds t with t <= q.

        threshold[i] is the smallest fp32 strictly above the exact midpoint of
        values[i] and values[i+1], so a tie goes to the lower entry.
        """
        if self._thresholds is None:
            self._thresholds = _thresholds(self.values)
        return self._thresholds

    @property
    def search_trees(self) -> torch.Tensor:
        """fp32 [2, 256]: the thresholds (row 0) and values[1..255] (row 1) as search trees
        (`search_tree`, padded with +inf): descending the first gives the nearest code, the
        second the entry below q of the stochastic rule (codec/q8_codec.h)."""
        if self._trees is None:
            pad = torch.tensor([math.inf])
            keys = (self.thresholds, self.values[1:])
            self._trees = torch.stack([torch.cat([search_tree(k), pad]) for k in keys])
        return self._trees

    @property
    def bucket_tables(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`bucket_table` of the thresholds and of values[1..255] (the keys of the two search
        trees): the same counts with one table look-up and one comparison (codec/q8_codec.h).
        None where the table has no small bucket table (the trees are used then)."""
        if self._buckets is None:
            self._buckets = (bucket_table(self.thresholds), bucket_table(self.values[1:]))
        return self._buckets

    def __eq__(self, other: object) -> bool:
        if self is other:  # the usual case (get_code's tables): no comparison of values
            return True
        return isinstance(other, Code) and self.name == other.name and torch.equal(self.values, other.values)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Code({self.name!r}, [{self.values[0]:.6g} .. {self.values[-1]:.6g}])"


def search_tree(keys: torch.Tensor) -> torch.Tensor:
    """255 sorted keys in breadth-first order of a perfect binary search tree: level k
    (k = 0..7) holds sorted indices (2j + 1) * 2**(7 - k) - 1, j = 0..2**k - 1. Node i has
    children 2i + 1 and 2i + 2; after eight steps j -> 2j + (key <= q) from the root, j is
    the number of keys <= q."""
    order = torch.cat([(2 * torch.arange(1 << k) + 1) * (1 << (7 - k)) - 1 for k in range(8)])
    return keys[order]


BUCKET_ENTRIES = 4096
"""Largest bucket table (int32 entries, 16 KiB): it must stay in the L1 cache."""


def bucket_table(keys: torch.Tensor) -> torch.Tensor | None:
    """int32: a table giving #{keys <= q} for any fp32 q in [-1, 1] with ONE comparison.

    A bucket is a range of |q|'s bit patterns u sharing u >> shift (the exponent and the top
    23 - shift mantissa bits), numbered from base = (min |key| bits - 1) >> shift up to the
    bucket of 1.0 (n buckets); u is clamped into that range (no key lies below it). The
    shift is the largest that leaves at most one key per bucket and sign, so that within a
    bucket the count is the entry's count of the keys below plus one comparison with the
    bit remainder r = u & mask (mask = 2**shift - 1) of the bucket's key:

        entry = count << 24 | rk,  #{keys <= q} = count + (r' >= rk)

    with r' = r for q >= +0 (rk the key's remainder) and r' = mask - r for q < 0 (rk = mask -
    the key's remainder: a larger |q| passes fewer negative keys); rk = mask + 1 when the
    bucket holds no key. Layout: [shift, base, n, halves, entries of q >= 0 ..., entries of
    q < 0 ...]; halves = 1 when no key is negative (a negative q then counts as +0).

    None when no shift gives at most BUCKET_ENTRIES entries, or a key is +-0 (the trees are
    used then). Every entry is checked against a binary search of its bucket's ends."""
    k = keys.to(torch.float32).contiguous()
    bits = k.view(torch.int32).long()
    u = bits & 0x7FFFFFFF
    if k.numel() == 0 or bool((u == 0).any()):
        return None
    negative = bits < 0
    halves = 2 if bool(negative.any()) else 1
    top = 0x3F800000  # 1.0
    for shift in range(23, -1, -1):
        base = (int(u.min()) - 1) >> shift
        n = (top >> shift) - base + 1
        if n * halves > BUCKET_ENTRIES:
            return None
        bucket = (u >> shift) - base
        inside = bucket < n
        if all(
            torch.unique(bucket[inside & (negative == neg)]).numel() == int((inside & (negative == neg)).sum())
            for neg in (False, True)
        ):
            break
    mask = (1 << shift) - 1
    first = (torch.arange(n, dtype=torch.int64) + base) << shift  # lowest u of each bucket
    last = first + mask
    as_float = lambda b: b.to(torch.int32).view(torch.float32)  # noqa: E731
    sorted_keys = k.sort().values
    counts = [torch.searchsorted(sorted_keys, as_float(first), right=False)]  # q >= 0: keys < the bucket
    remainders = [torch.full((n,), mask + 1, dtype=torch.int64)]
    if halves == 2:
        counts.append(torch.searchsorted(sorted_keys, -as_float(last), right=False))  # q < 0: keys below -|q|
        remainders.append(remainders[0].clone())
    for neg in range(halves):
        own = inside & (negative == bool(neg))
        r = u[own] & mask
        remainders[neg][bucket[own]] = mask - r if neg else r
    entries = torch.cat([(c << 24) | r for c, r in zip(counts, remainders, strict=True)])
    table = torch.cat([torch.tensor([shift, base, n, halves]), entries]).to(torch.int32)
    _check_buckets(table, sorted_keys)
    return table


def _check_buckets(table: torch.Tensor, sorted_keys: torch.Tensor) -> None:
    """The table's count at both ends of every bucket (and next to each key) equals a binary search."""
    shift, base, n, halves = table[:4].tolist()
    u = ((torch.arange(n, dtype=torch.int64) + base) << shift).repeat_interleave(2)
    u[1::2] += (1 << shift) - 1
    key_u = sorted_keys.view(torch.int32).long() & 0x7FFFFFFF
    u = torch.cat([u, key_u, key_u - 1, key_u + 1]).clamp(0, 0x3F800000)
    q = u.to(torch.int32).view(torch.float32)
    q = torch.cat([q, -q] if halves == 2 else [q])
    want = torch.searchsorted(sorted_keys, q, right=True)
    got = bucket_counts(table, q)
    if not torch.equal(got, want):
        raise AssertionError(f"bucket table disagrees with the keys at q = {q[got != want][:4].tolist()}")


def bucket_counts(table: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """#{keys <= q} for fp32 q in [-1, 1] through a `bucket_table` (the rule of the C look-up)."""
    shift, base, n, halves = table[:4].tolist()
    mask = (1 << shift) - 1
    bits = q.to(torch.float32).contiguous().view(torch.int32).long()
    negative = (bits < 0) & (halves == 2)
    u = torch.where((bits < 0) & (halves == 1), 0, bits & 0x7FFFFFFF)
    u = u.clamp(base << shift, ((base + n - 1) << shift) | mask)
    index = (u >> shift) - base + torch.where(negative, n, 0)
    r = torch.where(negative, mask - (u & mask), u & mask)
    entry = table[4:].long()[index] & 0xFFFFFFFF
    return (entry >> 24) + (r >= (entry & 0xFFFFFF)).long()


def _thresholds(values: torch.Tensor) -> torch.Tensor:
    out = []
    v = values.tolist()  # fp32 -> Python float is exact
    for lo, hi in itertools.pairwise(v):
        mid = (Fraction(lo) + Fraction(hi)) / 2  # exact
        t = torch.tensor(float(mid), dtype=torch.float32)
        while Fraction(t.item()) <= mid:
            t = torch.nextafter(t, _INF)
        while Fraction(torch.nextafter(t, -_INF).item()) > mid:
            t = torch.nextafter(t, -_INF)
        out.append(t)
    return torch.stack(out)


_INF = torch.tensor(math.inf)


def dynamic_code(signed: bool = True) -> Code:
    """The dynamic (tree) code of Dettmers et al., bit-identical to bitsandbytes'.

    For decade i = 0..6 with scale 10**(i-6) it takes k evenly spaced bucket midpoints of
    linspace(0.1, 1, k+1) in fp32 (k = 2**i signed, with negatives; 2**(i+1) unsigned),
    then adds 0 and 1.0. Signed: 127 negatives, 0, 128 positives (no -1.0).
    """
    return _named("dynamic" if signed else "udynamic")


def linear_code(signed: bool = True, levels: int | None = None) -> Code:
    """Evenly spaced code. Signed: k/127 for k = -128..127 (0 and +-1 exact); unsigned:
    k/255 for k = 0..255.

    `levels` (at most 127 signed, 255 unsigned) makes a coarser table, k/levels for the
    same k, named "linear-<levels>" ("ulinear-<levels>"): a block uses only the entries in
    [-1, 1], so its step is absmax/levels. Fewer levels mean a larger error and codes that
    entropy-code smaller; q8convert's target search picks among them.
    """
    name = "linear" if signed else "ulinear"
    return _named(name if levels is None else f"{name}-{levels}")


@functools.cache
def _named(name: str) -> Code:
    if name in ("dynamic", "udynamic"):
        signed = name == "dynamic"
        parts = [torch.tensor([0.0, 1.0])]
        for i in range(7):
            k = 2**i if signed else 2 ** (i + 1)
            edges = torch.linspace(0.1, 1.0, k + 1, dtype=torch.float32)
            means = (edges[:-1] + edges[1:]) / 2.0
            scaled = means * torch.tensor(10.0 ** (i - 6), dtype=torch.float32)
            parts.append(scaled)
            if signed:
                parts.append(-scaled)
        return Code(name, torch.cat(parts).sort().values)
    if name == "udynamic_sq":
        # udynamic squared (binary64 squares rounded to binary32), the table of second
        # moments: storing v with it is storing sqrt(v) with udynamic, half the dynamic
        # range in decades, so a v 1e-7 below its block's largest lands on a fine step, not 0.
        return Code(name, _named("udynamic").values.double().square().float())
    linear = re.fullmatch(r"(u?)linear(?:-([1-9][0-9]{0,2}))?", name)
    top = 255 if linear and linear[1] else 127
    if linear and int(linear[2] or top) <= top:
        first = 0 if linear[1] else -128
        return Code(name, torch.arange(first, first + 256, dtype=torch.float64) / int(linear[2] or top))
    raise ValueError(
        f"unknown code name {name!r}; expected one of {CODE_NAMES}, or linear-N / ulinear-N "
        "(N levels, at most 127 / 255)"
    )


CODE_NAMES = ("dynamic", "udynamic", "udynamic_sq", "linear", "ulinear")


def get_code(code: str | Code) -> Code:
    """Return `code` itself or the built-in table with that name."""
    if isinstance(code, Code):
        return code
    if not isinstance(code, str):
        raise TypeError(f"code must be a str or q8.Code, got {type(code).__name__}")
    return _named(code)


def quantile_code(x: torch.Tensor, blocksize: int = 2048, name: str = "quantile") -> Code:
    """A code fitted to `x`: 255 quantiles of its block-normalised values, plus 0.0.

    Duplicate quantiles (heavily repeated values) are spread to the nearest free fp32
    neighbours so the table stays strictly increasing. Deterministic for a given `x`.
    """
    from .blockwise import _check_blocksize, _flat_blocks

    _check_blocksize(blocksize)
    blocks, _ = _flat_blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    q = torch.where(absmax > 0, blocks / torch.where(absmax > 0, absmax, 1), 0.0).flatten()
    if q.numel() == 0:
        q = torch.zeros(1)
    probs = torch.linspace(0, 1, CODE_SIZE - 1, dtype=torch.float64)
    sample = q.double()
    if sample.numel() > 1 << 24:  # torch.quantile's input limit; a strided sample suffices
        sample = sample[:: sample.numel() // (1 << 24) + 1]
    qs = torch.quantile(sample, probs).float()
    values = torch.cat([qs, torch.zeros(1)]).sort().values
    return Code(name, _strictly_increasing(values))


def _strictly_increasing(values: torch.Tensor) -> torch.Tensor:
    """Nudge repeated entries apart by whole fp32 steps, keeping 0.0 in place."""
    out = values.clone()
    zero = int(torch.nonzero(out == 0)[0, 0])
    for i in range(zero + 1, out.numel()):  # above zero: push up
        if out[i] <= out[i - 1]:
            out[i] = torch.nextafter(out[i - 1], _INF)
    for i in range(zero - 1, -1, -1):  # below zero: push down
        if out[i] >= out[i + 1]:
            out[i] = torch.nextafter(out[i + 1], -_INF)
    return out
