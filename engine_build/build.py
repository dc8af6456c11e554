"""The build as small steps over one frozen config: import, emit, quantise, compile, validate, record."""
from __future__ import annotations

import logging
import platform
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .caffe_io import iter_caffemodel, load_prototxt
from .caffe_net import Net, attach_weights, build_net
from .errors import ArtifactError, ConfigError, ValidationFailed
from .imaging import builtin_photos, decode, list_images, photo_views
from .manifest import ENGINE_FILE, FORMAT, TIMING_CACHE, VARIANT_FILES, read_manifest, sha256, write_manifest
from .onnx_graph import build_onnx
from .placeholder import PLACEHOLDER_NAME
from .preprocess import CROP_SIZE, IMAGE_SIZE, LABELS, MEAN_BGR
from .validate import as_records, blocking_failures, run_checks, table

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class BuildConfig:
    prototxt: Path | None
    caffemodel: Path | None
    output: Path
    onnx: Path | None = None            # an ONNX classifier instead of the Caffe files
    precisions: tuple[str, ...] = PRECISIONS
    oversample: bool = False
    max_batch: int = 32
    tensorrt: bool = False
    calibration_images: Path | None = None
    validation_images: Path | None = None
    thresholds: dict = field(default_factory=lambda: {"fp16": 0.995, "int8": 0.98})
    placeholder: bool | None = None     # None: detect from the caffemodel's network name
    progress: bool | None = None


def load_images(folder: Path | None, what: str) -> tuple[np.ndarray, str]:
    """Decoded 256x256 images from a folder, or views of the built-in photos."""
    if folder is None:
        return photo_views(builtin_photos()), "built-in photos (engine_build/photos, 6 views each)"
    paths = list_images(folder) if Path(folder).is_dir() else []
    if not paths:
        raise ConfigError(f"--{what}-images {folder}: no JPEG/PNG/WebP/BMP/TIFF files there")
    return np.stack([decode(p.read_bytes()) for p in paths]), str(folder)


def import_caffe(cfg: BuildConfig) -> tuple[Net, bool]:
    """Parse the deploy prototxt and attach the caffemodel's weights; returns (net, placeholder?)."""
    proto = load_prototxt(cfg.prototxt)
    net = build_net(proto)
    ignored = attach_weights(net, iter_caffemodel(cfg.caffemodel, progress=cfg.progress))
    if ignored:
        log.info("ignored caffemodel layers not in the deploy net: %s", ", ".join(ignored))
    placeholder = cfg.placeholder if cfg.placeholder is not None else PLACEHOLDER_NAME in (proto.name or "")
    if net.output_shape != (len(LABELS),):
        raise ConfigError(f"the net outputs {list(net.output_shape)} values; a sentiment model has {len(LABELS)}")
    if net.input_shape != (3, CROP_SIZE, CROP_SIZE):
        raise ConfigError(f"the net takes {list(net.input_shape)}; the authors' preprocessing needs [3, {CROP_SIZE}, {CROP_SIZE}]")
    return net, placeholder


def emit_onnx(cfg: BuildConfig, source, placeholder: bool,
              calibration: tuple[np.ndarray, str] | None = None) -> tuple[dict[str, Path], dict | None]:
    """model.onnx and model.fp16.onnx from an imported Caffe ``Net`` or an ONNX classifier.

    The FP16 file follows the FP16 range audit of model.onnx on ``calibration`` (images, source);
    returns the paths and the audit's manifest record (None without FP16).
    """
    from .onnx_import import wrap_classifier
    from .range_audit import audit, kept_float32, record
    meta = {"placeholder": str(placeholder).lower(), "labels": ",".join(LABELS), "oversample": str(cfg.oversample).lower()}
    emit = build_onnx if isinstance(source, Net) else wrap_classifier
    paths = {"fp32": cfg.output / VARIANT_FILES["fp32"]}
    onnx.save(emit(source, cfg.oversample, "float32", {**meta, "precision": "fp32"}), paths["fp32"])
    if "fp16" not in cfg.precisions:
        return paths, None
    images, where = calibration if calibration is not None else load_images(None, "calibration")
    ranges = audit(paths["fp32"], images)
    model = emit(source, cfg.oversample, "float16", {**meta, "precision": "fp16"},
                 float32_tensors=[r.tensor for r in ranges if r.near_limit])
    float32 = kept_float32(model, ranges)
    for tensor, why in float32.items():
        (log.warning if why.startswith("NOT") else log.info)("FP16 range audit: %s: %s", tensor, why)
    paths["fp16"] = cfg.output / VARIANT_FILES["fp16"]
    onnx.save(model, paths["fp16"])
    return paths, record(ranges, len(images), where, model, float32)


def sources(cfg: BuildConfig) -> dict:
    """Path and sha256 of each input file, for the manifest."""
    files = {"onnx": cfg.onnx} if cfg.onnx else {"prototxt": cfg.prototxt, "caffemodel": cfg.caffemodel}
    return {kind: {"path": str(path), "sha256": sha256(path)} for kind, path in files.items()}


def maybe_engine(cfg: BuildConfig, fp16_path: Path | None, previous: dict | None) -> dict | None:
    """Build engine.plan (or keep a still-valid one); None with a warning when TensorRT is missing.

    The entry records the engine's identity (TensorRT, GPU, compute capability, batch range)
    and its timing cache's; a kept engine must match this machine and request field by field.
    """
    if not cfg.tensorrt:
        return None
    from .runtime.tensorrt_support import tensorrt_unavailable_reason
    reason = tensorrt_unavailable_reason()
    if reason:
        print(f"engine_build: TensorRT engine skipped: {reason}. The CPU artifacts are still built.")
        return None
    from .runtime.identity import current_identity, staleness
    from .tensorrt_build import build_engine
    plan, cache = cfg.output / ENGINE_FILE, cfg.output / TIMING_CACHE
    old = (previous or {}).get("files", {}).get("tensorrt")
    if old and plan.exists() and old.get("onnx_sha256") == sha256(fp16_path) and old.get("sha256") == sha256(plan):
        why = staleness(old.get("identity"), current_identity(1, cfg.max_batch), exact_batch=True)
        if why is None:
            log.info("engine.plan is current; kept")
            return old
        log.info("engine.plan is stale (%s); rebuilding", why)
    built = build_engine(fp16_path, plan, cache, cfg.max_batch, (old or {}).get("timing_cache"))
    return {"file": ENGINE_FILE, "precision": "fp16", "onnx_sha256": sha256(fp16_path),
            "identity": built.identity.as_dict(), "timing_cache": {"file": TIMING_CACHE, **built.timing_cache}}


def tool_versions() -> dict:
    import cv2
    import onnxruntime
    versions = {"engine_build": __version__, "python": platform.python_version(), "numpy": np.__version__,
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__}
    try:
        import openvino
        versions["openvino"] = openvino.__version__
    except ImportError:
        pass
    return versions


def check_config(cfg: BuildConfig) -> None:
    """Everything about the request that can be wrong, before any work is done."""
    bad = [p for p in cfg.precisions if p not in PRECISIONS]
    if bad:
        raise ConfigError(f"--precision {bad[0]}: choose from {', '.join(PRECISIONS)}")
    if cfg.max_batch < 1:
        raise ConfigError("--max-batch must be at least 1")
    for kind, value in cfg.thresholds.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"--{kind}-threshold {100 * value:g}: must be between 0 and 100")
    if cfg.tensorrt and "fp16" not in cfg.precisions:
        raise ConfigError("--tensorrt builds from the FP16 model: include fp16 in --precision")


def import_source(cfg: BuildConfig) -> tuple[object, bool]:
    """The Caffe net or the ONNX classifier, and whether its weights are placeholders."""
    if cfg.onnx:
        from .onnx_import import load_classifier
        model, placeholder = load_classifier(cfg.onnx), bool(cfg.placeholder)
        what = f"ONNX classifier {model.graph.name or cfg.onnx.name}: {len(model.graph.node)} nodes"
    else:
        model, placeholder = import_caffe(cfg)
        what = (f"{model.name}: {len(model.layers)} layers, "
                f"{sum(w.size for layer in model.learned() for w in layer.weights):,} weights")
    print(f"imported {what}" + ("  [PLACEHOLDER WEIGHTS]" if placeholder else ""))
    return model, placeholder


def make_manifest(cfg: BuildConfig, placeholder: bool, files: dict, validation: dict, started: float) -> dict:
    return {
        "format": FORMAT,
        "model": {"name": PLACEHOLDER_NAME if placeholder else (cfg.onnx or cfg.prototxt).stem,
                  "placeholder": placeholder, "labels": list(LABELS), "source": sources(cfg)},
        "input": {"name": "images", "dtype": "uint8", "shape": ["N", IMAGE_SIZE, IMAGE_SIZE, 3],
                  "layout": "NHWC", "channels": "BGR"},
        "outputs": {"probs": {"dtype": "float32", "shape": ["N", 2], "meaning": "softmax; index 0 negative, 1 positive"},
                    "logits": {"dtype": "float32", "shape": ["N", 2]}},
        "preprocessing": {"resize": f"{IMAGE_SIZE}x{IMAGE_SIZE} bilinear, aspect not kept (done by the caller)",
                          "mean_bgr": list(MEAN_BGR), "crop": "10 crops averaged" if cfg.oversample else "centre",
                          "crop_size": CROP_SIZE, "oversample": cfg.oversample},
        "files": files,
        "tools": tool_versions(),
        "validation": validation,
        "build": {"seconds": round(time.perf_counter() - started, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }


def run_build(cfg: BuildConfig) -> dict:
    """Every step in order; returns the manifest written (raises ValidationFailed after writing it)."""
    started = time.perf_counter()
    check_config(cfg)
    cfg.output.mkdir(parents=True, exist_ok=True)
    try:
        previous = read_manifest(cfg.output)
    except ArtifactError:
        previous = None
    model, placeholder = import_source(cfg)
    calibration = load_images(cfg.calibration_images, "calibration") if {"fp16", "int8"} & set(cfg.precisions) else None
    paths, fp16_range = emit_onnx(cfg, model, placeholder, calibration)
    del model
    if "int8" in cfg.precisions:
        from .quantize import quantize_int8
        quantize_int8(paths["fp32"], cfg.output / VARIANT_FILES["int8"], calibration[0])
        paths["int8"] = cfg.output / VARIANT_FILES["int8"]
    engine = maybe_engine(cfg, paths.get("fp16"), previous)
    # Files from an earlier build that this one did not make must not linger (the timing cache may).
    for variant, name in [*VARIANT_FILES.items(), ("tensorrt", ENGINE_FILE)]:
        if variant not in paths and not (variant == "tensorrt" and engine):
            (cfg.output / name).unlink(missing_ok=True)
    images, source = load_images(cfg.validation_images, "validation")
    _, checks = run_checks(paths, cfg.output / ENGINE_FILE if engine else None, images, cfg.thresholds)
    print(table(checks))
    files = {k: {"file": p.name, "precision": k, "sha256": sha256(p)} for k, p in paths.items()}
    if engine:
        files["tensorrt"] = {**engine, "sha256": sha256(cfg.output / ENGINE_FILE)}
    validation = {"reference": "onnxruntime model.onnx", "images": int(len(images)), "source": source,
                  "thresholds": cfg.thresholds, "checks": as_records(checks)}
    manifest = make_manifest(cfg, placeholder, files, validation, started)
    if fp16_range is not None:
        manifest["fp16_range"] = fp16_range
    write_manifest(cfg.output, manifest)
    failures = blocking_failures(checks)
    if failures:
        f = failures[0]
        raise ValidationFailed(f"validation failed: {f.variant} on {f.runtime} agrees on {100 * f.agreement:.1f}% "
                               f"of {f.images} images, needs {100 * f.threshold:.1f}% (NaN: {f.nan})")
    return manifest


def ensure_artifact(prototxt: Path, caffemodel: Path, output: Path) -> Path:
    """``output`` built from these files: kept when its manifest names the same sources, else rebuilt."""
    try:
        source = read_manifest(output)["model"]["source"]
        if (source.get("prototxt", {}).get("sha256") == sha256(prototxt)
                and source.get("caffemodel", {}).get("sha256") == sha256(caffemodel)):
            print(f"reusing artifact {output}")
            return output
    except ArtifactError:
        pass
    manifest = run_build(BuildConfig(prototxt, caffemodel, output))
    print(f"artifact written to {output} in {manifest['build']['seconds']} s")
    return output
