# The README's commands. Every target is idempotent: a second `make setup` takes seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup model serve test bench clean

setup: $(STAMP) model

# A torch already importable in .venv (e.g. a CUDA build installed by the user) is kept.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

model: $(STAMP)
	$(PY) scripts/fetch_demo_model.py

serve: setup
	$(PY) -m server

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/adapters.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/kernels.py

clean:
	rm -rf $(VENV)
