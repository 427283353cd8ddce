"""q8convert streams: converting a sharded checkpoint of about 800 MB stays within
2 x the largest tensor + 300 MB of peak RSS (the bound is independent of checkpoint size;
benchmarks/convert.py checks it on a multi-GB one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import q8
import torch
from safetensors.torch import save_file

# A child's peak RSS starts at its parent's at fork (Linux keeps the high-water mark across
# exec) and pytest holds torch and transformers: q8convert is started from a small launcher.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, ru = os.wait4(proc.pid, 0)
print(status, ru.ru_maxrss * 1024)
"""


@pytest.mark.parametrize("options", [[], ["--lossless"]])
def test_peak_rss_is_bounded_by_the_largest_tensor(tmp_path, options):
    g = torch.Generator().manual_seed(0)
    largest = (8192, 4096)  # 128 MiB of fp32: an extra copy of it would cross the bound
    weight_map = {}
    for s in range(2):
        shard = {f"layers.{s}.{i}.weight": torch.randn(largest, generator=g) * 0.02 for i in range(3)}
        shard[f"layers.{s}.norm.weight"] = torch.ones(4096)
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file(shard, tmp_path / name)
        weight_map |= dict.fromkeys(shard, name)
        del shard
    total = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    script = Path(sys.executable).with_name("q8convert")
    cmd = [sys.executable, "-S", "-c", LAUNCHER, script, tmp_path / "model.safetensors.index.json"]
    cmd += ["-o", tmp_path / "model.q8", "-q", *options]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONSAFEPATH": "1"})
    status, peak = map(int, out.stdout.split())
    assert status == 0, out.stderr
    bound = 2 * 4 * largest[0] * largest[1] + 300 * 10**6
    assert total > bound  # the checkpoint does not fit in the bound: only streaming passes
    assert peak <= bound, f"peak RSS {peak / 1e6:.0f} MB > bound {bound / 1e6:.0f} MB"
    q8.verify(tmp_path / "model.q8")
    with q8.safe_open(tmp_path / "model.q8") as f:
        assert sorted(f.keys()) == sorted(weight_map)
