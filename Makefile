# tqslite: the two commands a newcomer needs are `make book` and `make test`.
# Each creates the virtual environment .venv on first use (python3.11 + pip, nothing else).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tqslite-installed

# `make book SMOKE=1` executes every notebook in its quick SMOKE mode.
SMOKE ?=
PYTEST_ARGS ?=

.PHONY: all setup book test lab bench baselines clean

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name tqslite --display-name "Python (tqslite)" >/dev/null
	@touch $(STAMP)

setup: $(STAMP)

## book: execute the notebooks with papermill, then build the site into book/_build/html
book: $(STAMP)
	$(PY) -m tqslite.book build $(if $(SMOKE),--smoke)

## test: every test, notebooks in SMOKE mode included
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## lab: open the book's notebooks in JupyterLab with the project's kernel
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

## bench: print the performance ratios (not part of the tests; probe_scaling.py takes about 20 minutes)
bench: $(STAMP)
	$(PY) benchmarks/probe_throughput.py
	$(PY) benchmarks/deployment.py
	$(PY) benchmarks/probe_scaling.py

## baselines: every method at matched size on the shipped models: win and cost tables (SMOKE=1: quick)
baselines: $(STAMP)
	$(PY) benchmarks/baselines.py $(if $(SMOKE),--smoke)

clean:
	rm -rf book/_build _build .pytest_cache
