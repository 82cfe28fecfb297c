# The one entry point: install run test lint bench (CI calls the same targets).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= config/flintproxy.toml

.PHONY: install run test lint bench bench-micro soak clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The gateway on its defaults, with the bundled mock upstream on :9001 and the mock SMTP
# server on :2525 (mail is printed here); the first start creates the data key (0600).
run: $(STAMP)
	@$(BIN)/flintproxy keygen var/flintproxy.key
	@$(BIN)/flintproxy mock-upstream --port 9001 & mock=$$!; \
	$(BIN)/flintproxy mock-smtp --port 2525 & smtp=$$!; \
	trap 'kill $$mock $$smtp 2>/dev/null' EXIT INT TERM; \
	$(BIN)/flintproxy serve --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check flintproxy tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/run.py

# Mixed hostile traffic for MINUTES, then the books must balance (bench/soak.py).
MINUTES ?= 10
soak: $(STAMP)
	$(BIN)/python bench/soak.py --minutes $(MINUTES)

bench-micro: $(STAMP)
	@for f in bench/micro_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
