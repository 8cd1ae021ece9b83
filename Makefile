# Two entry points for a new user; each sets up .venv on first use.
#   make study [SPACE=adamw] [ARGS="--n-trials 20"]   run an Optuna study over spaces/$(SPACE).yaml
#   make test                                        lint + the whole test suite, in parallel
#   make test-fast                                   lint + the tests that need no service and train little
VENV ?= .venv
PY := $(VENV)/bin/python
SPACE ?= adamw
ARGS ?=

.PHONY: study test test-fast train bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

study: $(VENV)/.installed
	$(VENV)/bin/search run --space $(SPACE) $(ARGS)

train: $(VENV)/.installed
	$(VENV)/bin/search train $(ARGS)

# 4 xdist workers on 2 cores: most tests wait on subprocesses, servers and outages; a Slurm
# cluster's tests stay on one worker (--dist loadgroup)
test: $(VENV)/.installed
	$(PY) -m ruff check search trainer tests benchmarks
	$(PY) -m pytest -n 4 --dist loadgroup

test-fast: $(VENV)/.installed
	$(PY) -m ruff check search trainer tests benchmarks
	$(PY) -m pytest -n 2 -m "not services and not slow" --durations=10

bench: $(VENV)/.installed
	$(PY) benchmarks/throughput.py $(ARGS)
