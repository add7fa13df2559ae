# Quick start: `make demo` then `make test` (both create .venv on first use). CI runs `make test-all`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.elucidate-installed

.PHONY: demo test test-all bench docs clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,diffusers,data,tensorboard]"
	# test-only references; k-diffusion without its torchvision-importing dependencies
	$(PY) -m pip install --quiet --no-deps k-diffusion torchsde torchdiffeq trampoline
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/elucidate demo

# lint + every unit, contract, property and fast end-to-end test (<= 5 min on 2 cores)
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(PY) -m pytest -q -n 2 --maxschedchunk 1 -m "not slow"

# `make test` + the learning-quality tests (the demo learns digits, guided digits, non-leaky rotations, ...)
test-all: test
	$(PY) -m pytest -q -n 2 --maxschedchunk 1 -m slow

# rewrite the generated tables of README.md and docs/ from the declarations
docs: $(STAMP)
	$(PY) -m elucidate.cli.docs

bench: $(STAMP)
	$(PY) benchmarks/sampler_overhead.py
	$(PY) benchmarks/sampler_accuracy.py

clean-venv:
	rm -rf $(VENV)
