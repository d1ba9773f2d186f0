# Every target works on a fresh machine with only Python 3.11+ and make:
# the virtual environment is created and the project installed on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUPERVISORD := $(BIN)/supervisord -c supervisord.conf
SUPERVISORCTL := $(BIN)/supervisorctl -c supervisord.conf

.PHONY: install run up down status test test-quick check lint typecheck clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

var:
	mkdir -p var/log

run: install var
	$(SUPERVISORD) -n

up: install var
	$(SUPERVISORD)

down: install
	-$(SUPERVISORCTL) shutdown

status: install
	-$(SUPERVISORCTL) status
	$(BIN)/chatctl status

test: install
	$(BIN)/python -m pytest

test-quick: install
	$(BIN)/python -m pytest -m 'not cluster'

lint: install
	$(BIN)/ruff check service ops tests
	$(BIN)/ruff format --check service ops tests

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
