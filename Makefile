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

# Until the multi-SP testnet lands (gfsp-testnet), `make run` initialises one node under
# $(DIR)/sp0 (kept out of git) and runs it in the foreground; Ctrl-C stops it.
run: $(STAMP)
	@test -f $(DIR)/sp0/config.toml || $(BIN)/gfsp-node init --dir $(DIR)/sp0 --seed sp0
	$(BIN)/gfsp-node run --config $(DIR)/sp0/config.toml

test: $(TSTAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(TSTAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DIR) .pytest_cache .hypothesis .ruff_cache *.egg-info
