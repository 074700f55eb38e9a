# PicoSpec: `make demo` installs everything and runs the demo; `make test` runs the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
LLAMA_VERSION := 0.3.36
ARCH := $(shell uname -m)
# x86_64: a portable AVX2 build. llama.cpp's default -march=native build crashes on CPUs that
# advertise AMX (SIGSEGV in ggml_backend_amx_mul_mat). ARM (Pi, Jetson): the native build is right;
# for Jetson set LLAMA_CMAKE_ARGS=-DGGML_CUDA=on (docs/EDGE_HARDWARE.md).
ifeq ($(ARCH),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
else
LLAMA_CMAKE_ARGS ?=
endif
# Built llama-cpp-python wheels are kept per build flags, so a new clone does not rebuild (3+ min).
WHEELS := $(HOME)/.cache/picospec/wheels/$(shell echo "$(ARCH) $(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)" | md5sum | cut -c1-10)
EXTRAS ?= all,models

.PHONY: install install-edge demo test test-fast bench models clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.llama-$(LLAMA_VERSION): $(VENV)/bin/python
	@mkdir -p $(WHEELS)
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_VERSION) ($(LLAMA_CMAKE_ARGS)); a few minutes, once"; \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	    $(PIP) wheel -q --no-cache-dir --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION); \
	fi
	$(PIP) install -q $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	@touch $@

# editable: a plain path entry to this directory (pyproject's package-dir), so PYTHONPATH and the
# source tree resolve the same way in a fresh clone as in development
$(VENV)/.installed: pyproject.toml $(VENV)/.llama-$(LLAMA_VERSION)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	@touch $@

install: $(VENV)/.installed

# the edge alone (a Pi, a Jetson): no torch, no transformers
install-edge: $(VENV)/.llama-$(LLAMA_VERSION)
	$(PIP) install -q -e ".[edge]"

demo: install
	$(VENV)/bin/picospec demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(VENV)/bin/picospec bench --prompts humaneval,gsm8k,mt-bench --limit 2 --rtt-ms 20,100,400 --modes cloud,sync,pipeline,auto --json bench/results/bench.json --plot bench/results/bench.png

models: install
	$(VENV)/bin/picospec models

clean:
	rm -rf $(VENV) build *.egg-info

# The edge on aarch64, shown on x86 by qemu-user emulation (docs/EDGE_HARDWARE.md, "The edge on
# aarch64, emulated"): an arm64 sysroot (Debian arm64 python3.11 + aarch64 wheels, in
# ~/.cache/picospec/arm64), llama-cpp-python cross-compiled with Pi 5 flags (cached wheel), the
# edge's torch-free tests under emulation, a 16-token greedy generation by the emulated edge against
# a native verifier (token for token the x86 edge's), and doctor under emulation. Not in CI: cold it
# takes ~25-30 min on 2 cores (the cross build alone ~15), warm ~8 (docs/EDGE_HARDWARE.md).
.PHONY: arm-check
arm-check: install
	nice -n 19 $(PY) arm/check.py
