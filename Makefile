# Both entry points install what they need into .venv first (about a minute on a fresh machine).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install

demo: $(VENV)/.installed
	$(BIN)/codistill demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test,dask,s3,tensorboard]'
	touch $@
