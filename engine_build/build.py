"""The build as small steps over one frozen config: import, emit, quantise, compile, validate, record.

Steps log and return values; only the CLI prints. The artifact is made in a staging folder
inside ``output`` (:mod:`.staging`) and moved into place only when complete, so a build that fails
on the way (a bad file, an interrupt, a crash) leaves the previous artifact, or nothing, behind.
"""
from __future__ import annotations

import logging
import os
import platform
import resource
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .caffe_io import iter_caffemodel, load_prototxt
from .caffe_net import Net, attach_weights, build_net
from .config import PRECISIONS, BuildConfig
from .errors import ArtifactError, ConfigError, ValidationFailed
from .imagesets import ImageSet, load_sets
from .interrupts import checkpoint, stop_at_checkpoints, uninterrupted
from .manifest import (
    ENGINE_FILE,
    MANIFEST,
    RUNTIME_FILES,
    TIMING_CACHE,
    VARIANT_FILES,
    BuildInfo,
    FileEntry,
    ImagesUsed,
    Manifest,
    ModelInfo,
    Preprocessing,
    SourceFile,
    Validation,
    sha256,
)
from .onnx_graph import build_onnx
from .placeholder import PLACEHOLDER_NAME
from .preprocess import CROP_SIZE, IMAGE_SIZE, LABELS, MEAN_BGR
from .staging import staging_folder
from .validate import REFERENCE, as_records, blocking_failures, check_reference, run_checks

log = logging.getLogger(__name__)
__all__ = ["BuildConfig", "PRECISIONS", "run_build", "ensure_artifact"]
# The sensitivity pass aims at this share of --int8-max-diff on held-out calibration photos, leaving
# the rest for photos further from the calibration set than its folds are from each other.
SENSITIVITY_MARGIN = 0.75
# Every file a build may write; files of an earlier build that this one did not make are removed.
ARTIFACT_FILES = (*VARIANT_FILES.values(), *RUNTIME_FILES.values(), ENGINE_FILE, MANIFEST)
# Every file a build may replace in its output: those, and the timing cache it carries on.
WRITTEN_FILES = (*ARTIFACT_FILES, TIMING_CACHE)


def check_inputs(cfg: BuildConfig) -> tuple[ImageSet | None, ImageSet]:
    """Every input file and folder, before any work: returns the calibration and validation sets."""
    for path, flag in ((cfg.prototxt, "--prototxt"), (cfg.caffemodel, "--caffemodel"), (cfg.onnx, "--onnx")):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    if cfg.output.exists() and not cfg.output.is_dir():
        raise ConfigError(f"--output {cfg.output}: is a file; give a directory for the artifact")
    for path, flag in ((cfg.prototxt, "--prototxt"), (cfg.caffemodel, "--caffemodel"), (cfg.onnx, "--onnx")):
        name = written_over(path, cfg.output) if path is not None else None
        if name:
            raise ConfigError(f"{flag} {path}: the build would overwrite or delete it (it is {name} of --output "
                              f"{cfg.output}); move it out of that folder or give another --output")
    # calibration images feed INT8 quantisation and the FP16 range audit; given to an fp32 build, they are
    # checked all the same (a mistyped folder in a deploy script shows at once, not at its first int8 build)
    needed = bool({"fp16", "int8"} & set(cfg.precisions))
    sets = load_sets(cfg.calibration_images, cfg.validation_images, needed, disjoint="int8" in cfg.precisions)
    if cfg.calibration_images and not needed:
        log.info("--calibration-images %s: checked, not read (an fp32 build calibrates nothing)",
                 cfg.calibration_images)
    if cfg.int8_float_layers is not None and "int8" not in cfg.precisions:
        log.info("--int8-float-layers: not used without int8 in --precision (its names are still checked)")
    return sets


def written_over(path: Path, output: Path) -> str | None:
    """The name of the file a build into ``output`` would replace or remove that ``path`` is, symlinks followed
    (both the link's own place and the file it leads to), else None."""
    names = {output.resolve() / name: name for name in WRITTEN_FILES}
    return names.get(path.parent.resolve() / path.name) or names.get(path.resolve())


def caffe_files(cfg: BuildConfig) -> tuple[Path, Path]:
    """The prototxt and caffemodel of a build without ``--onnx`` (BuildConfig requires both there)."""
    if cfg.prototxt is None or cfg.caffemodel is None:
        raise ConfigError("give either --prototxt and --caffemodel, or --onnx")
    return cfg.prototxt, cfg.caffemodel


def import_caffe(cfg: BuildConfig) -> tuple[Net, bool]:
    """Parse the deploy prototxt and attach the caffemodel's weights; returns (net, placeholder?)."""
    prototxt, caffemodel = caffe_files(cfg)
    proto = load_prototxt(prototxt)
    net = build_net(proto)
    ignored = attach_weights(net, iter_caffemodel(caffemodel, progress=cfg.progress))
    if ignored:
        log.info("ignored caffemodel layers not in the deploy net: %s", ", ".join(ignored))
    placeholder = cfg.placeholder if cfg.placeholder is not None else PLACEHOLDER_NAME in (proto.name or "")
    if net.output_shape != (len(LABELS),):
        raise ConfigError(f"the net outputs {list(net.output_shape)} values; a sentiment model has {len(LABELS)}")
    if net.input_shape != (3, CROP_SIZE, CROP_SIZE):
        raise ConfigError(f"the net takes {list(net.input_shape)}; "
                          f"the authors' preprocessing needs [3, {CROP_SIZE}, {CROP_SIZE}]")
    return net, placeholder


def import_source(cfg: BuildConfig) -> tuple[Net | onnx.ModelProto, bool]:
    """The Caffe net or the ONNX classifier, and whether its weights are placeholders."""
    model: Net | onnx.ModelProto
    log.info("importing %s", cfg.onnx if cfg.onnx else f"{cfg.prototxt} and {cfg.caffemodel}")
    if cfg.onnx:
        from .onnx_import import load_classifier
        model, placeholder = load_classifier(cfg.onnx), bool(cfg.placeholder)
        what = f"ONNX classifier {model.graph.name or cfg.onnx.name}: {len(model.graph.node)} nodes"
    else:
        net, placeholder = import_caffe(cfg)
        what = (f"{net.name}: {len(net.layers)} layers, "
                f"{sum(w.size for layer in net.learned() for w in layer.weights):,} weights")
        model = net
    log.info("imported %s%s", what, "  [PLACEHOLDER WEIGHTS]" if placeholder else "")
    return model, placeholder


def emit_variant(cfg: BuildConfig, source: Net | onnx.ModelProto, placeholder: bool, dtype: str,
                 float32_tensors: Collection[str] = ()) -> onnx.ModelProto:
    """The whole graph, preprocessing folded in, from an imported Caffe ``Net`` or an ONNX classifier."""
    from .onnx_import import wrap_classifier
    meta = {"placeholder": str(placeholder).lower(), "labels": ",".join(LABELS),
            "oversample": str(cfg.oversample).lower(), "precision": "fp32" if dtype == "float32" else "fp16"}
    if isinstance(source, Net):
        return build_onnx(source, cfg.oversample, dtype, meta, float32_tensors=float32_tensors)
    return wrap_classifier(source, cfg.oversample, dtype, meta, float32_tensors=float32_tensors)


def emit_fp32(cfg: BuildConfig, source: Net | onnx.ModelProto, placeholder: bool) -> Path:
    """model.onnx, the FP32 reference every other variant is judged against."""
    path = cfg.output / VARIANT_FILES["fp32"]
    log.info("writing %s (FP32, the authors' preprocessing folded in)", path.name)
    onnx.save(emit_variant(cfg, source, placeholder, "float32"), path)
    return path


def emit_fp16(cfg: BuildConfig, source: Net | onnx.ModelProto, placeholder: bool, fp32: Path,
              calibration: ImageSet) -> tuple[Path, dict]:
    """model.fp16.onnx, after the FP16 range audit of model.onnx on the calibration images; returns its
    path and the audit's manifest record."""
    from .range_audit import audit, kept_float32, record
    log.info("FP16 range audit: %s on %d calibration images", fp32.name, len(calibration.images))
    ranges = audit(fp32, calibration.images)
    checkpoint()
    model = emit_variant(cfg, source, placeholder, "float16",
                         float32_tensors=[r.tensor for r in ranges if r.near_limit])
    float32 = kept_float32(model, ranges)
    for tensor, why in float32.items():
        (log.warning if why.startswith("NOT") else log.info)("FP16 range audit: %s: %s", tensor, why)
    path = cfg.output / VARIANT_FILES["fp16"]
    log.info("writing %s (FP16, %d tensors kept float32)", path.name, len(float32))
    onnx.save(model, path)
    return path, record(ranges, len(calibration.images), calibration.source, model, float32)


def check_float_layers(cfg: BuildConfig, fp32: Path) -> None:
    """``--int8-float-layers`` names only quantisable layers of model.onnx, whatever the precision: checked
    as soon as model.onnx exists, before the FP16 range audit and any quantisation (which relies on it)."""
    if cfg.int8_float_layers:
        from .quantize import quantizable_layers
        layers = quantizable_layers(onnx.load(str(fp32), load_external_data=False).graph)
        unknown = [name for name in cfg.int8_float_layers if name not in layers]
        if unknown:
            raise ConfigError(f"--int8-float-layers {unknown[0]}: not a quantisable layer of {fp32.name} "
                              f"(its layers: {', '.join(layers)})")


def quantize_variants(cfg: BuildConfig, fp32: Path, calibration: ImageSet) -> tuple[dict[str, Path], dict, dict]:
    """The INT8 file(s): runtime -> file (``"*"`` for every runtime), how each was made, and which
    layers stayed in float (the sensitivity pass's record, :mod:`.sensitivity`).

    ``auto``: NNCF's file (bias correction; fastest on OpenVINO) for every runtime but ONNX
    Runtime, which gets the MinMax file its fusions expect (NNCF's runs at about half speed
    there); ``benchmarks/throughput.py`` measures both files on both runtimes. Each file keeps
    in float what its own sensitivity pass chose.
    """
    from .quantize import output_layers, quantizable_layers, quantize_minmax, quantize_nncf
    from .sensitivity import choose_float_layers
    graph = onnx.load(str(fp32), load_external_data=False).graph
    layers = quantizable_layers(graph)
    made_by = {"nncf": (quantize_nncf, "openvino"), "minmax": (quantize_minmax, "onnxruntime")}
    used = ["nncf", "minmax"] if cfg.int8_quantizer == "auto" else [cfg.int8_quantizer]
    if cfg.int8_float_layers is None:
        passes = {name: choose_float_layers(fp32, calibration, cfg.int8_max_diff * SENSITIVITY_MARGIN,
                                            cfg.int8_max_diff, made_by[name][0], made_by[name][1], layers, cfg.output,
                                            always_float=output_layers(graph))
                  for name in used}
        float_layers = {name: p.float_layers for name, p in passes.items()}
        record = {"chosen_by": "sensitivity pass", "float_layers": {k: list(v) for k, v in float_layers.items()},
                  "passes": {name: p.record() for name, p in passes.items()}}
    else:   # names checked by check_float_layers, right after model.onnx was written
        float_layers = {name: cfg.int8_float_layers for name in used}
        record = {"chosen_by": "--int8-float-layers",
                  "float_layers": {name: list(cfg.int8_float_layers) for name in used}}
    for name, kept in float_layers.items():
        if kept:
            log.info("INT8 (%s) keeps %s in float", name, ", ".join(kept))
    main = cfg.output / VARIANT_FILES["int8"]
    if cfg.int8_quantizer == "minmax":
        return {"*": main}, {"*": quantize_minmax(fp32, main, calibration.images, float_layers["minmax"])}, record
    files, made = {"*": main}, {"*": quantize_nncf(fp32, main, calibration.images, float_layers["nncf"])}
    if cfg.int8_quantizer == "auto":
        own = cfg.output / RUNTIME_FILES[("int8", "onnxruntime")]
        files["onnxruntime"] = own
        made["onnxruntime"] = quantize_minmax(fp32, own, calibration.images, float_layers["minmax"])
    return files, made, record


Quantize = Callable[[BuildConfig, Path, ImageSet], tuple[dict[str, Path], dict, dict]]   # as quantize_variants


def file_entries(variants: dict[str, dict[str, Path]], quantizers: dict, engine: FileEntry | None,
                 output: Path) -> dict[str, FileEntry]:
    """The manifest's ``files``: one entry per variant, with per-runtime files under ``by_runtime``."""
    files = {}
    for key, by_runtime in variants.items():
        main = by_runtime["*"]
        if key == "int8":
            own = {runtime: FileEntry(path.name, sha256(path), quantizer=quantizers[runtime])
                   for runtime, path in by_runtime.items() if runtime != "*"}
            files[key] = FileEntry(main.name, sha256(main), key, quantizer=quantizers["*"], by_runtime=own)
        else:
            files[key] = FileEntry(main.name, sha256(main), key)
    if engine:
        files["tensorrt"] = replace(engine, sha256=sha256(output / ENGINE_FILE))
    return files


def sources(cfg: BuildConfig) -> dict[str, SourceFile]:
    """Path and sha256 of each input file, for the manifest."""
    if cfg.onnx:
        files = {"onnx": cfg.onnx}
    else:
        prototxt, caffemodel = caffe_files(cfg)
        files = {"prototxt": prototxt, "caffemodel": caffemodel}
    return {kind: SourceFile(str(path), sha256(path)) for kind, path in files.items()}


def maybe_engine(cfg: BuildConfig, fp16_path: Path | None, previous: Manifest | None,
                 notes: list[str]) -> FileEntry | None:
    """Build engine.plan (or keep a still-valid one); None, with a note, when TensorRT is missing.

    The entry records the engine's identity (TensorRT, GPU, compute capability, batch range)
    and its timing cache's; a kept engine must match this machine and request field by field.
    """
    if not cfg.tensorrt:
        return None
    from .runtime.tensorrt_support import tensorrt_unavailable_reason
    reason = tensorrt_unavailable_reason()
    if reason:
        notes.append(f"TensorRT engine skipped: {reason}. The CPU artifacts are still built.")
        return None
    assert fp16_path is not None, "--tensorrt builds from the FP16 model (checked with the config)"
    from .runtime.identity import current_identity, staleness
    from .tensorrt_build import build_engine
    plan, cache = cfg.output / ENGINE_FILE, cfg.output / TIMING_CACHE
    old = previous.files.get("tensorrt") if previous else None
    if old and plan.exists() and old.onnx_sha256 == sha256(fp16_path) and old.sha256 == sha256(plan):
        why = staleness(old.identity, current_identity(1, cfg.max_batch), exact_batch=True)
        if why is None:
            log.info("engine.plan is current; kept")
            return old
        log.info("engine.plan is stale (%s); rebuilding", why)
    built = build_engine(fp16_path, plan, cache, cfg.max_batch, old.timing_cache if old else None)
    return FileEntry(ENGINE_FILE, "", "fp16", onnx_sha256=sha256(fp16_path), identity=built.identity.as_dict(),
                     timing_cache={"file": TIMING_CACHE, **built.timing_cache})


def tool_versions() -> dict:
    """Versions of everything that shaped the files, for the manifest."""
    import cv2
    import onnxruntime
    versions = {"engine_build": __version__, "python": platform.python_version(), "numpy": np.__version__,
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__}
    for name in ("openvino", "nncf"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def make_manifest(cfg: BuildConfig, placeholder: bool, files: dict[str, FileEntry], calibration: ImagesUsed | None,
                  validation: Validation, started: float, notes: list[str], fp16_range: dict | None = None,
                  int8: dict | None = None) -> Manifest:
    """Everything an artifact's user (the service, ``inspect``, a person) needs to trust it."""
    return Manifest.create(
        model=ModelInfo(PLACEHOLDER_NAME if placeholder else (cfg.onnx or caffe_files(cfg)[0]).stem,
                        placeholder, tuple(LABELS), sources(cfg)),
        preprocessing=Preprocessing(f"{IMAGE_SIZE}x{IMAGE_SIZE} bilinear, aspect not kept (done by the caller)",
                                    tuple(MEAN_BGR), "10 crops averaged" if cfg.oversample else "centre",
                                    CROP_SIZE, cfg.oversample),
        files=files, tools=tool_versions(), calibration=calibration, validation=validation,
        build=BuildInfo(round(time.perf_counter() - started, 1),
                        round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                        datetime.now(timezone.utc).isoformat(timespec="seconds"), tuple(notes)),
        fp16_range=fp16_range, int8=int8)


def run_build(cfg: BuildConfig, quantize: Quantize = quantize_variants) -> Manifest:
    """Every step in order; returns the manifest written. ``quantize`` makes the INT8 files
    (:func:`quantize_variants`; a test hands in one that fails, to fail a build half way).

    Raises ValidationFailed (carrying the manifest) after writing a complete artifact whose
    manifest records the failure, so that the failing variant is never used. Where the reference itself
    failed nothing in the artifact could run: nothing is published, and a previous artifact stays.
    """
    started = time.perf_counter()
    with stop_at_checkpoints():   # SIGTERM or Ctrl-C: the build stops at its next checkpoint, publishing nothing
        calibration, validation = check_inputs(cfg)
        checkpoint()
        with staging_folder(cfg.output) as staging:   # inside the output: on its file system, whatever it is
            manifest = _build_in(replace(cfg, output=staging), cfg.output, calibration, validation, started,
                                 quantize)
            checkpoint()
            checks = _checks(manifest)
            if _reference_passed(checks):   # else it would replace a previous artifact with one nothing runs of
                with uninterrupted():   # never half published: a signal now leaves the build complete
                    _publish(staging, cfg.output)
    failures = [c.failure() for c in blocking_failures(checks)]
    if failures:
        raise ValidationFailed("validation failed: " + failures[0]
                               + (f" (and {len(failures) - 1} more failing checks)" if len(failures) > 1 else ""),
                               manifest=manifest.raw)
    return manifest


def _reference_passed(checks: list) -> bool:
    return any((c.variant, c.runtime) == REFERENCE and c.passed for c in checks)


def _checks(manifest: Manifest) -> list:
    from .validate import Check
    return [Check.from_record(c) for c in manifest.validation.checks]


def _build_in(cfg: BuildConfig, final: Path, calibration: ImageSet | None, validation: ImageSet,
              started: float, quantize: Quantize) -> Manifest:
    """The whole build into ``cfg.output``, a fresh staging folder that will become ``final``."""
    previous = _carry_engine(final, cfg.output)
    model, placeholder = import_source(cfg)
    checkpoint()
    emitted = {"fp32": emit_fp32(cfg, model, placeholder)}
    check_float_layers(cfg, emitted["fp32"])
    checkpoint()
    fp16_range: dict | None = None
    if "fp16" in cfg.precisions:
        if calibration is None:
            raise ConfigError("the FP16 range audit needs calibration images")
        emitted["fp16"], fp16_range = emit_fp16(cfg, model, placeholder, emitted["fp32"], calibration)
    del model
    checkpoint()
    gate = cfg.gate()
    log.info("checking the reference, ONNX Runtime on %s, on %d validation images", VARIANT_FILES["fp32"],
             len(validation.images))
    reference, checked = check_reference(emitted["fp32"], validation.images, validation.names, gate)
    checks = [checked]
    checkpoint()
    variants: dict[str, dict[str, Path]] = {k: {"*": p} for k, p in emitted.items()}
    quantizers: dict = {}
    int8_record: dict | None = None
    notes: list[str] = []
    engine = None
    if checked.passed:      # else nothing can be compared with it: the manifest records the failure
        if "int8" in cfg.precisions:
            if calibration is None:
                raise ConfigError("INT8 quantisation needs calibration images")
            variants["int8"], quantizers, int8_record = quantize(cfg, emitted["fp32"], calibration)
            checkpoint()
        engine = maybe_engine(cfg, emitted.get("fp16"), previous, notes)
        checkpoint()
        log.info("validating every variant on every runtime against ONNX Runtime FP32, %d images",
                 len(validation.images))
        checks += run_checks(variants, cfg.output / ENGINE_FILE if engine else None, reference, validation.images,
                             validation.names, gate)
    if not engine:
        (cfg.output / ENGINE_FILE).unlink(missing_ok=True)
    files = file_entries(variants, quantizers, engine, cfg.output)
    used = validation.record()
    validation_record = Validation(used.source, used.images, used.image_sha256, "onnxruntime model.onnx",
                                   {"confident_margin": gate.confident_margin,
                                    "bounds": {k: vars(b) for k, b in gate.bounds.items()}},
                                   tuple(as_records(checks)))
    manifest = make_manifest(cfg, placeholder, files, calibration.record() if calibration else None,
                             validation_record, started, notes, fp16_range, int8_record)
    manifest.write(cfg.output)
    return manifest


def _carry_engine(old: Path, staging: Path) -> Manifest | None:
    """The previous build's manifest, with its engine and timing cache copied in for reuse."""
    try:
        previous: Manifest | None = Manifest.read(old)
    except ArtifactError:
        previous = None
    for name in (ENGINE_FILE, TIMING_CACHE):
        if (old / name).is_file():
            shutil.copy2(old / name, staging / name)
    return previous


def _publish(staging: Path, output: Path) -> None:
    """Move a finished artifact into ``output``: files first, the manifest last; stale files go."""
    output.mkdir(parents=True, exist_ok=True)
    made = {p.name for p in staging.iterdir()}
    for name in sorted(made - {MANIFEST}) + [MANIFEST]:
        os.replace(staging / name, output / name)
    for name in ARTIFACT_FILES:
        if name not in made:
            (output / name).unlink(missing_ok=True)


def ensure_artifact(prototxt: Path, caffemodel: Path, output: Path) -> Path:
    """``output`` built from these files: kept when its manifest names the same sources, else rebuilt."""
    try:
        source = Manifest.read(output).model.source
        if (getattr(source.get("prototxt"), "sha256", None) == sha256(prototxt)
                and getattr(source.get("caffemodel"), "sha256", None) == sha256(caffemodel)):
            log.info("reusing artifact %s", output)
            return output
    except ArtifactError:
        pass
    manifest = run_build(BuildConfig(prototxt=prototxt, caffemodel=caffemodel, output=output))
    log.info("artifact written to %s in %s s", output, manifest.build.seconds)
    return output
