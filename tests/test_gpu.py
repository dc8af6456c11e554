"""TensorRT engine build and inference: needs TensorRT and a CUDA GPU."""
from __future__ import annotations

import numpy as np
import pytest

from engine_build.runtime.tensorrt_backend import tensorrt_unavailable_reason

pytestmark = pytest.mark.gpu
REASON = tensorrt_unavailable_reason()


@pytest.mark.skipif(REASON is not None, reason=f"TensorRT GPU path unavailable: {REASON}")
def test_engine_builds_validates_and_runs(small_model, tmp_path, photos):
    from engine_build.cli import main
    from engine_build.manifest import read_manifest
    from engine_build.runtime import open_backend
    out = tmp_path / "gpu"
    assert main(["build", "--prototxt", str(small_model[0]), "--caffemodel", str(small_model[1]),
                 "--output", str(out), "--precision", "fp32", "fp16", "--tensorrt", "--max-batch", "8"]) == 0
    manifest = read_manifest(out)
    entry = manifest["files"]["tensorrt"]
    assert entry["precision"] == "fp16" and entry["max_batch"] == 8 and entry["compute_capability"]
    assert (out / "timing.cache").exists()
    check = [c for c in manifest["validation"]["checks"] if c["runtime"] == "tensorrt"][0]
    assert check["passed"], check
    with open_backend("tensorrt", out / "engine.plan", "fp16", 8) as trt, \
            open_backend("onnxruntime", out / "model.onnx", "fp32", 8) as ref:
        np.testing.assert_allclose(trt.infer(photos).probs, ref.infer(photos).probs, atol=2e-2)
    # a second build reuses the engine and its timing cache
    assert main(["build", "--prototxt", str(small_model[0]), "--caffemodel", str(small_model[1]),
                 "--output", str(out), "--precision", "fp32", "fp16", "--tensorrt", "--max-batch", "8"]) == 0
