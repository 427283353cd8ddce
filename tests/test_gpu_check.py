"""benchmarks/gpu_check.py, the one command that checks q8 on a GPU, has to work the first
time it meets one: its --cpu-smoke mode runs every section's code on CPU under the Triton
interpreter (tiny sizes), and without CUDA the plain command says so and exits 0."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "benchmarks/gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, SCRIPT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_the_smoke_run_goes_through_every_section():
    proc = run("--cpu-smoke")
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " failed:" not in out, out  # no section or anchor raised
    for heading in ("## Kernel tests", "## Codec", "## AdamW step", "nn.Linear(64, 64)", "## Save / load"):
        assert heading in out
    assert "| q8 AdamW8bit | bfloat16 |" in out and "| torchao AdamW8bit | float32 |" in out
    for line in (
        "target kernel tests pass on CUDA: 2 passed",
        "target codec on the GPU == CPU path, byte for byte: True -- met",
        "target q8 AdamW8bit on the GPU == CPU, byte for byte: True -- met",
        "target save / load of GPU tensors and GPU optimizer state exact: True -- met",
        "target AdamW8bit (torch.bfloat16) >= 1.0x as fast as bitsandbytes AdamW8bit: ",
    ):
        assert line in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_without_cuda_it_says_so_and_exits_0():
    proc = run()
    assert proc.returncode == 0 and "no CUDA device here" in proc.stdout
    assert "## Codec" not in proc.stdout
