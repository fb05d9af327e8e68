# appdistill: the two README commands are `make demo` and `make test`.
# Both create .venv (once) and install the pinned stack; a second install is a no-op
# because `.venv/.installed` records the hash of the files that define the install.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INSTALL_INPUTS := pyproject.toml scripts/install.sh

.PHONY: install demo test test-fast bench clean
install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	bash scripts/install.sh $(VENV) $(PY)
	touch $(STAMP)

demo: install
	$(BIN)/appdistill demo

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
