"""Build ``engine.plan`` from ``model.fp16.onnx``: strongly typed, one batch profile, timing cache.

TensorRT 11 removed ``BuilderFlag.FP16``: precision comes from the FP16 ONNX itself
and strong typing (always on in 11; requested with the STRONGLY_TYPED flag on 10).
"""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import BackendUnavailable, ModelFormatError
from .preprocess import IMAGE_SIZE
from .runtime.tensorrt_backend import tensorrt_unavailable_reason, trt_logger

log = logging.getLogger(__name__)


def tensorrt_identity() -> dict:
    """TensorRT version plus the GPU's name and compute capability."""
    import tensorrt as trt

    from .runtime.cuda_memory import gpu_identity
    return {"tensorrt": trt.__version__, **gpu_identity()}


def build_engine(onnx_path: Path, plan_path: Path, cache_path: Path, max_batch: int,
                 workspace_mib: int = 2048) -> dict:
    """Compile the engine; returns the identity it was built for (TensorRT version, GPU)."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise BackendUnavailable(reason)
    import tensorrt as trt

    logger = trt_logger()
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelFormatError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profile = builder.create_optimization_profile()
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    profile.set_shape("images", (1,) + shape, (max(1, max_batch // 2),) + shape, (max_batch,) + shape)
    config.add_optimization_profile(profile)
    cache_bytes = cache_path.read_bytes() if cache_path.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    log.info("building TensorRT engine (batch 1..%d, timing cache %s)", max_batch,
             "reused" if cache_bytes else "new")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelFormatError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return tensorrt_identity()
