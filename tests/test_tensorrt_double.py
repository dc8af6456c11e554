"""The TensorRT path's own logic, run on the test double of tensorrt and cuda.bindings.

What the double cannot prove (real kernels, real FP16 numerics, real timing caches) is
tests/test_gpu.py's job on a GPU host (scripts/gpu-check.sh).
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from engine_build.artifact import select
from engine_build.cli import main
from engine_build.errors import ArtifactError, BackendClosed, CudaError, StaleEngineError
from engine_build.manifest import read_manifest, sha256
from engine_build.runtime import available_backends, open_backend
from engine_build.runtime.identity import EngineIdentity


def _build(model, out, max_batch=8, *extra) -> int:
    return main(["build", "--prototxt", str(model[0]), "--caffemodel", str(model[1]), "--output", str(out),
                 "--calibration-images", str(model[2]), "--validation-images", str(model[3]),
                 "--precision", "fp32", "fp16", "--tensorrt", "--max-batch", str(max_batch), *extra])


@pytest.fixture(scope="session")
def trt_model(small_model, tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """The small model, with one calibration photo and one other validation photo: these tests are of
    what the build does with the engine, its identity and its timing cache, which no photo count changes
    (the build then takes a third of its time with the 48 + 48 built-in views)."""
    photos = Path(__file__).resolve().parents[1] / "engine_build" / "photos"
    folders = tmp_path_factory.mktemp("trt-photos")
    for kind, name in (("calibration", "astronaut.jpg"), ("validation", "coffee.jpg")):
        (folders / kind).mkdir()
        shutil.copy(photos / name, folders / kind / name)
    return small_model[0], small_model[1], folders / "calibration", folders / "validation"


@pytest.fixture(scope="session")
def _engine_built_once(trt_model, tmp_path_factory):
    """An artifact with an engine, built once on a double of the default machine (as ``trt_double``)."""
    from tests import trt_double as double
    out = tmp_path_factory.mktemp("trt-once") / "trt"
    replaced = double.install()
    try:
        assert _build(trt_model, out) == 0
    finally:
        double.uninstall(replaced)
    return out


@pytest.fixture
def engine_artifact(trt_double, _engine_built_once, tmp_path):
    """A copy of the once-built artifact, for tests of what is done with an engine, not of its build."""
    out = tmp_path / "trt"
    shutil.copytree(_engine_built_once, out)
    return out


@pytest.fixture
def engine_built_here(trt_double, trt_model, tmp_path):
    """An artifact built in the test, on its own double: for tests of what the build did on the machine."""
    out = tmp_path / "trt"
    assert _build(trt_model, out) == 0
    return out


def test_build_writes_the_identity_the_service_compares(engine_built_here, trt_double):
    entry = read_manifest(engine_built_here)["files"]["tensorrt"]
    identity = EngineIdentity.from_dict(entry["identity"])
    assert identity == EngineIdentity(trt_double.tensorrt, "NVIDIA H200", "9.0", 1, 8)
    assert entry["timing_cache"] == {"file": "timing.cache", "tensorrt": trt_double.tensorrt, "gpu": "NVIDIA H200",
                                     "compute_capability": "9.0", "reused": False, "note": "no cache yet"}
    assert trt_double.builds[0]["flags"] == 1 << 1, "strongly typed network requested"
    check = [c for c in read_manifest(engine_built_here)["validation"]["checks"] if c["runtime"] == "tensorrt"]
    assert check and check[0]["passed"], check
    manifest, choice = select(engine_built_here, "auto", None, max_batch=8)
    assert choice.backend == "tensorrt"


def test_inspect_shows_engine_and_timing_cache_identity(engine_artifact, capsys):
    assert main(["inspect", str(engine_artifact)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200 (sm 9.0), TensorRT 10.13.0.35, batch 1..8" in out
    assert "timing      timing.cache from TensorRT 10.13.0.35 on NVIDIA H200, new" in out


def test_second_build_keeps_the_engine(engine_built_here, trt_model, trt_double):
    before = sha256(engine_built_here / "engine.plan")
    assert _build(trt_model, engine_built_here) == 0
    assert len(trt_double.builds) == 1 and sha256(engine_built_here / "engine.plan") == before


def test_new_batch_range_rebuilds_reusing_the_timing_cache(engine_built_here, trt_model, trt_double, caplog):
    with caplog.at_level(logging.WARNING):
        assert _build(trt_model, engine_built_here, 16) == 0
    assert len(trt_double.builds) == 2 and trt_double.builds[1]["cache_entries_before"] == 1
    entry = read_manifest(engine_built_here)["files"]["tensorrt"]
    assert entry["identity"]["max_batch"] == 16 and entry["timing_cache"]["reused"] is True
    assert not [r for r in caplog.records if "timing cache" in r.getMessage()]


def test_new_tensorrt_version_rebuilds_with_a_fresh_cache_and_one_warning(engine_built_here, trt_model, trt_double,
                                                                          caplog):
    trt_double.tensorrt = "11.1.0.7"
    import tensorrt
    tensorrt.__version__ = trt_double.tensorrt
    with caplog.at_level(logging.WARNING):
        assert _build(trt_model, engine_built_here) == 0
    warned = [r.getMessage() for r in caplog.records if "timing cache" in r.getMessage()]
    assert len(warned) == 1 and "TensorRT 10.13.0.35" in warned[0], warned
    entry = read_manifest(engine_built_here)["files"]["tensorrt"]
    assert entry["identity"]["tensorrt"] == "11.1.0.7"
    assert entry["timing_cache"]["tensorrt"] == "11.1.0.7" and entry["timing_cache"]["reused"] is False
    assert trt_double.builds[1]["cache_entries_before"] == 0


def test_unreadable_timing_cache_falls_back_with_one_warning(engine_artifact, trt_model, trt_double, caplog):
    (engine_artifact / "timing.cache").write_bytes(b"not a cache")
    with caplog.at_level(logging.WARNING):
        assert _build(trt_model, engine_artifact, 4) == 0
    warned = [r.getMessage() for r in caplog.records if "timing cache" in r.getMessage()]
    assert len(warned) == 1 and "cannot read it" in warned[0]
    assert read_manifest(engine_artifact)["files"]["tensorrt"]["timing_cache"]["reused"] is False


def test_service_refuses_an_engine_from_another_gpu_or_tensorrt(engine_artifact, trt_double):
    trt_double.gpu = "NVIDIA A100-SXM4-80GB"
    with pytest.raises(StaleEngineError, match="GPU NVIDIA H200, this machine has NVIDIA A100"):
        select(engine_artifact, "auto")
    trt_double.gpu = "NVIDIA H200"
    import tensorrt
    tensorrt.__version__ = "11.1.0.7"
    with pytest.raises(StaleEngineError, match="TensorRT 10.13.0.35, this machine has 11.1.0.7"):
        select(engine_artifact, "tensorrt")
    tensorrt.__version__ = trt_double.tensorrt
    with pytest.raises(StaleEngineError, match="batch 1..8, batches of 32"):
        select(engine_artifact, "tensorrt", max_batch=32)


@pytest.mark.parametrize("edit, error, message", [
    (lambda m: m["files"]["tensorrt"].pop("identity"), StaleEngineError, "no complete engine identity"),
    (lambda m: m["files"]["tensorrt"]["identity"].pop("max_batch"), StaleEngineError, "no complete engine identity"),
    (lambda m: m["validation"].update(checks=[c for c in m["validation"]["checks"] if c["runtime"] != "tensorrt"]),
     ArtifactError, "has no record of its validation gate"),
])
def test_service_refuses_an_engine_missing_identity_or_validation(engine_artifact, edit, error, message):
    manifest = read_manifest(engine_artifact)
    edit(manifest)
    (engine_artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(error, match=message):
        select(engine_artifact, "tensorrt", max_batch=8)


def _reference(artifact, images):
    with open_backend("onnxruntime", artifact / "model.fp16.onnx", "fp16", 64) as ref:
        return ref.infer(images)


def test_batches_above_the_profile_split_and_outputs_bind_by_name(engine_artifact, trt_double, photos):
    images = np.concatenate([photos, photos[:9]])   # 19 images, profile max 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)   # int(stream) is deprecated in cuda-python 13
        with open_backend("tensorrt", engine_artifact / "engine.plan", "fp16", 32) as backend:
            assert backend.max_batch == 8
            out = backend.infer(images)
    # the reference in the same 8 + 8 + 3 chunks: CPU kernels round differently per batch size
    refs = [_reference(engine_artifact, images[i:i + 8]) for i in range(0, len(images), 8)]
    np.testing.assert_allclose(out.probs, np.concatenate([r.probs for r in refs]), atol=1e-6)
    np.testing.assert_allclose(out.logits, np.concatenate([r.logits for r in refs]), atol=1e-6)


def test_buffers_are_sized_from_the_engine_at_its_largest_batch(engine_artifact, trt_double):
    with open_backend("tensorrt", engine_artifact / "engine.plan", "fp16", 4, streams=2) as backend:
        sizes = sorted(len(b) for b in trt_double.pinned.values())
        assert sorted(len(b) for b in trt_double.memory.values()) == sizes
        assert backend.max_batch == 4
    # two slots, each: images 8x256x256x3 uint8, probs and logits 8x2 float32 (profile max 8)
    assert sizes == [8 * 2 * 4] * 4 + [8 * 256 * 256 * 3] * 2


def test_two_threads_run_on_two_slots_at_once(engine_artifact, trt_double, photos):
    trt_double.execute_delay_s = 0.2
    with open_backend("tensorrt", engine_artifact / "engine.plan", "fp16", 8, streams=0) as backend:   # auto: 2
        results = [None, None]

        def work(i):
            results[i] = backend.infer(photos[i * 4:i * 4 + 4])
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert trt_double.max_running == 2
    ref = _reference(engine_artifact, photos[:8])
    np.testing.assert_allclose(np.concatenate([r.probs for r in results]), ref.probs, atol=1e-6)


def test_close_frees_slots_in_use_and_infer_after_close_raises(engine_artifact, trt_double, photos):
    trt_double.execute_delay_s = 0.3
    backend = open_backend("tensorrt", engine_artifact / "engine.plan", "fp16", 8, streams=2)
    outcome = {}

    def work(i):
        try:
            outcome[i] = backend.infer(photos[:2]).probs.shape
        except BackendClosed as exc:
            outcome[i] = exc
    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads[:2]:
        t.start()
    while trt_double.running < 2:
        time.sleep(0.01)
    threads[2].start()          # waits for a slot
    time.sleep(0.05)
    backend.close()             # returns once both running slots came back and were freed
    for t in threads:
        t.join(10)
    assert outcome[0] == outcome[1] == (2, 2)
    assert isinstance(outcome[2], BackendClosed)
    assert not trt_double.memory and not trt_double.pinned and not trt_double.streams
    with pytest.raises(BackendClosed):
        backend.infer(photos[:1])


def test_cuda_errors_become_our_exception_and_leak_nothing(engine_artifact, trt_double):
    trt_double.fail_malloc_after = 3     # the second slot's first device buffer fails
    with pytest.raises(CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation") as info:
        open_backend("tensorrt", engine_artifact / "engine.plan", "fp16", 8, streams=2)
    assert info.value.name == "cudaErrorMemoryAllocation"
    assert not trt_double.memory and not trt_double.pinned and not trt_double.streams


def test_engine_from_another_tensorrt_is_refused_when_loaded(engine_artifact, trt_double):
    import tensorrt
    trt_double.tensorrt = tensorrt.__version__ = "11.1.0.7"
    with pytest.raises(ArtifactError, match="could not deserialize"):
        open_backend("tensorrt", engine_artifact / "engine.plan", "fp16", 8)


def test_one_tensorrt_logger_for_build_and_backends(engine_built_here, trt_double):
    with open_backend("tensorrt", engine_built_here / "engine.plan", "fp16", 8):
        pass
    assert trt_double.loggers == 1


def test_driver_too_old_for_the_wheels_names_the_extra_that_fits(trt_double):
    trt_double.driver = 12080
    reason = available_backends()["tensorrt"]
    assert reason == ("the NVIDIA driver supports CUDA 12.8, the installed TensorRT/cuda-python need CUDA 13: "
                      "pip install 'sentiment-stream[gpu-cu12]' (TensorRT for CUDA 12, cuda-python >= 12.9.1, < 13)")
    trt_double.driver = 11080
    assert "update the NVIDIA driver" in available_backends()["tensorrt"]


def test_no_device_is_one_line(trt_double):
    trt_double.devices = 0
    assert available_backends()["tensorrt"] == "no usable CUDA GPU (cudaGetDeviceCount failed: cudaErrorNoDevice (100))"


def test_gpu_check_steps_run_on_the_double(engine_artifact, trt_double, tmp_path, capsys):
    """scripts/gpu-check.sh's Python steps: versions, the cuda-python round trip, the throughput run."""
    from benchmarks import gpu_check
    host = gpu_check.versions()
    assert host["driver_cuda"] == "13.0" and host["gpus"] == [{"name": "NVIDIA H200", "compute_capability": "9.0"}]
    assert gpu_check.cuda_roundtrip(mib=1, repeats=2)["bytes_verified"] is True
    assert not trt_double.memory and not trt_double.pinned and not trt_double.streams
    assert gpu_check.main(["tensorrt", "--artifact", str(engine_artifact), "--max-batch", "8", "--repeats", "2",
                           "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu-nvidia-h200.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 8] and all(r["images_per_s"] > 0 for r in rows)


def test_a_batch_stacked_into_the_backends_input_buffer_goes_to_the_gpu_without_another_copy(
        engine_artifact, trt_double, photos):
    """The service stacks each batch into the backend's input buffer (page-locked memory with TensorRT):
    the copy to the device reads it where it is. A batch in plain memory is staged through the slot's
    own page-locked buffer, as before; both give the reference's scores."""
    with open_backend("tensorrt", engine_artifact / "engine.plan", "fp16", 8) as backend:
        buffer = backend.input_buffer(8)
        assert any(base <= buffer.ctypes.data < base + len(b) for base, b in trt_double.pinned.items())
        buffer[:4] = photos[:4]
        direct = backend.infer(buffer[:4])
        assert trt_double.uploads[-1] == buffer.ctypes.data
        staged = backend.infer(np.array(photos[:4]))
        assert trt_double.uploads[-1] != buffer.ctypes.data
        backend.input_buffer(8)       # a second inference thread's
        pinned_before_close, slots = len(trt_double.pinned), backend.concurrency
    ref = _reference(engine_artifact, photos[:4])
    np.testing.assert_allclose(direct.probs, ref.probs, atol=1e-6)
    np.testing.assert_allclose(staged.probs, ref.probs, atol=1e-6)
    # each slot's images, probs and logits, and both input buffers: all freed on close
    assert pinned_before_close == slots * 3 + 2 and not trt_double.pinned
