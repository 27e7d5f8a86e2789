# Both entry points install what they need into .venv first (about a minute on a fresh machine).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# `make bench` runs every benchmark at its default size (minutes each; lm_state_restart needs a dataset: run it
# by hand with --data DIR); `make bench BENCH=train_step` runs one.
BENCH ?= $(filter-out harness lm_state_restart,$(basename $(notdir $(wildcard bench/*.py))))

.PHONY: demo test install bench

demo: $(VENV)/.installed
	$(BIN)/codistill demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest

install: $(VENV)/.installed

bench: $(VENV)/.installed
	@for name in $(BENCH); do echo "== bench/$$name.py"; DS_ACCELERATOR=cpu $(BIN)/python bench/$$name.py || exit 1; done

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test,dask,s3,tensorboard,bench]'
	touch $@
