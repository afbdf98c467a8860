# Everyday commands. `make run` and `make test` each build .venv/ on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format loadtest bench-layers bench-model clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/escort serve

test: $(STAMP)
	$(BIN)/ruff check service tests loadtest bench deploy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check service tests loadtest bench deploy
	$(BIN)/ruff format --check service tests loadtest bench deploy

format: $(STAMP)
	$(BIN)/ruff format service tests loadtest bench deploy
	$(BIN)/ruff check --fix service tests loadtest bench deploy

loadtest: $(STAMP)
	$(BIN)/python -m loadtest.run

bench-layers: $(STAMP)
	$(BIN)/escort bench layers

bench-model: $(STAMP)
	$(BIN)/escort bench model

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
