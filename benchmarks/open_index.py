"""Opening cost: time and peak memory of opening a file with many tensors, q8 vs safetensors.

Files (built here): 100,000 small fp32 tensors named like a model's (`model.layers.N...`),
as q8 and as safetensors; and a hostile q8 index of 1,000,000 empty tensor records (the
shape of the attack in issue 11: a 63-byte record each, all legal), which safetensors has
no equivalent of. Each open runs in a fresh process: time of `safe_open` (q8) /
`safe_open` + `keys()` (safetensors parses its JSON header on open), and the memory it
added, from VmHWM after resetting it (`/proc/self/clear_refs`), median of REPEATS.

Run: PYTHONSAFEPATH=1 .venv/bin/python benchmarks/open_index.py
(to measure another q8, put its package first on PYTHONPATH: the children inherit it).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPEATS = 3
TENSORS = 100_000
HOSTILE_RECORDS = 1_000_000


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def child(kind: str, path: str) -> None:
    """Open `path` once in this fresh process; print seconds and the peak memory added."""
    import q8
    import safetensors

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    base = _hwm_kib()
    t = time.perf_counter()
    if kind == "q8":
        f = q8.safe_open(path)
        n = len(f.keys())
    else:
        f = safetensors.safe_open(path, "pt")
        n = len(f.keys())
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "peak_mib": (_hwm_kib() - base) / 1024, "tensors": n}))


def measure(kind: str, path: Path) -> dict:
    runs = []
    for _ in range(REPEATS):
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout))
    return {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_mib", "tensors")}


def main() -> None:
    import q8
    import safetensors.torch
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from hostile import many_records

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tensors = {f"model.layers.{i // 10}.mlp.w{i % 10}": torch.zeros(4) for i in range(TENSORS)}
        with q8.Writer(d / "many.q8") as w:
            for name, x in tensors.items():
                w.add(name, x)
        safetensors.torch.save_file(tensors, d / "many.safetensors")
        (d / "hostile.q8").write_bytes(many_records(HOSTILE_RECORDS))
        cases = [
            (f"{TENSORS:,} tensors", "q8", d / "many.q8"),
            (f"{TENSORS:,} tensors", "safetensors", d / "many.safetensors"),
            (f"{HOSTILE_RECORDS:,} empty records (hostile)", "q8", d / "hostile.q8"),
        ]
        print(f"q8 from {Path(q8.__file__).parent}, load average {os.getloadavg()[0]:.2f}")
        print(f"{'file':34} {'reader':12} {'file MB':>8} {'open s':>8} {'peak MiB':>9}")
        for what, kind, path in cases:
            r = measure(kind, path)
            size = path.stat().st_size / 1e6
            print(f"{what:34} {kind:12} {size:8.1f} {r['seconds']:8.3f} {r['peak_mib']:9.1f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
    else:
        main()
