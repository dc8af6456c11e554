#!/usr/bin/env bash
# Prove the TensorRT path on a GPU host, or as much of it as this host allows, in three steps that
# each run alone (each meant to finish in under 5 minutes on one GPU):
#   bash scripts/gpu-check.sh versions     driver, CUDA, cuda-python, TensorRT, GPUs; cuda-python's pinned
#                                          and device buffers, copies both ways, two streams
#   bash scripts/gpu-check.sh tests        the gpu tests (tests/test_gpu.py: build, validate, run, reuse)
#   bash scripts/gpu-check.sh throughput   a full-size placeholder engine at batch 1/8/32/$MAX_BATCH
#                                          -> benchmarks/results/gpu-<gpu>.json
#   bash scripts/gpu-check.sh              all three, in that order
# Each step ends with what it proved, or what it skipped and why. Uses .venv if present, else python3
# (PYTHON=... to choose). Install first with: pip install '.[gpu,test]' (CUDA 13 driver, R580+) or
# '.[gpu-cu12,test]' (CUDA 12 driver). See docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
MAX_BATCH="${MAX_BATCH:-64}"
STEPS=(versions tests throughput)
failed=()
skipped=()
say() { echo; echo "== $1"; }

trt_reason() {
    "$PY" -c 'from engine_build.runtime import available_backends as a; print(a()["tensorrt"] or "")'
}

step_versions() {
    say "versions: host, driver, CUDA runtime, cuda-python, TensorRT, GPUs"
    if ! command -v nvidia-smi >/dev/null; then
        echo "nvidia-smi not found"
        skipped+=("versions and cuda-python buffers: no NVIDIA driver on this host (nvidia-smi not found)")
        return
    fi
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader \
        || failed+=("nvidia-smi")
    cuda_step versions "versions"
    say "versions: cuda-python pinned/device buffers, copies both ways, two streams"
    cuda_step cuda "cuda-python buffers/copies/streams"
}

cuda_step() {   # gpu_check.py STEP; its exit status 77: what it needs is not installed here (skipped, why said)
    local err rc
    err="$(mktemp)"
    "$PY" benchmarks/gpu_check.py "$1" 2>"$err"
    rc=$?
    cat "$err" >&2
    case $rc in
        0) ;;
        77) skipped+=("$2: $(tail -n 1 "$err" | sed 's/^gpu_check [a-z]*: //')") ;;
        *) failed+=("$2") ;;
    esac
    rm -f "$err"
}

step_tests() {
    say "tests: tests/test_gpu.py (engine build, validation gate, inference, reuse, two slots)"
    local reason
    reason="$(trt_reason)"
    if [ -n "$reason" ]; then
        echo "TensorRT path unavailable here: $reason"
        skipped+=("gpu tests (tests/test_gpu.py): $reason")
        return
    fi
    if "$PY" -m pytest -m gpu tests/test_gpu.py -ra -q; then
        echo "proved: on this GPU TensorRT builds an engine from the FP16 ONNX that passes the validation gate," \
             "matches ONNX Runtime FP32 within 0.02, is kept by a second build, is rebuilt from its timing" \
             "cache, and serves two threads on two slots"
    else
        failed+=("gpu tests")
    fi
}

step_throughput() {
    say "throughput: TensorRT FP16 at batch 1/8/32/$MAX_BATCH (full-size placeholder, built on first run)"
    local reason
    reason="$(trt_reason)"
    if [ -n "$reason" ]; then
        echo "TensorRT path unavailable here: $reason"
        skipped+=("TensorRT throughput: $reason")
        return
    fi
    "$PY" benchmarks/gpu_check.py tensorrt --max-batch "$MAX_BATCH" || failed+=("TensorRT throughput")
}

case "${1:-all}" in
    all) todo=("${STEPS[@]}") ;;
    versions|tests|throughput) todo=("$1") ;;
    *) echo "usage: gpu-check.sh [versions|tests|throughput]" >&2; exit 1 ;;
esac
for s in "${todo[@]}"; do
    "step_$s"
done

echo
[ ${#skipped[@]} -eq 0 ] || printf 'skipped: %s\n' "${skipped[@]}"
if [ ${#failed[@]} -ne 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
if [ ${#skipped[@]} -ne 0 ]; then
    echo "gpu-check ${todo[*]}: nothing failed; what was skipped above was not proved on this host"
else
    echo "gpu-check ${todo[*]}: every step passed"
fi
