# Quick start: `make bench` (the main job) and `make test`. Both do all set-up first.
#
# Python: a .venv here (torch==2.13.0 CPU from this machine's wheel, triton, build deps),
# except where python3 already has torch (the GPU machine, which cannot download): there
# that python3 is used as is.
SHELL := /bin/bash
PYTHON_SYS ?= python3
VENV := .venv
HAVE_SYS_TORCH := $(shell $(PYTHON_SYS) -c "import torch" 2>/dev/null && echo yes)
ifeq ($(wildcard $(VENV)/bin/python)$(HAVE_SYS_TORCH),yes)
PY := $(PYTHON_SYS)
else
PY := $(abspath $(VENV))/bin/python
endif
PIP := $(PY) -m pip --disable-pip-version-check -q
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_ARCH_FLAGS := -gencode=arch=compute_90a,code=sm_90a
CUDA_GATE_FLAGS := -Xptxas --warn-on-spills,--warn-on-local-memory-usage,-Werror
# The GPU machine's triton, for the sm_90a compile gate (tests/test_sm90_compile.py), which
# compiles every kernel under both it and the venv's triton: their register use differs.
TRITON_GATE_DIR := $(VENV)/triton-3.6

.PHONY: setup build test test-all bench check-cuda gpu-check clean FORCE

$(VENV)/bin/python:
	$(PYTHON_SYS) -m venv $(VENV)

setup: $(if $(filter $(PY),$(PYTHON_SYS)),,$(VENV)/bin/python)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@$(PY) -c "import triton, numpy, pybind11, ninja, pytest, hypothesis, setuptools" 2>/dev/null \
	  || $(PIP) install triton numpy pybind11 ninja pytest hypothesis "setuptools>=64" wheel
	@# optional (from_safetensors), installed so its tests run; without it they skip
	@$(PY) -c "import safetensors" 2>/dev/null || $(PIP) install --retries 0 --timeout 10 safetensors \
	  || echo "setup: safetensors not installed; its tests will skip"
	@[ "$(PY)" = "$(PYTHON_SYS)" ] || [ -d $(TRITON_GATE_DIR)/triton ] \
	  || $(PIP) install --no-deps --target $(TRITON_GATE_DIR) triton==3.6.0

# Builds moe_kernels._C in place (editable install), only when csrc/ or the build files changed
# since the last build, or the .so is missing: a rebuild is ~2 min on 2 cores.
EXT_STAMP := build/.ext-built
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
build: setup $(EXT_STAMP)

$(EXT_STAMP): $(EXT_SOURCES) $(if $(wildcard moe_kernels/_C*.so),,FORCE)
	$(PIP) install --no-build-isolation --no-deps -e .
	@mkdir -p $(@D) && touch $@

FORCE:

# The CI job: CPU tests (Triton under the interpreter; every Triton kernel compiled for
# sm_90a under two triton versions), CUDA device code syntax-checked. The tests run as one
# pytest process per core (at most 4) sharing one list: tests/run_parallel.py.
test: build check-cuda
	$(PY) tests/run_parallel.py tests -m "not slow" -q

# Everything, the slow sweeps too (the GPU machine runs this).
test-all: build
	$(PY) -m pytest tests -q

bench: build
	$(abspath $(dir $(PY)))/moe-bench

# Compiles every framework-free .cuh (device code, and csrc/common/ through
# check_device.cuh) for sm_90a: catches CUDA errors on machines whose
# torch has no CUDA (the kernels themselves are built and tested on the GPU machine).
# A register spill or any local memory (an array indexed at run time) fails it.
check-cuda:
	@if [ -z "$(NVCC)" ]; then echo "check-cuda: nvcc not found, skipped"; else \
	  tmp=$$(mktemp -d); for f in csrc/cuda/*.cuh csrc/common/*.cuh; do echo "nvcc $(CUDA_ARCH_FLAGS) $$f"; \
	    printf '#include "%s"\n' "$(CURDIR)/$$f" > $$tmp/check.cu; \
	    $(NVCC) -std=c++17 $(CUDA_ARCH_FLAGS) $(CUDA_GATE_FLAGS) -c $$tmp/check.cu -o $$tmp/check.o || exit 1; done; \
	  rm -rf $$tmp; fi

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build moe_kernels/_C*.so *.egg-info
