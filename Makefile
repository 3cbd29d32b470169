# minimem: two commands for a learner (`make book`, `make test`); the rest are for maintainers.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.installed-stamp

.PHONY: help venv book book-build lab test test-fast chromium bench clean

help:
	@echo "make book   - create .venv, install everything, build the course and open it"
	@echo "make test   - create .venv, install everything, run the whole test suite"
	@echo "make lab    - open the chapter notebooks in JupyterLab"

# ---------------------------------------------------------------- environment
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

venv: $(STAMP)

# Debian's chromium for the real-browser tests (Playwright cannot download browsers here).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "chromium missing: run 'sudo apt-get install chromium' (browser tests will be skipped)"; \
	  fi; \
	fi

# ---------------------------------------------------------------- the book
book-build: venv
	$(PY) -m minimem.bookbuild

book: book-build
	@$(PY) -m minimem.bookbuild --open

lab: venv
	.venv/bin/jupyter lab notebooks

# ---------------------------------------------------------------- tests
test: venv chromium book-build
	$(PY) -m pytest -q tests exercises/test_graders.py

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not browser" tests

bench: venv
	$(PY) -m minimem bench all

clean:
	rm -rf book/_build runs .pytest_cache
