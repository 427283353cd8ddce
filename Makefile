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

.PHONY: demo test lint bench fuzz

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

# A long fuzz run outside CI: the C extensions built with AddressSanitizer + UBSan into
# build/fuzz (a copy of the package, so the in-place build stays as it is), then the
# mutation fuzz, the hostile corpus and the codec/format tests against them.
# FUZZ_EXAMPLES=200000 by default (about an hour on 2 cores); any sanitizer report aborts.
FUZZ_EXAMPLES ?= 200000
SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g
fuzz: $(STAMP)
	rm -rf build/fuzz && mkdir -p build/fuzz/q8
	CFLAGS="$(SANITIZE)" LDFLAGS="$(SANITIZE)" $(PY) setup.py -q build_ext --build-lib build/fuzz --build-temp build/fuzz-obj
	git ls-files '*.py' ':!tests/*' | tar -cf - -T - | tar -xf - -C build/fuzz/q8
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1 PYTHONPATH=build/fuzz Q8_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
	  $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_formats_fuzz.py tests/test_formats.py tests/test_codec_native.py
