# `make demo` and `make test` each create or update .venv/ by themselves; rerunning is cheap.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a GPU user sets TORCH_SPEC (see README).
TORCH_SPEC ?= torch==2.13.0
# `cpu` brings onnxruntime, `gpu` brings onnxruntime-gpu and triton instead: the two onnxruntime
# builds install the same module, so EXTRAS holds one of them, never both.
EXTRAS ?= cpu,dev
STAMP := $(VENV)/.installed
# What was installed: a change of TORCH_SPEC or EXTRAS on the command line reinstalls too.
SPEC_FILE := $(VENV)/.install-spec
SPEC := $(TORCH_SPEC) [$(EXTRAS)]

.PHONY: venv test demo bench gpu-check clean FORCE

venv: $(STAMP)

$(SPEC_FILE): FORCE
	@mkdir -p $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(SPEC)" ]; then echo "$(SPEC)" > $@; fi

# Reinstall only when the dependency list, the torch spec or the extras change.
$(STAMP): pyproject.toml Makefile $(SPEC_FILE)
	@case ",$(EXTRAS)," in *,cpu,*,gpu,*|*,gpu,*,cpu,*) \
	  echo "EXTRAS=$(EXTRAS): cpu (onnxruntime) and gpu (onnxruntime-gpu) install the same module; keep one" >&2; exit 2;; esac
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	@# Switching a venv to gpu: uninstalling the CPU build deletes files the GPU build shares with
	@# it, so both go and the install below brings onnxruntime-gpu back whole.
	@case ",$(EXTRAS)," in *,gpu,*) $(PY) -m pip uninstall --quiet -y onnxruntime onnxruntime-gpu;; esac
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

# No TRITON_INTERPRET here: tests/conftest.py selects Triton's interpreter where there is no CUDA,
# so a GPU machine compiles and tests the real kernel.
test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/instructrec demo

# The documented full run (docs/benchmarks.md): flan-t5-small and flan-t5-base shapes (random weights), all
# workloads, every installed provider, 2 threads; figures in bench-results/.
BENCH_ARGS ?= --models random:flan-t5-small,random:flan-t5-base --requests 64 --peer-requests 6 --threads 2 --out bench-results
bench: $(STAMP)
	$(VENV)/bin/instructrec bench $(BENCH_ARGS)

# On a CUDA machine: its own environment (.venv-gpu: the gpu extra, a CUDA torch matching the
# driver, or the machine's own CUDA torch where it has one), then `pytest -m gpu`, the kernel sweep,
# the engine, `instructrec bench` and a flan-t5-xl training run on the GPU, in about 8 minutes;
# report in gpu-report/ (Markdown + JSON). See bench/gpu_check.py; GPU_CHECK_ARGS="--dry-run" shows the plan.
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) bench/gpu_check.py --out gpu-report $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
