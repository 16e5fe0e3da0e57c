# `make demo` and `make test` each create or update .venv/ by themselves; rerunning is cheap.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a GPU user sets TORCH_SPEC (see README).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

# Reinstall only when the dependency list or the torch spec changes.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/instructrec demo

bench: $(STAMP)
	$(VENV)/bin/instructrec bench

clean:
	rm -rf $(VENV) build *.egg-info
