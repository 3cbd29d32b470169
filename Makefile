# minimem: two commands for a learner (`make book`, `make test`); the rest are for maintainers.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.installed-stamp

.PHONY: help venv book book-build lab lint test test-fast chromium bench clean

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
# As root (CI) it is installed with apt-get when missing; otherwise the browser tests skip,
# except under CI=true where they fail.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	      && /usr/bin/chromium --version; \
	  else \
	    echo "chromium missing: run 'sudo apt-get install chromium' (browser tests will be skipped)"; \
	  fi; \
	fi

# ---------------------------------------------------------------- the book
# Jupyter Book 1.x, offline, Sphinx warnings as errors; the chapters are notebooks/*.ipynb.
book-build: venv
	$(PY) -m minimem_tools.bookbuild

book: book-build
	@$(PY) -m minimem_tools.bookbuild --open

# JupyterLab on the repository, chapter 0 open (--allow-root only when run as root).
lab: venv
	$(PY) -m jupyterlab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks/00_welcome.ipynb \
	  $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# ---------------------------------------------------------------- tests
# nbval re-runs every chapter notebook top to bottom; cells with the cell tag nbval-check-output
# (cell metadata, invisible to readers) must reproduce their saved output (after
# notebooks/nbval_sanitize.cfg).
NBVAL := --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg notebooks

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: venv chromium lint book-build
	$(PY) -m pytest -q tests exercises/test_graders.py $(NBVAL)

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not browser" tests

bench: venv
	.venv/bin/minimem bench all

clean:
	rm -rf book/_build runs .pytest_cache
