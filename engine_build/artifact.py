"""Open a built artifact for inference: verify it, pick backend and variant, respect the gate.

Shared by ``evaluate``, the stream service and the benchmarks, so all three make the
same choice for the same artifact and machine.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import ArtifactError, ConfigError
from .manifest import Manifest, verify_file
from .recheck import needs_recheck, recheck
from .runtime import Backend, available_backends, open_backend
from .validate import REFERENCE, Check

log = logging.getLogger(__name__)
BACKENDS = ("auto", "tensorrt", "openvino", "onnxruntime")
# Fastest first, per runtime, among variants of equal trust.
_CPU_ORDER = ("int8", "fp32", "fp16")


@dataclass(frozen=True)
class Selection:
    backend: str
    precision: str
    file: Path
    exact: bool
    reason: str
    sha256: str = ""       # of ``file``, from the manifest (a variant may have a file per runtime)


def gate_passed(manifest: Manifest, variant: str, runtime: str, exact: bool) -> bool | None:
    """Did (variant, runtime, mode) pass validation? None when it was never checked (the reference,
    FP32 on ONNX Runtime, included: a manifest written before it had a check of its own has no record)."""
    record = manifest.check_record(variant, runtime, exact)
    return None if record is None else record["passed"] is True


def _refuse_a_failed_reference(directory: Path, manifest: Manifest) -> None:
    """A one-line refusal of an artifact whose reference failed its check: no variant was compared with it."""
    record = manifest.check_record(*REFERENCE, True)
    if record is not None and record["passed"] is not True:
        raise ArtifactError(f"{directory} failed validation when it was built: {Check.from_record(record).failure()}; "
                            "nothing in it may run: rebuild it from a model whose outputs are finite")


def _tensorrt_choice(directory: Path, manifest: Manifest, explicit: bool, max_batch: int | None) -> Selection | None:
    entry = manifest.files.get("tensorrt")
    if entry is None:
        if explicit:
            raise ArtifactError(f"{directory} has no TensorRT engine: rebuild with --tensorrt on a GPU machine")
        return None
    reason = available_backends()["tensorrt"]
    if reason:
        if explicit:
            raise ArtifactError(f"--backend tensorrt: {reason}")
        log.info("not using the TensorRT engine: %s", reason)
        return None
    from .runtime.identity import check_engine, current_identity
    # stale engines are refused, never loaded: field by field against this machine and batch size
    check_engine(entry.identity, current_identity(1, max_batch or 1), exact_batch=False)
    passed = gate_passed(manifest, "tensorrt", "tensorrt", True)
    if passed is not True:
        raise ArtifactError(f"engine.plan {'failed' if passed is False else 'has no record of'} its validation "
                            "gate; rebuild it with python -m engine_build build --tensorrt")
    return Selection("tensorrt", "fp16", directory / entry.file, True, "TensorRT engine and a GPU are present",
                     entry.sha256)


def select(directory: Path, backend: str = "auto", precision: str | None = None, exact: bool = False,
           max_batch: int | None = None) -> tuple[Manifest, Selection]:
    """Choose what to run; raises a one-line UserError when the request cannot be honoured."""
    directory = Path(directory)
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: choose from {', '.join(BACKENDS)}")
    manifest = Manifest.read(directory)
    _refuse_a_failed_reference(directory, manifest)
    files = manifest.files
    if backend in ("auto", "tensorrt") and precision in (None, "fp16"):
        choice = _tensorrt_choice(directory, manifest, backend == "tensorrt", max_batch)
        if choice:
            return manifest, choice
    elif backend == "tensorrt":
        raise ConfigError(f"--backend tensorrt runs the FP16 engine; --precision {precision} is not available there")
    if backend != "auto":
        runtimes = [backend]
    else:
        runtimes = [b for b in ("openvino", "onnxruntime") if not available_backends()[b]]
    if not runtimes:
        raise ArtifactError("no inference runtime is installed (pip install openvino onnxruntime)")
    candidates = [precision] if precision else [p for p in _CPU_ORDER if p in files]
    refused = []
    for runtime in runtimes:
        reason = available_backends()[runtime]
        if reason:
            raise ConfigError(f"--backend {runtime}: {reason}")
        for variant in candidates:
            if variant not in files:
                built = ", ".join(k for k in files if k != "tensorrt")
                raise ArtifactError(f"{directory} has no {variant} variant (built: {built})")
            passed = gate_passed(manifest, variant, runtime, exact)
            if passed:
                why = ("explicit request" if precision else "fastest variant that passed its gate") + \
                      (f", {runtime} chosen automatically" if backend == "auto" else "")
                entry = manifest.variant_entry(variant, runtime)
                return manifest, Selection(runtime, variant, directory / entry.file, exact, why, entry.sha256)
            unchecked = "never validated" + (" (the artifact predates the reference's own check: rebuild it)"
                                             if (variant, runtime) == REFERENCE else "")
            refused.append(f"{variant} on {runtime}{'' if exact or runtime != 'openvino' else ' (lowered precision)'}: "
                           + ("failed its validation gate" if passed is False else unchecked))
    hint = "" if exact else "; --exact-precision runs the file's own precision"
    raise ArtifactError(f"nothing in {directory} may run here: {'; '.join(refused)}{hint}")


def open_artifact(directory: Path, backend: str = "auto", precision: str | None = None, exact: bool = False,
                  max_batch: int = 32, threads: int | None = None,
                  streams: int = 1, latency_lane: bool = True) -> tuple[Manifest, Selection, Backend]:
    """Verify, select and open; the file's sha256 is checked against the manifest first.

    A variant computing below FP32 that was validated on a CPU with other extensions is checked
    again here first (:mod:`.recheck`); one that fails is refused: an explicit ``precision`` ends
    with a one-line error, otherwise FP32 runs instead.
    """
    manifest, choice = select(directory, backend, precision, exact, max_batch)
    key = "tensorrt" if choice.backend == "tensorrt" else choice.precision
    verify_file(Path(directory), manifest.variant_entry(key, choice.backend))
    choice = _valid_here(Path(directory), manifest, choice, backend, precision, max_batch)
    opened = open_backend(choice.backend, choice.file, choice.precision, max_batch, exact=choice.exact, threads=threads,
                          streams=streams, latency_lane=latency_lane)
    log.info("running %s (%s)", opened.describe(), choice.reason)
    return manifest, choice, opened


def _valid_here(directory: Path, manifest: Manifest, choice: Selection, backend: str, precision: str | None,
                max_batch: int) -> Selection:
    """``choice`` when its validation holds on this CPU (re-checked if the CPU differs), else FP32 run exactly."""
    why = needs_recheck(manifest, choice.precision, choice.backend, choice.exact)
    if why is None:
        return choice
    lowered = choice.backend == "openvino" and not choice.exact
    what = f"{choice.precision} on {choice.backend}{' (runtime default)' if lowered else ''}"
    log.info("re-checking %s before use: %s (built-in validation photos, a few seconds)", what, why)
    check = recheck(directory, manifest, choice.precision, choice.backend, choice.file, choice.exact,
                    min(max_batch, 16))
    if check.passed:
        log.info("re-check passed on this CPU: %s max |dp| %.4f, mean %.4f, no confident flip",
                 what, check.max_abs_diff, check.mean_abs_diff)
        return choice
    refused = f"{what} fails its gate on this CPU ({why}): {check.note or check.failure()}"
    if precision is not None:
        raise ArtifactError(refused)
    log.warning("%s; running fp32 instead", refused)
    _, fallback = select(directory, choice.backend, "fp32", True, max_batch)
    return replace(fallback, reason=f"{what} failed its re-check on this CPU")
