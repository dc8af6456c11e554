"""``manifest.json``: what an artifact holds and how far it can be trusted.

The service reads it to choose a variant and refuses files whose sha256 differ from it;
the engine's identity in it (GPU, TensorRT version, batch range) is compared by
:mod:`.runtime.identity`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT = 1
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# A variant may have a file of its own for one runtime (``files[variant]["by_runtime"]``):
# the INT8 file that is fastest on ONNX Runtime is not the one that is fastest on OpenVINO.
RUNTIME_FILES = {("int8", "onnxruntime"): "model.int8.onnxruntime.onnx"}
ENGINE_FILE, TIMING_CACHE = "engine.plan", "timing.cache"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{directory} has no {MANIFEST}: build it with python -m engine_build build") from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is unreadable: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {manifest.get('format')!r}, this version reads {FORMAT}")
    return manifest


def variant_entry(manifest: dict, key: str, runtime: str) -> dict:
    """The file entry ``runtime`` runs for ``key``: the runtime's own file where the build made one."""
    entry = manifest["files"][key]
    own = entry.get("by_runtime", {}).get(runtime)
    return {**{k: v for k, v in entry.items() if k != "by_runtime"}, **own} if own else entry


def verify_file(directory: Path, entry: dict) -> Path:
    """The file of a manifest entry, after checking it exists and its sha256 matches."""
    path = Path(directory) / entry["file"]
    if not path.exists():
        raise ArtifactError(f"{path} is listed in the manifest but missing")
    actual = sha256(path)
    if actual != entry["sha256"]:
        raise ArtifactError(f"{path} does not match its manifest (sha256 {actual[:12]}..., "
                            f"manifest says {entry['sha256'][:12]}...): the artifact was modified; rebuild it")
    return path

