"""`make demo` runs end to end and every section shows what it claims."""

import os
import re
import subprocess
import sys


def test_demo_runs_every_section():
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.run([sys.executable, "-m", "q8.tools.demo"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    sections = [line for line in out.splitlines() if line.startswith("== ")]
    assert len(sections) == 9, sections
    assert "Traceback" not in out and "skipped" not in out
    assert out.count("identical to the uninterrupted run: True") == 4, out
    assert "restored: config.json, generation_config.json, model.safetensors, optimizer.pt" in out  # the round trip
    assert "refuses it: loaded state dict has a different number of parameter groups" in out
    fused = re.findall(r"^(\w+8bit) +[\d.]+ +[\d.]+ +(True|False)$", out, re.MULTILINE)
    assert fused == [(name, "True") for name in ("Adam8bit", "AdamW8bit", "SGD8bit", "Lion8bit", "RMSprop8bit",
                                                 "Adagrad8bit", "LAMB8bit", "LARS8bit")], out  # fmt: skip
    assert "load_model kept it: True" in out and "as safetensors does" in out
    steps = re.search(r"largest step of any weight: torch ([\d.]+) lr, q8 ([\d.]+) lr .* ([\d.]+) lr at step 8", out)
    assert steps and float(steps[2]) <= float(steps[3]), out
    assert ": OK" in out  # q8convert verify
    assert "--model-error auto (default)" in out and "--target-error 0.02" in out  # q8convert: the trade-off
    assert "drew each tensor's bits per element" in out  # q8convert's trade-off
    assert "fails loudly" in out  # a plain Trainer refuses the q8 checkpoint
    assert "q8 never unpickles" in out and "the pickle's code ran: False" in out
    assert "one flipped bit: FormatError" in out and "removed it: []" in out
    assert "the file holds the state of the call: True" in out
    assert float(re.search(r"peak memory ([0-9.]+)x the tensors", out).group(1)) <= 1.15
    assert "optimizer.q8 identical to the synchronous run's: True" in out
