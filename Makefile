# The two commands of the README, each doing all of its own setup on a fresh machine:
#   make test   venv + pinned dependencies + build (CPU, emulated CUDA and nvcc extensions) + the whole suite
#   make demo   venv + build + the main job (a LoRA fine-tune of a tiny Llama on a synthetic task)
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

# The LoRA fine-tune (FusedAdamW on the adapters), then mixed precision: fp16 weights with fp32
# masters and the dynamic loss scaler (prints the scale and skipped steps), and bf16.
demo: build
	$(PY) -m llmkern train $(DEMO_ARGS)
	$(PY) examples/train_mixed_precision.py --dtype float16 --steps 200
	$(PY) examples/train_mixed_precision.py --dtype bfloat16 --steps 100

bench: build
	$(PY) bench/run_all.py

info: build
	$(PY) -m llmkern info

clean:
	rm -rf build *.egg-info llmkern/*.so
