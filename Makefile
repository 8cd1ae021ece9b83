# Two entry points for a new user; each sets up .venv on first use.
#   make study [SPACE=adamw] [ARGS="--n-trials 20"]   run an Optuna study over spaces/$(SPACE).yaml
#   make test                                        lint + the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SPACE ?= adamw
ARGS ?=

.PHONY: study test train bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

study: $(VENV)/.installed
	$(VENV)/bin/search run --space $(SPACE) $(ARGS)

train: $(VENV)/.installed
	$(VENV)/bin/search train $(ARGS)

test: $(VENV)/.installed
	$(PY) -m ruff check search trainer tests benchmarks
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/throughput.py $(ARGS)
