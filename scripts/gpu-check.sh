#!/usr/bin/env bash
# One command for a GPU host: prove the TensorRT path, or as much of it as this host allows.
#   bash scripts/gpu-check.sh            (uses .venv if present, else python3; PYTHON=... to choose)
# Prints driver, CUDA, TensorRT and cuda-python versions; runs the gpu tests; measures TensorRT
# throughput at batch 1/8/32/max into benchmarks/results/gpu-<gpu>.json. Where TensorRT is missing
# it still checks cuda-python's buffers, copies and streams, and says what it skipped.
# Install first with: pip install '.[gpu,test]' (CUDA 13 driver, R580+) or '.[gpu-cu12,test]'.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
MAX_BATCH="${MAX_BATCH:-64}"
failed=()
skipped=()
step() { echo; echo "== $1"; }

step "host"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader \
        || failed+=("nvidia-smi")
else
    echo "nvidia-smi not found"
fi

step "versions (driver, CUDA runtime, cuda-python, TensorRT, GPUs)"
"$PY" benchmarks/gpu_check.py versions || failed+=("versions")

step "cuda-python: pinned/device buffers, copies both ways, two streams"
"$PY" benchmarks/gpu_check.py cuda || failed+=("cuda-python buffers/copies/streams")

reason="$("$PY" -c 'from engine_build.runtime import available_backends as a; print(a()["tensorrt"] or "")')"
if [ -n "$reason" ]; then
    echo
    echo "TensorRT path unavailable here: $reason"
    skipped+=("gpu tests (tests/test_gpu.py)" "TensorRT throughput")
else
    step "gpu tests"
    "$PY" -m pytest -m gpu tests/test_gpu.py -ra -q || failed+=("gpu tests")
    step "TensorRT throughput (batch 1/8/32/$MAX_BATCH, full-size placeholder)"
    "$PY" benchmarks/gpu_check.py tensorrt --max-batch "$MAX_BATCH" || failed+=("TensorRT throughput")
fi

echo
[ ${#skipped[@]} -eq 0 ] || printf 'skipped: %s\n' "${skipped[@]}"
if [ ${#failed[@]} -ne 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu-check: all run steps passed"
