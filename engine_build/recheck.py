"""A variant validated on another CPU is checked again where it serves, before it is used.

INT8 and bf16 results depend on the CPU's extensions (:mod:`.runtime.cpu`). When the CPU that
opens a variant computing below FP32 differs in them from the CPU its gate ran on, the same
check runs again here on the built-in validation photos, against the artifact's FP32 file on
ONNX Runtime and within the gate the build recorded. Only FP32 computed as FP32 (ONNX Runtime, or
exact mode) is not re-checked: OpenVINO's default mode computes an FP32 or FP16 file in bf16 where
the CPU has it, so what the build machine recorded as FP32 may run in bf16 here.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import ArtifactError
from .imagesets import builtin_set
from .manifest import Manifest, verify_file
from .runtime.cpu import numerics_differ, this_cpu
from .validate import Check, check_one, gate_from_record, reference_probs

log = logging.getLogger(__name__)


def needs_recheck(manifest: Manifest, variant: str, runtime: str, exact: bool) -> str | None:
    """Why (variant, runtime, mode) must be checked again on this CPU; None when its record holds here."""
    if runtime not in ("onnxruntime", "openvino"):
        return None
    if variant == "fp32" and (exact or runtime == "onnxruntime"):
        return None
    record = manifest.check_record(variant, runtime, exact)
    if record is None:
        return None
    why = numerics_differ(record.get("cpu"), this_cpu())
    if why is not None and not record.get("cpu"):
        why += " (rebuild the artifact to record it)"
    return why


def recheck(directory: Path, manifest: Manifest, variant: str, runtime: str, file: Path, exact: bool,
            max_batch: int = 16) -> Check:
    """The build's check of ``file`` on ``runtime``, run again on this CPU on the built-in validation photos."""
    gate = manifest.validation.gate
    if gate is None:
        raise ArtifactError(f"{directory}: the manifest records no validation gate; rebuild the artifact")
    photos = builtin_set("validation")
    fp32 = verify_file(Path(directory), manifest.files["fp32"])
    reference = reference_probs(fp32, photos.images, max_batch)
    return check_one(variant, file, runtime, exact, reference, photos.images, photos.names,
                     gate_from_record(gate), max_batch)
