"""Packaging: the wheel holds only the `q8` package (with its compiled codec) and works
when installed into a fresh virtual environment, imported from outside the repository.

The repository root is the package itself, so a packaging slip would ship generic
top-level modules (codec, kernels, tests, ...) or only work thanks to the source tree.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import q8
import torch

ROOT = Path(__file__).resolve().parents[1]
GENERIC_NAMES = ("codec", "formats", "kernels", "optim", "tools", "tests", "integrations", "benchmarks")
# Not copied into the build tree: local environments, caches and build outputs.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".*_cache", ".hypothesis", "bench-out"
)
# A caller's PYTHONPATH (e.g. a checkout put on the path) would shadow the installed wheel.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
    "PYTHONSAFEPATH": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}


def run(*cmd, cwd: Path, env: dict[str, str] = ENV) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build writes build/ next to them)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        tmp / "dist",
        src,
        cwd=tmp,
    )
    (built,) = (tmp / "dist").glob("q8-*.whl")
    return built


def test_wheel_contains_only_the_q8_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"q8", f"q8-{q8.__version__}.dist-info"}, tops
    assert any(re.fullmatch(r"q8/codec/_native[^/]*\.so", name) for name in names), names
    assert "q8/__init__.py" in names and "q8/codec/blockwise.py" in names
    assert "q8/py.typed" in names and "q8/__main__.py" in names  # typed; `python -m q8` runs q8convert
    assert not [name for name in names if "/tests/" in name or name.startswith("q8/setup")], names


def test_installed_wheel_quantizes_from_outside_the_repo(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # Reuse the dependencies already installed here (torch, safetensors, ...) instead of
    # downloading them: a .pth line puts their site-packages after the venv's own. Only
    # that directory is added; its .pth files (e.g. an editable q8) are not processed.
    deps = Path(torch.__file__).resolve().parents[1]
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "q8-test-deps.pth").write_text(f"{deps}\n")
    # Installed by this interpreter's pip (same Python version) into the venv's prefix:
    # works with any pip, where `pip --python` needs pip >= 22.3. --ignore-installed: else
    # pip first uninstalls the q8 of the environment running the tests (the developer's).
    pip = (sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q")
    run(*pip, "--prefix", venv, wheel, cwd=tmp_path)

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    script = f"""
import importlib.util, pathlib, torch, q8
assert pathlib.Path(q8.__file__).is_relative_to({str(site)!r}), q8.__file__
x = torch.randn(5000)
qt = q8.quantize(x, code="dynamic", blocksize=256)
assert qt.codes.dtype == torch.uint8 and qt.absmax.numel() == 20
assert q8.quant_error(x, q8.dequantize(qt)).rel_l2 < 0.02
for name in {GENERIC_NAMES!r}:
    spec = importlib.util.find_spec(name)
    assert spec is None, f"generic top-level module {{name}} importable from {{spec.origin}}"
print("ok", q8.__version__)
"""
    assert run(python, "-c", script, cwd=cwd).strip() == f"ok {q8.__version__}"
    assert run(python, "-m", "q8", "--version", cwd=cwd).strip() == f"q8convert {q8.__version__}"
    # The developer's q8 (as this process found it) is still the one their environment imports.
    developer = run(sys.executable, "-c", "import q8; print(q8.__file__)", cwd=cwd, env=dict(os.environ))
    assert developer.strip() == q8.__file__
