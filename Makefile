# gfsp — two commands: `make run` (local testnet in the foreground) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test
DIR    ?= testnet-data

.PHONY: run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the package metadata changed.
$(STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(TSTAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(STAMP)

# A local testnet (devchain + 7 SPs on 127.0.0.1) under $(DIR), in the foreground; Ctrl-C
# stops it.
run: $(STAMP)
	$(BIN)/gfsp-testnet up --nodes 7 --dir $(DIR)

test: $(TSTAMP)
	@command -v systemd-analyze >/dev/null || (apt-get update -qq && apt-get install -y -qq systemd)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(TSTAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DIR) .pytest_cache .hypothesis .ruff_cache *.egg-info
