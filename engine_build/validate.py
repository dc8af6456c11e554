"""The validation gate: every variant against the FP32 reference, on every runtime.

The reference is ONNX Runtime on ``model.onnx``. A check records the largest absolute
difference of ``probs``, the share of images whose label agrees, and whether any
output was NaN. A check passes when agreement reaches the threshold for the precision
actually computed (INT8 or not) and nothing is NaN.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import BackendUnavailable, ModelFormatError
from .runtime import open_backend
from .runtime.base import Outputs

log = logging.getLogger(__name__)


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
    threshold: float
    passed: bool
    note: str = ""

    @property
    def lowered(self) -> bool:
        """True when the runtime computes below the file's own precision (OpenVINO bf16)."""
        return self.mode == "default" and self.compute not in (self.variant, "fp32", "int8")


def compare(reference: np.ndarray, outputs: Outputs) -> tuple[float, float, bool]:
    probs = outputs.probs
    nan = bool(np.isnan(probs).any())
    diff = float(np.nanmax(np.abs(probs - reference))) if not nan else float("nan")
    agreement = float((probs.argmax(1) == reference.argmax(1)).mean())
    return diff, agreement, nan


def _plan(variants: dict[str, Path], engine: Path | None) -> list[tuple[str, Path, str, str, bool]]:
    """(variant, file, runtime, mode, exact) for every runtime the service may use."""
    plan = []
    for variant, path in variants.items():
        if variant != "fp32":   # fp32 on ONNX Runtime is the reference itself
            plan.append((variant, path, "onnxruntime", "exact", True))
        plan.append((variant, path, "openvino", "exact", True))
        plan.append((variant, path, "openvino", "default", False))
    if engine is not None:
        plan.append(("tensorrt", engine, "tensorrt", "exact", True))
    return plan


def run_checks(variants: dict[str, Path], engine: Path | None, images: np.ndarray,
               thresholds: dict[str, float], max_batch: int = 16) -> tuple[np.ndarray, list[Check]]:
    """Reference probabilities and one Check per (variant, runtime, mode)."""
    with open_backend("onnxruntime", variants["fp32"], "fp32", max_batch) as ref:
        reference = ref.infer(images).probs
    checks = []
    for variant, path, runtime, mode, exact in _plan(variants, engine):
        precision = "fp16" if variant == "tensorrt" else variant
        try:
            with open_backend(runtime, path, precision, max_batch, exact=exact) as backend:
                outputs = backend.infer(images)
                compute = backend.compute_precision
        except (BackendUnavailable, ModelFormatError) as exc:
            checks.append(Check(variant, runtime, mode, "-", len(images), float("nan"), 0.0, False, 0.0,
                                False, note=f"not run: {exc}"))
            continue
        diff, agreement, nan = compare(reference, outputs)
        threshold = thresholds["int8"] if "int8" in compute else thresholds["fp16"]
        checks.append(Check(variant, runtime, mode, compute, len(images), diff, agreement, nan, threshold,
                            passed=(not nan and agreement >= threshold)))
    return reference, checks


def blocking_failures(checks: list[Check]) -> list[Check]:
    """Checks that fail the build: a variant wrong in its own precision.

    Runtimes that lower precision on their own (OpenVINO bf16) are gates for the
    service instead: it refuses them unless they passed, or runs the exact mode.
    A runtime that could not open a file is not a failure of that file.
    """
    return [c for c in checks if not c.passed and not c.lowered and not c.note]


def table(checks: list[Check]) -> str:
    rows = [("variant", "runtime", "mode", "computes", "images", "max|dprobs|", "agree", "NaN", "needs", "result")]
    for c in checks:
        result = ("PASS" if c.passed else "FAIL") if not c.note else "n/a"
        rows.append((c.variant, c.runtime, c.mode, c.compute, str(c.images),
                     "-" if c.note else f"{c.max_abs_diff:.2e}", "-" if c.note else f"{100 * c.agreement:.1f}%",
                     "yes" if c.nan else "no", f"{100 * c.threshold:.1f}%" if not c.note else "-", result))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {c.variant}/{c.runtime}: {c.note}" for c in checks if c.note]
    return "\n".join(lines + notes)


def as_records(checks: list[Check]) -> list[dict]:
    out = []
    for c in checks:
        record = asdict(c)
        record["lowered"] = c.lowered
        if record["max_abs_diff"] != record["max_abs_diff"]:   # NaN is not JSON
            record["max_abs_diff"] = None
        out.append(record)
    return out
