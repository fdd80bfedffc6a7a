# `make bench`, `make test` and `make docs` each set up .venv (once) and run; see README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: bench test demo docs

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet -e '.[bench,peers]'
	touch $@

# one thread: on a shared 2-core machine, OpenMP's second thread stalls every parallel op while
# another job holds a core (calls 20-300x slower, measured); `khot bench --help` for the options, --full for the long run
bench: $(STAMP)
	$(BIN)/khot bench --threads 1

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python examples/demo.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict
