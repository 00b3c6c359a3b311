# Two commands for a fresh machine (each sets everything up first):
#   make bench   build torchnorm and run the benchmark suite
#   make test    build torchnorm and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CUDA 13.0 build of torch, so the CUDA sources compile wherever nvcc is.
TORCH ?= torch==2.14.1
# Real client models for the conversion, fusion and Conv+BN tests and benchmarks (they skip without
# them); set MODELS= when TORCH names another torch.
MODELS ?= torchvision==0.29.1 timm transformers diffusers
# nvcc's home, when there is one: then the CUDA kernels are built too.
CUDA_HOME ?= $(wildcard /usr/local/cuda)
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS

.PHONY: setup build test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" $(MODELS) ninja pytest expecttest numpy matplotlib
	touch $@

# Incremental (ninja): only changed sources recompile.
build: setup
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest tests -q

bench: build
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf build torchnorm/_C*.so
