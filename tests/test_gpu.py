"""TensorRT engine build and inference on a real GPU: needs TensorRT, cuda-python and a CUDA GPU.

scripts/gpu-check.sh runs these on a GPU host. The same logic runs on the test double
everywhere (tests/test_tensorrt_double.py); these prove it against the real libraries.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from engine_build.runtime.tensorrt_support import tensorrt_unavailable_reason

pytestmark = pytest.mark.gpu
REASON = tensorrt_unavailable_reason()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=f"TensorRT GPU path unavailable: {REASON}")


def _build(model, out, *extra) -> int:
    from engine_build.cli import main
    return main(["build", "--prototxt", str(model[0]), "--caffemodel", str(model[1]), "--output", str(out),
                 "--precision", "fp32", "fp16", "--tensorrt", "--max-batch", "8", *extra])


@needs_gpu
def test_engine_builds_validates_runs_and_is_reused(small_model, tmp_path, photos):
    from engine_build.manifest import read_manifest, sha256
    from engine_build.runtime import open_backend
    from engine_build.runtime.identity import EngineIdentity, current_identity
    out = tmp_path / "gpu"
    assert _build(small_model, out) == 0
    manifest = read_manifest(out)
    entry = manifest["files"]["tensorrt"]
    assert EngineIdentity.from_dict(entry["identity"]) == current_identity(1, 8)
    assert entry["timing_cache"]["reused"] is False and (out / "timing.cache").stat().st_size > 0
    check = [c for c in manifest["validation"]["checks"] if c["runtime"] == "tensorrt"][0]
    assert check["passed"], check
    with open_backend("tensorrt", out / "engine.plan", "fp16", 8) as trt, \
            open_backend("onnxruntime", out / "model.onnx", "fp32", 8) as ref:
        np.testing.assert_allclose(trt.infer(photos).probs, ref.infer(photos).probs, atol=2e-2)
    plan_sha, cache_sha = sha256(out / "engine.plan"), sha256(out / "timing.cache")
    assert _build(small_model, out) == 0          # a second build keeps the engine
    assert sha256(out / "engine.plan") == plan_sha and sha256(out / "timing.cache") == cache_sha
    assert read_manifest(out)["files"]["tensorrt"]["sha256"] == plan_sha
    (out / "engine.plan").unlink()                 # a rebuild reads the timing cache back
    assert _build(small_model, out) == 0
    assert read_manifest(out)["files"]["tensorrt"]["timing_cache"]["reused"] is True


@needs_gpu
def test_oversampled_graph_builds_and_matches(small_model, tmp_path, photos):
    from engine_build.manifest import read_manifest
    from engine_build.runtime import open_backend
    out = tmp_path / "over"
    assert _build(small_model, out, "--oversample") == 0
    assert read_manifest(out)["preprocessing"]["crop"] == "10 crops averaged"
    with open_backend("tensorrt", out / "engine.plan", "fp16", 8) as trt, \
            open_backend("onnxruntime", out / "model.onnx", "fp32", 8) as ref:
        np.testing.assert_allclose(trt.infer(photos).probs, ref.infer(photos).probs, atol=2e-2)


@needs_gpu
def test_two_threads_share_the_two_slots(small_model, tmp_path, photos):
    from engine_build.errors import BackendClosed
    from engine_build.runtime import open_backend
    out = tmp_path / "threads"
    assert _build(small_model, out) == 0
    images = np.concatenate([photos] * 4)
    with open_backend("onnxruntime", out / "model.fp16.onnx", "fp16", 8) as ref:
        expected = ref.infer(images).probs
    backend = open_backend("tensorrt", out / "engine.plan", "fp16", 8, streams=2)
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(20):
                results[i] = backend.infer(images).probs
        except Exception as exc:  # surfaced below, with the thread's own error
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for probs in results.values():
        np.testing.assert_allclose(probs, expected, atol=2e-2)
    backend.close()
    with pytest.raises(BackendClosed):
        backend.infer(images[:1])
