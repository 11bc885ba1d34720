#!/usr/bin/env bash
# The GPU check, in one go: the CUDA tests, then benchmarks/kernels.py and benchmarks/throughput.py on the
# GPU, printing their tables. Budget: under 8 minutes on one H200 (each step has its own time limit).
#
#   scripts/gpu_check.sh         on a machine with a CUDA device
#   scripts/gpu_check.sh --cpu   anywhere: the same Python on the CPU (Triton interpreted, small sizes), to
#                                check before a GPU is borrowed that everything it runs imports and runs
#
# Written for the GPU machines this project may borrow: no network, Python 3.12 with torch, triton,
# transformers, peft, safetensors, tokenizers, pytest and httpx, but no fastapi, uvicorn or pydantic, and
# at most 64 MiB of files brought along, so not the demo model's weights. Hence:
#   - the benchmarks build random weights of the demo model's shapes (benchmarks/random_model.py);
#   - prometheus_client, which server/metrics.py imports, comes as its 64 KB wheel (scripts/wheels/),
#     imported straight from the zip (pure Python);
#   - fastapi, uvicorn, pydantic and python-multipart are made unimportable for everything run here, so
#     a dependency on the HTTP stack fails this script on any machine, not first on the GPU.
# PYTHON picks the interpreter (default python3; here: PYTHON=.venv/bin/python scripts/gpu_check.sh --cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; fi

blocker="$(mktemp -d)"
trap 'rm -rf "$blocker"' EXIT
cat > "$blocker/sitecustomize.py" <<'EOF'
import sys

BLOCKED = {"fastapi", "uvicorn", "pydantic", "pydantic_core", "starlette", "multipart", "python_multipart"}


class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on the GPU machines (scripts/gpu_check.sh blocks it)")
        return None


sys.meta_path.insert(0, _Refuse())
EOF
export PYTHONPATH="$blocker:$PWD:$PWD/scripts/wheels/prometheus_client-0.26.0-py3-none-any.whl${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

started=$(date +%s)
step() { echo; echo "=== $1 (at $(($(date +%s) - started)) s)"; }

step "environment"
"$PY" - <<'EOF'
import platform
import sys

import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), {platform.machine()}")
try:
    import triton

    print(f"triton {triton.__version__}")
except ImportError as exc:
    print(f"triton not importable: {exc}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)")
for name in ("fastapi", "pydantic"):
    try:
        __import__(name)
        sys.exit(f"{name} imported: the blocker is not active")
    except ImportError:
        pass
import prometheus_client

print(f"prometheus_client from {prometheus_client.__file__}")
EOF

if [[ "$MODE" == gpu ]]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device (use --cpu)')"
    step "CUDA tests"
    timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/kernels/test_triton_compiles_for_cuda.py
    step "benchmarks/kernels.py (Triton vs torch reference, bf16, hidden 4096)"
    timeout 120 "$PY" benchmarks/kernels.py --repeats 10
    step "benchmarks/throughput.py --device cuda (random weights of SmolLM2-135M's shapes)"
    timeout 300 "$PY" benchmarks/throughput.py --device cuda --random-weights --concurrency 16,64 --repeats 2
else
    step "CUDA tests, on the CPU with Triton interpreted"
    ADAPTER_SERVER_TEST_DEVICE=cpu TRITON_INTERPRET=1 timeout 900 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_cuda.py
    step "benchmarks/kernels.py (CPU rows)"
    timeout 600 "$PY" benchmarks/kernels.py --repeats 2
    step "benchmarks/throughput.py --device cpu (random weights, small)"
    timeout 900 "$PY" benchmarks/throughput.py --device cpu --random-weights --dtypes float32 --concurrency 4 \
        --repeats 1 --tokens 8 --no-transformers
fi
step "done"
