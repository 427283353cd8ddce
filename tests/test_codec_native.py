"""The compiled CPU codec's fast paths (codec/q8_codec.h, codec/_native.c) beyond the
built-in tables: dense custom tables and huge-page output buffers keep results exact, and
the threads they run on."""

import os
import subprocess
import sys

import pytest
import q8
import torch
from q8.codec import _native
from test_codec import assert_exact


def dense_code() -> q8.Code:
    """A table with 100 entries packed inside one LUT bucket ([0.5, 0.5 + 2**-8): the top
    16 bits of an fp32 are the same there), so the search needs many steps past the LUT."""
    cluster = 0.5 + torch.arange(100, dtype=torch.float64) * 2.0**-16
    rest = torch.linspace(-1, 0.45, 155, dtype=torch.float64)
    return q8.Code("dense", torch.cat([rest, torch.zeros(1), cluster]).sort().values)


def test_dense_custom_table_is_exact_nearest():
    code = dense_code()
    t = code.thresholds
    inf = torch.tensor(float("inf"))
    probes = torch.cat(
        [t, torch.nextafter(t, -inf), torch.nextafter(t, inf), code.values, 0.5 + torch.rand(3000) / 256]
    )
    blocks = torch.zeros(probes.numel(), 64)
    blocks[:, 0] = 1.0  # absmax 1, so q equals the probe
    blocks[:, 1] = probes.clamp(-1, 1)
    assert_exact(blocks, code, 64)


@pytest.mark.parametrize("offset", [0, 1, 4097])
def test_hugepage_advice_leaves_memory_unchanged(offset):
    buf = torch.arange(3 << 20, dtype=torch.int32)  # 12 MiB: holds whole 2 MiB pages
    before = buf.clone()
    _native.advise_hugepages(buf.data_ptr() + offset, buf.nbytes - offset)
    assert torch.equal(buf, before)


def test_large_round_trip_matches_the_thresholds():
    """A tensor large enough for huge-page outputs and several threads: every code is the
    count of thresholds <= x / absmax, every decoded value table[code] * absmax."""
    x = torch.randn(1 << 21) * torch.exp(3 * torch.randn(1 << 21))
    qt = q8.quantize(x, "dynamic", 512)
    q = (x.view(-1, 512) / qt.absmax[:, None]).reshape(-1)
    assert torch.equal(qt.codes, torch.searchsorted(qt.code.thresholds, q, right=True).to(torch.uint8))
    expected = (qt.code.values[qt.codes.long()].view(-1, 512) * qt.absmax[:, None]).reshape(-1)
    assert torch.equal(q8.dequantize(qt), expected)


DATALOADER_SCRIPT = """
import torch, q8
x = torch.randn(1 << 21)
q8.quantize(x, "dynamic", 256)  # the parent's OpenMP pool exists before the workers fork

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.equal(q8.quantize(x, "dynamic", 256).codes, expected)

expected = q8.quantize(x, "dynamic", 256).codes
print(all(torch.utils.data.DataLoader(Data(), num_workers=2, batch_size=None)))
"""


def test_forked_dataloader_workers_encode(tmp_path):
    """The CPU paths run on torch's OpenMP pool, which does not survive fork; DataLoader
    workers run on one thread (torch sets it), so q8 inside them works as torch does."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", DATALOADER_SCRIPT], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]
