# The two commands of the README, each doing all of its own setup on a fresh machine:
#   make test   venv + pinned dependencies + build (CPU, emulated CUDA and nvcc extensions) + lint + the
#               whole suite
#   make demo   venv + the CPU extension only + the main job: a fine-tune of a tiny Llama (LoRA by default)
#               in fp16 with FusedAdamW and the loss scaler, on 2 ranks under torchrun with llmkern DDP
# Other targets: build, build-cpu, bench, info, lint, clean.
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
# make demo runs examples/configs/demo.yaml; DEMO_CONFIG picks another config, DEMO_ARGS adds overrides,
# e.g. make demo DEMO_ARGS="--set method.name=adapter --set optim.lr=6e-3" or "--set precision.dtype=fp16".
DEMO_CONFIG ?= examples/configs/demo.yaml

BENCH_ARGS ?=

.PHONY: all build build-cpu test demo bench info lint clean

all: build

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q -r requirements.txt
	touch $@

# An editable install against the venv's torch (--no-build-isolation). Objects stay in build/temp/<torch>/
# (setup.py), so ninja recompiles only what changed, and ccache is used when it is on PATH. pip runs
# verbosely into build/build.log; the terminal shows ninja's [k/n] step per compiled file, and the log's
# tail if the build fails.
define pip_build
	@mkdir -p build
	@set -o pipefail; $(1) $(PIP) install --disable-pip-version-check -v --no-build-isolation --no-deps -e . 2>&1 \
	  | tee build/build.log | sed -unE -e 's|$(CURDIR)/||g' -e 's|^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]+) .*|  \1 compiling \2|p' \
	  || { tail -n 40 build/build.log; echo "the build failed; its whole log is build/build.log"; exit 1; }
	@echo "built: $$($(PY) -c 'from llmkern import _ext; print(", ".join(f"{n} {_ext.status(n)}" for n in _ext.EXTENSIONS))')"
endef

build: $(VENV)/.deps
	@echo "building llmkern._C (CPU kernels), ._C_emu (the CUDA sources on the CPU) and, where nvcc is found," \
	      "._C_cuda: 30 compile units, 685 s the first time on 2 idle cores; later builds compile what changed"
	$(call pip_build,)

# What `make demo` needs: the CPU kernels only (LLMKERN_CUDA=0: 11 compile units, no CUDA source).
build-cpu: $(VENV)/.deps
	@echo "building llmkern._C (the CPU kernels the demo runs): 11 of the 30 compile units the first time;" \
	      "later builds compile what changed"
	$(call pip_build,LLMKERN_CUDA=0)

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .

test: build lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The fine-tune relaunches itself under torchrun with parallel.nproc ranks (llmkern ZeRO-2 over gloo) and
# writes runs/demo-<UTC timestamp>/ (metrics, loss curve, checkpoints, adapter); it exits 1 when the
# held-out accuracy gains less than the config's eval.min_accuracy_gain.
demo: build-cpu
	$(PY) -m llmkern train --config $(DEMO_CONFIG) $(DEMO_ARGS)

# DeepSpeed (the CPU Adam peer of bench/optim) goes into build/bench-deps, not .venv; it JIT-builds
# its CPU Adam with ninja on first use. Its dependencies are pinned too, so --no-deps. Liger-Kernel (the
# GPU peer of the fused-op benches, bench/ops/_liger.py) is pinned there too; the benches find it through
# LLMKERN_BENCH_DEPS (and .venv has the same pin, for the tests of its adapters).
BENCH_DEPS := build/bench-deps
$(BENCH_DEPS)/.deps: requirements-bench.txt | $(VENV)/.deps
	$(PIP) install --disable-pip-version-check -q --no-deps --target $(BENCH_DEPS) -r requirements-bench.txt
	touch $@

# Every benchmark (llmkern bench: results, logs and plots under bench/results/<timestamp>/); extra flags
# through BENCH_ARGS, e.g. make bench BENCH_ARGS="ops --quick", or on a GPU BENCH_ARGS="ops --device cuda"
# (the fused ops on Triton with Liger-Kernel as a peer).
bench: build $(BENCH_DEPS)/.deps
	LLMKERN_DEEPSPEED_PATH=$(CURDIR)/$(BENCH_DEPS) LLMKERN_BENCH_DEPS=$(CURDIR)/$(BENCH_DEPS) \
	  $(PY) -m llmkern bench $(BENCH_ARGS)

info: build
	$(PY) -m llmkern info

clean:
	rm -rf build *.egg-info llmkern/*.so
