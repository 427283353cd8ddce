# The two commands of the README: `make demo` and `make test`. Each sets up .venv first
# (once; later runs only check a stamp). If no torch is importable we pin the CPU build
# torch==2.13.0 (an unpinned torch would download a multi-GB CUDA build); if the system
# python already has torch (GPU machines), the venv sees it through system site-packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The repository root is the package q8 itself: never let it land on sys.path, where its
# subfolders (kernels/, formats/, ...) would shadow other packages' top-level modules.
export PYTHONSAFEPATH := 1
STAMP := $(VENV)/.q8-installed
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint bench

$(STAMP): pyproject.toml setup.py $(wildcard */*.c */*.h)
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "q8: reusing the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q "setuptools>=68" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m q8.tools.demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done
