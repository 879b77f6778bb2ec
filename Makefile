# Two commands for students (see README): `make lab` and `make test`.
# Both create .venv with `pip install -e ".[dev]"` when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.course-installed

.PHONY: lab test lint exercises check-exercises

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "the course needs Python >= 3.10; run make PYTHON=python3.X ...")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $(STAMP)

# Jupyter refuses to run as root unless told; containers often run as root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(STAMP)
	$(BIN)/course lab $(ROOT_FLAG)

test: $(STAMP)
	$(BIN)/ruff check course tests
	$(BIN)/course build-exercises --check
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check course tests

exercises: $(STAMP)
	$(BIN)/course build-exercises

check-exercises: $(STAMP)
	$(BIN)/course build-exercises --check
