"""The validation gate: every variant against the FP32 reference, on every runtime.

The reference is ONNX Runtime on ``model.onnx``, run on validation photos that share no
source file with the INT8 calibration photos. Raw label agreement says little on a
two-class model: an image the reference puts at p = 0.501 flips on any rounding. So a
check passes when

- no label flips where the reference is confident (|p - 0.5| >= ``Gate.confident_margin``),
- max and mean |Δp| (over both probabilities) stay within the bounds for the precision
  actually computed (INT8, or FP16/bf16), and
- nothing is NaN or infinite;

and it reports raw agreement, the number of near-ties and how many of them flipped. The reference
has a check of its own, run first (:func:`check_reference`): it must give [N, 2] probabilities,
else the model is refused, and nothing NaN or infinite, else the build fails before anything is
compared with it and the service refuses the artifact.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .errors import BackendUnavailable, ModelFormatError
from .interrupts import checkpoint
from .preprocess import LABELS
from .runtime import open_backend
from .runtime.base import Backend, Outputs
from .runtime.cpu import this_cpu

log = logging.getLogger(__name__)
REFERENCE = ("fp32", "onnxruntime")     # (variant, runtime) that every other check is compared with


@dataclass(frozen=True)
class Bounds:
    max_abs_diff: float
    mean_abs_diff: float


@dataclass(frozen=True)
class Gate:
    """What a variant must meet; built from ``BuildConfig`` (where the defaults live)."""
    confident_margin: float
    bounds: dict[str, Bounds]      # "int8" and "fp16" (any float precision below FP32, bf16 included)

    def bounds_for(self, compute: str) -> tuple[str, Bounds]:
        kind = "int8" if "int8" in compute else "fp16"
        return kind, self.bounds[kind]


@dataclass
class Check:
    variant: str          # fp32 / fp16 / int8 / tensorrt
    runtime: str          # onnxruntime / openvino / tensorrt
    mode: str             # "exact" (file's precision) or "default" (runtime's own choice)
    compute: str          # precision actually computed
    images: int
    max_abs_diff: float
    agreement: float
    nan: bool
    passed: bool
    file: str = ""
    mean_abs_diff: float = float("nan")
    near_ties: int = 0                  # reference within confident_margin of 0.5
    near_tie_flips: int = 0
    confident_flips: list = field(default_factory=list)   # [{"image", "reference_p"}]
    limits: dict = field(default_factory=dict)            # {"max_abs_diff", "mean_abs_diff"}
    note: str = ""
    cpu: dict = field(default_factory=dict)               # where it ran: runtime.cpu.describe_cpu()

    @property
    def lowered(self) -> bool:
        """True when the runtime computes below the file's own precision (OpenVINO bf16)."""
        return self.mode == "default" and self.compute not in (self.variant, "fp32", "int8")

    @classmethod
    def from_record(cls, record: dict) -> Check:
        """The inverse of :func:`as_records` (NaN comes back from JSON null)."""
        values = {f.name: record[f.name] for f in fields(cls) if f.name in record}
        for key in ("max_abs_diff", "mean_abs_diff"):
            if values.get(key) is None:
                values[key] = float("nan")
        return cls(**values)

    def failure(self) -> str:
        """One line saying why this check failed (empty when it passed)."""
        if self.passed:
            return ""
        what = f"{self.variant} on {self.runtime} ({self.mode}, {self.file or '?'})"
        reasons = []
        if self.nan:
            reasons.append("NaN or infinity in its output")
        if self.confident_flips:
            shown = ", ".join(f"{f['image']} (FP32 p(positive) {f['reference_p']:.3f})"
                              for f in self.confident_flips[:5])
            more = f" and {len(self.confident_flips) - 5} more" if len(self.confident_flips) > 5 else ""
            reasons.append(f"{len(self.confident_flips)} label flip(s) where FP32 is confident: {shown}{more}")
        if self.max_abs_diff > self.limits.get("max_abs_diff", float("inf")):
            reasons.append(f"max |dp| {self.max_abs_diff:.4f} > {self.limits['max_abs_diff']}")
        if self.mean_abs_diff > self.limits.get("mean_abs_diff", float("inf")):
            reasons.append(f"mean |dp| {self.mean_abs_diff:.4f} > {self.limits['mean_abs_diff']}")
        return f"{what}: " + "; ".join(reasons or ["failed"])


def compare(reference: np.ndarray, probs: np.ndarray, names: list[str], gate: Gate, compute: str) -> dict:
    """The gate's measurements of ``probs`` against ``reference`` (both [N, 2]). ``nan``: NaN or infinity
    in ``probs``, or in the reference, which nothing can be compared with."""
    nan = not (np.isfinite(probs).all() and np.isfinite(reference).all())
    diff = np.abs(probs - reference)
    ref_p = reference[:, 1]
    near = np.abs(ref_p - 0.5) < gate.confident_margin
    flips = probs.argmax(1) != reference.argmax(1)
    kind, bounds = gate.bounds_for(compute)
    max_abs_diff = float(np.nanmax(diff)) if not nan else float("nan")
    mean_abs_diff = float(np.nanmean(diff)) if not nan else float("nan")
    confident_flips = [{"image": names[i], "reference_p": round(float(ref_p[i]), 4)}
                       for i in np.flatnonzero(flips & ~near)]
    result = {
        "nan": nan,
        "max_abs_diff": max_abs_diff,
        "mean_abs_diff": mean_abs_diff,
        "agreement": float(1.0 - flips.mean()),
        "near_ties": int(near.sum()),
        "near_tie_flips": int((flips & near).sum()),
        "confident_flips": confident_flips,
        "limits": asdict(bounds),
        "passed": (not nan and not confident_flips and max_abs_diff <= bounds.max_abs_diff
                   and mean_abs_diff <= bounds.mean_abs_diff),
    }
    return result


def _plan(variants: dict[str, dict[str, Path]], engine: Path | None) -> list[tuple[str, Path, str, str, bool]]:
    """(variant, file, runtime, mode, exact) for every runtime the service may use.

    ``variants`` maps a variant to its file per runtime (``"*"`` for any runtime).
    """
    plan = []
    for variant, by_runtime in variants.items():
        for runtime, mode, exact in (("onnxruntime", "exact", True), ("openvino", "exact", True),
                                     ("openvino", "default", False)):
            if (variant, runtime) == REFERENCE:
                continue    # checked by check_reference
            path = by_runtime[runtime] if runtime in by_runtime else by_runtime["*"]
            plan.append((variant, path, runtime, mode, exact))
    if engine is not None:
        plan.append(("tensorrt", engine, "tensorrt", "exact", True))
    return plan


def stoppable_infer(backend: Backend, images: np.ndarray) -> Outputs:
    """``backend.infer(images)`` a batch at a time, with a :func:`.interrupts.checkpoint` between batches."""
    parts = []
    for start in range(0, max(len(images), 1), backend.max_batch):
        checkpoint()
        parts.append(backend.infer(images[start:start + backend.max_batch]))
    return Outputs.joined(parts)


def reference_probs(fp32: Path, images: np.ndarray, max_batch: int = 16) -> np.ndarray:
    """ONNX Runtime's probabilities from ``fp32``, [N, 2]; a model that computes another shape (an ONNX
    classifier may declare [N, 2] and compute [N, 3]) is a one-line ModelFormatError."""
    with open_backend("onnxruntime", fp32, "fp32", max_batch) as ref:
        probs = stoppable_infer(ref, images).probs
    if probs.shape != (len(images), len(LABELS)):
        raise ModelFormatError(f"the model computes probabilities of shape {list(probs.shape)} for {len(images)} "
                               f"images ({Path(fp32).name} on ONNX Runtime): a sentiment model gives "
                               f"[N, {len(LABELS)}] ({', '.join(LABELS)}), whatever its output declares")
    return probs


def check_reference(fp32: Path, images: np.ndarray, names: list[str], gate: Gate,
                    max_batch: int = 16) -> tuple[np.ndarray, Check]:
    """The reference's probabilities and its own check, which passes when they are all finite: every other
    check compares with them, so a reference with NaN or infinity in it fails the build and no variant runs."""
    reference = reference_probs(fp32, images, max_batch)
    measured = compare(reference, reference, names, gate, "fp32")
    return reference, Check(*REFERENCE, "exact", "fp32", len(images), file=Path(fp32).name, cpu=this_cpu(),
                            **measured)


def run_checks(variants: dict[str, dict[str, Path]], engine: Path | None, reference: np.ndarray, images: np.ndarray,
               names: list[str], gate: Gate, max_batch: int = 16) -> list[Check]:
    """One Check per (variant, runtime, mode) but the reference's (:func:`check_reference`)."""
    checks = []
    for variant, path, runtime, _, exact in _plan(variants, engine):
        checkpoint()
        checks.append(check_one(variant, path, runtime, exact, reference, images, names, gate, max_batch))
    return checks


def check_one(variant: str, path: Path, runtime: str, exact: bool, reference: np.ndarray, images: np.ndarray,
              names: list[str], gate: Gate, max_batch: int = 16) -> Check:
    """One variant's file on one runtime (in its own precision when ``exact``) against ``reference``."""
    precision = "fp16" if variant == "tensorrt" else variant
    mode = "exact" if exact or runtime != "openvino" else "default"
    try:
        with open_backend(runtime, path, precision, max_batch, exact=exact) as backend:
            outputs = stoppable_infer(backend, images)
            compute = backend.compute_precision
    except (BackendUnavailable, ModelFormatError) as exc:
        return Check(variant, runtime, mode, "-", len(images), float("nan"), 0.0, False, False,
                     file=Path(path).name, note=f"not run: {exc}", cpu=this_cpu())
    measured = compare(reference, outputs.probs, names, gate, compute)
    log.info("checked %s on %s (%s): max |dp| %.4f", variant, runtime, mode, measured["max_abs_diff"])
    return Check(variant, runtime, mode, compute, len(images), file=Path(path).name, cpu=this_cpu(), **measured)


def gate_from_record(record: dict) -> Gate:
    """The :class:`Gate` a manifest's ``validation.gate`` describes."""
    return Gate(record["confident_margin"], {k: Bounds(**v) for k, v in record["bounds"].items()})


def blocking_failures(checks: list[Check]) -> list[Check]:
    """Checks that fail the build: a variant wrong in its own precision.

    Runtimes that lower precision on their own (OpenVINO bf16) are gates for the
    service instead: it refuses them unless they passed, or runs the exact mode.
    A runtime that could not open a file is not a failure of that file.
    """
    return [c for c in checks if not c.passed and not c.lowered and not c.note]


def table(checks: list[Check]) -> str:
    """The gate's results as a text table, with a line per failure and per check not run."""
    rows = [("variant", "runtime", "mode", "computes", "file", "images", "max|dp|", "mean|dp|", "agree",
             "near-ties (flipped)", "confident flips", "NaN", "result")]
    for c in checks:
        ran = not c.note
        rows.append((c.variant, c.runtime, c.mode, c.compute, c.file, str(c.images),
                     f"{c.max_abs_diff:.2e}" if ran else "-", f"{c.mean_abs_diff:.2e}" if ran else "-",
                     f"{100 * c.agreement:.1f}%" if ran else "-", f"{c.near_ties} ({c.near_tie_flips})" if ran else "-",
                     str(len(c.confident_flips)) if ran else "-", "yes" if c.nan else "no",
                     ("PASS" if c.passed else "FAIL") if ran else "n/a"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {c.variant}/{c.runtime}: {c.note}" for c in checks if c.note]
    failures = [f"  FAIL {c.failure()}" for c in checks if not c.passed and not c.note]
    return "\n".join(lines + failures + notes)


def as_records(checks: list[Check]) -> list[dict]:
    """JSON-ready dicts (NaN becomes null), with the derived ``lowered`` flag."""
    out = []
    for c in checks:
        record = asdict(c)
        record["lowered"] = c.lowered
        for key in ("max_abs_diff", "mean_abs_diff"):
            if record[key] != record[key]:   # NaN is not JSON
                record[key] = None
        out.append(record)
    return out
