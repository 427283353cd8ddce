"""`make demo` runs end to end and every section shows what it claims."""

import os
import subprocess
import sys


def test_demo_runs_every_section():
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.run([sys.executable, "-m", "q8.tools.demo"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    sections = [line for line in out.splitlines() if line.startswith("== ")]
    assert len(sections) == 8, sections
    assert "Traceback" not in out and "skipped" not in out
    assert out.count("identical to the uninterrupted run: True") == 3, out
    assert ": OK" in out  # q8convert verify
    assert "--model-error auto (default)" in out and "--target-error 0.02" in out  # q8convert: the trade-off
    assert "drew each tensor's bits per element" in out  # q8convert's trade-off
    assert "fails loudly" in out  # a plain Trainer refuses the q8 checkpoint
    assert "q8 never unpickles" in out and "the pickle's code ran: False" in out
    assert "one flipped bit: FormatError" in out and "removed it: []" in out
