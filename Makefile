# The two commands of the README, each doing all of its own setup on a fresh machine:
#   make test   venv + pinned dependencies + build (CPU, emulated CUDA and nvcc extensions) + the whole suite
#   make demo   venv + build + the main job: a fine-tune of a tiny Llama (LoRA by default) in fp16 with
#               FusedAdamW and the loss scaler, on 2 ranks under torchrun with llmkern DDP
# Other targets: build, bench, info, lint, clean.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# nvcc 13.0 is on PATH as a wrapper script; torch needs the toolkit folder itself.
export CUDA_HOME ?= $(or $(wildcard /usr/local/cuda),$(patsubst %/bin/nvcc,%,$(shell readlink -f $$(command -v nvcc) 2>/dev/null)))
export MAX_JOBS ?= $(shell nproc)
PYTEST_ARGS ?=
DEMO_ARGS ?=
# make demo METHOD=adapter|prefix|prompt|ptuning picks the method; NPROC=1 runs it in one process.
METHOD ?= lora
NPROC ?= 2

.PHONY: all build test demo bench info lint clean

all: build

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q -r requirements.txt
	touch $@

# An editable install: ninja rebuilds only the objects whose sources changed (build/temp.*), and
# ccache is used when present (setup.py). --no-build-isolation builds against the pinned torch.
build: $(VENV)/.deps
	$(PIP) install --disable-pip-version-check -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

# The fine-tune relaunches itself under torchrun with NPROC ranks (llmkern DDP over gloo); extra
# flags go through DEMO_ARGS, e.g. make demo DEMO_ARGS="--dtype bfloat16 --steps 600".
demo: build
	$(PY) -m llmkern train --method $(METHOD) --nproc $(NPROC) $(DEMO_ARGS)

# DeepSpeed (the CPU Adam peer of bench/optim) goes into build/bench-deps, not .venv; it JIT-builds
# its CPU Adam with ninja on first use. Its dependencies are pinned too, so --no-deps.
BENCH_DEPS := build/bench-deps
$(BENCH_DEPS)/.deps: requirements-bench.txt | $(VENV)/.deps
	$(PIP) install --disable-pip-version-check -q --no-deps --target $(BENCH_DEPS) -r requirements-bench.txt
	touch $@

bench: build $(BENCH_DEPS)/.deps
	LLMKERN_DEEPSPEED_PATH=$(CURDIR)/$(BENCH_DEPS) $(PY) bench/run_all.py

info: build
	$(PY) -m llmkern info

clean:
	rm -rf build *.egg-info llmkern/*.so
