"""Build ``engine.plan`` from ``model.fp16.onnx``: strongly typed, one batch profile, timing cache.

TensorRT 11 removed ``BuilderFlag.FP16``: precision comes from the FP16 ONNX itself
and strong typing (always on in 11; requested with the STRONGLY_TYPED flag on 10).

The timing cache beside the engine is reused when the manifest says it was made by
this TensorRT version on this GPU and TensorRT accepts it; otherwise the build starts
a fresh cache with one warning. Its TensorRT version and GPU are recorded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BackendUnavailable, ModelFormatError
from .preprocess import IMAGE_SIZE
from .runtime.identity import EngineIdentity, current_identity
from .runtime.tensorrt_support import tensorrt_unavailable_reason, trt_logger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineBuild:
    identity: EngineIdentity
    timing_cache: dict        # {"tensorrt", "gpu", "compute_capability", "reused", "note"}


def _timing_cache(config: Any, cache_path: Path, previous: dict | None, here: EngineIdentity) -> tuple[Any, bool, str]:
    """Attach the reusable timing cache, else a fresh one; returns (cache, reused?, why not reused)."""
    why = ""
    data = cache_path.read_bytes() if cache_path.exists() else b""
    if data and previous:
        made_for = {k: previous.get(k) for k in ("tensorrt", "gpu", "compute_capability")}
        if made_for != {"tensorrt": here.tensorrt, "gpu": here.gpu, "compute_capability": here.compute_capability}:
            why = (f"it was made by TensorRT {made_for['tensorrt']} on {made_for['gpu']}, "
                   f"this is TensorRT {here.tensorrt} on {here.gpu}")
    if data and not why:
        try:
            cache = config.create_timing_cache(data)
        except (RuntimeError, TypeError, ValueError) as exc:
            cache, why = None, f"TensorRT cannot read it ({exc})"
        if cache is None and not why:
            why = "TensorRT cannot read it"
        elif cache is not None:
            if config.set_timing_cache(cache, ignore_mismatch=False):
                return cache, True, ""
            why = "TensorRT rejected it (made by another TensorRT version or GPU)"
    if why:
        log.warning("timing cache %s not reused: %s; starting a fresh one", cache_path, why)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BackendUnavailable("TensorRT could not create an empty timing cache")
    return cache, False, why or ("no cache yet" if not data else "")


def build_engine(onnx_path: Path, plan_path: Path, cache_path: Path, max_batch: int,
                 previous_cache: dict | None = None, workspace_mib: int = 2048) -> EngineBuild:
    """Compile the engine; returns the identity it was built for and what became of the timing cache.

    ``previous_cache``: the manifest's record of the timing cache beside the engine, if any.
    """
    reason = tensorrt_unavailable_reason()
    if reason:
        raise BackendUnavailable(reason)
    import tensorrt as trt

    identity = current_identity(1, max_batch)
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
    cache, reused, note = _timing_cache(config, cache_path, previous_cache, identity)
    log.info("building TensorRT engine (batch 1..%d, timing cache %s)", max_batch, "reused" if reused else "new")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelFormatError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(cache.serialize()))
    record = {"tensorrt": identity.tensorrt, "gpu": identity.gpu, "compute_capability": identity.compute_capability,
              "reused": reused, "note": note}
    return EngineBuild(identity, record)
