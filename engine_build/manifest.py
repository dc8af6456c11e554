"""``manifest.json``: what an artifact holds and how far it can be trusted.

:class:`Manifest` is the one place that reads and writes the file: the build makes one with
:meth:`Manifest.create`, every reader (the service, ``inspect``, ``evaluate``, the benchmarks)
gets one from :meth:`Manifest.read`, which checks the format and the shape (:mod:`.manifest_shape`:
every key a reader uses, with its type), and reads it through typed views
(:class:`ModelInfo`, :class:`FileEntry`, ...). The keys are spelled twice, in the views and in the shape:
a key a view reads must be declared there too, or its absence is met as a KeyError again. The service
refuses files whose sha256 differ from it; the engine's identity in it (GPU, TensorRT version, batch
range) is compared by :mod:`.runtime.identity`.

A ``Manifest`` wraps the JSON document rather than replacing it: what is written is exactly the
document read or created, so files on disk keep their shape and key order, and the records that
other modules own (a validation check, :mod:`.validate`; the INT8 sensitivity passes,
:mod:`.sensitivity`; the FP16 range audit, :mod:`.range_audit`; an engine identity) stay plain
mappings read by their owners.
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .manifest_shape import MANIFEST_SHAPE, mismatch
from .preprocess import IMAGE_SIZE

MANIFEST = "manifest.json"
FORMAT = 1
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# A variant may have a file of its own for one runtime (``files[variant]["by_runtime"]``):
# the INT8 file that is fastest on ONNX Runtime is not the one that is fastest on OpenVINO.
RUNTIME_FILES = {("int8", "onnxruntime"): "model.int8.onnxruntime.onnx"}
ENGINE_FILE, TIMING_CACHE = "engine.plan", "timing.cache"
Record = dict[str, Any]      # a JSON object whose shape another module owns


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of the artifact. ``by_runtime``: a runtime's own file for the same variant;
    ``quantizer``: how an INT8 file was made; the last three only for the TensorRT engine."""
    file: str
    sha256: str
    precision: str = ""
    quantizer: Record | None = None
    by_runtime: Mapping[str, FileEntry] = field(default_factory=dict)
    onnx_sha256: str | None = None
    identity: Record | None = None
    timing_cache: Record | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FileEntry:
        return cls(file=record["file"], sha256=record.get("sha256", ""), precision=record.get("precision", ""),
                   quantizer=record.get("quantizer"),
                   by_runtime={k: cls.from_record(v) for k, v in record.get("by_runtime", {}).items()},
                   onnx_sha256=record.get("onnx_sha256"), identity=record.get("identity"),
                   timing_cache=record.get("timing_cache"))

    def record(self) -> dict[str, Any]:
        """The JSON entry: file, precision, the engine's fields, sha256, then how it was made."""
        out: dict[str, Any] = {"file": self.file}
        if self.precision:
            out["precision"] = self.precision
        for key in ("onnx_sha256", "identity", "timing_cache"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["sha256"] = self.sha256
        if self.quantizer is not None:
            out["quantizer"] = self.quantizer
        if self.precision == "int8":     # an INT8 variant lists its runtimes' own files, even none
            out["by_runtime"] = {k: v.record() for k, v in self.by_runtime.items()}
        return out

    def for_runtime(self, runtime: str) -> FileEntry:
        """The entry ``runtime`` runs: the runtime's own file where the build made one."""
        own = self.by_runtime.get(runtime)
        if own is None:
            return self
        return replace(self, file=own.file, sha256=own.sha256, quantizer=own.quantizer, by_runtime={})


@dataclass(frozen=True)
class SourceFile:
    path: str
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    placeholder: bool
    labels: tuple[str, ...]
    source: Mapping[str, SourceFile]     # "prototxt"/"caffemodel" or "onnx" -> the input file

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "placeholder": self.placeholder, "labels": list(self.labels),
                "source": {k: {"path": s.path, "sha256": s.sha256} for k, s in self.source.items()}}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    shape: list[Any]
    layout: str
    channels: str


@dataclass(frozen=True)
class Preprocessing:
    resize: str
    mean_bgr: tuple[float, ...]
    crop: str            # "10 crops averaged" or "centre"
    crop_size: int
    oversample: bool

    def record(self) -> dict[str, Any]:
        return {"resize": self.resize, "mean_bgr": list(self.mean_bgr), "crop": self.crop,
                "crop_size": self.crop_size, "oversample": self.oversample}


@dataclass(frozen=True)
class ImagesUsed:
    """The calibration or validation images: where from, how many, the sha256 of each source file."""
    source: str
    images: int
    image_sha256: Mapping[str, str]

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "images": self.images, "image_sha256": dict(self.image_sha256)}


@dataclass(frozen=True)
class Validation(ImagesUsed):
    """The validation images, what they were compared with, the gate and one record per check."""
    reference: str = ""
    gate: Record | None = None                # read by :func:`.validate.gate_from_record`
    checks: tuple[Record, ...] = ()           # read by :meth:`.validate.Check.from_record`

    def record(self) -> dict[str, Any]:
        return {"reference": self.reference, **super().record(), "gate": self.gate, "checks": list(self.checks)}


@dataclass(frozen=True)
class BuildInfo:
    seconds: float
    peak_rss_mib: float
    created: str
    notes: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "notes": list(self.notes), "peak_rss_mib": self.peak_rss_mib,
                "created": self.created}


@dataclass(frozen=True)
class Manifest:
    """An artifact's manifest, format-checked; ``raw`` is the JSON document (a copy)."""
    _document: dict[str, Any] = field(repr=False)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], where: str = "manifest") -> Manifest:
        if not isinstance(document, Mapping) or document.get("format") != FORMAT:
            found = document.get("format") if isinstance(document, Mapping) else type(document).__name__
            raise ArtifactError(f"{where} has format {found!r}, this version reads {FORMAT}")
        return cls(copy.deepcopy(dict(document)))

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if Path(directory).exists() and not Path(directory).is_dir():
            raise ArtifactError(f"{directory} is a file: an artifact is the directory a build writes")
        if not Path(directory).is_dir():
            raise ArtifactError(f"artifact directory {directory} does not exist")
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ArtifactError(f"{directory} has no {MANIFEST}: build it with python -m engine_build build") from exc
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path} is unreadable: {exc}") from exc
        manifest = cls.from_dict(document, str(path))
        # a file of the right format but the wrong shape is refused here, in one line, not met later as a
        # KeyError or read as the wrong value: every key the readers use is declared in .manifest_shape
        problem = mismatch(document, MANIFEST_SHAPE)
        if problem:
            raise ArtifactError(f"{path} is malformed ({problem}): rebuild the artifact with "
                                f"python -m engine_build build")
        return manifest

    @classmethod
    def create(cls, *, model: ModelInfo, preprocessing: Preprocessing, files: Mapping[str, FileEntry],
               tools: Mapping[str, str], calibration: ImagesUsed | None, validation: Validation,
               build: BuildInfo, fp16_range: Record | None = None, int8: Record | None = None) -> Manifest:
        """A new artifact's manifest."""
        document: dict[str, Any] = {
            "format": FORMAT,
            "model": model.record(),
            "input": {"name": "images", "dtype": "uint8", "shape": ["N", IMAGE_SIZE, IMAGE_SIZE, 3],
                      "layout": "NHWC", "channels": "BGR"},
            "outputs": {"probs": {"dtype": "float32", "shape": ["N", 2],
                                  "meaning": "softmax; index 0 negative, 1 positive"},
                        "logits": {"dtype": "float32", "shape": ["N", 2]}},
            "preprocessing": preprocessing.record(),
            "files": {key: entry.record() for key, entry in files.items()},
            "tools": dict(tools),
            "calibration": calibration.record() if calibration else None,
            "validation": validation.record(),
            "build": build.record(),
        }
        if fp16_range is not None:
            document["fp16_range"] = fp16_range
        if int8 is not None:
            document["int8"] = int8
        return cls.from_dict(document)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._document, indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
        return path

    @property
    def raw(self) -> dict[str, Any]:
        """The JSON document, a copy to change freely (``inspect --json``, tests)."""
        return copy.deepcopy(self._document)

    @property
    def model(self) -> ModelInfo:
        m = self._document["model"]
        return ModelInfo(m["name"], bool(m["placeholder"]), tuple(m.get("labels", ())),
                         {k: SourceFile(s["path"], s["sha256"]) for k, s in m.get("source", {}).items()})

    @property
    def input(self) -> InputSpec:
        i = self._document["input"]
        return InputSpec(i["name"], i["dtype"], list(i["shape"]), i.get("layout", "NHWC"), i["channels"])

    @property
    def preprocessing(self) -> Preprocessing:
        p = self._document["preprocessing"]
        return Preprocessing(p.get("resize", ""), tuple(p["mean_bgr"]), p["crop"], p.get("crop_size", 0),
                             bool(p.get("oversample", False)))

    @property
    def files(self) -> dict[str, FileEntry]:
        """Variant ("fp32", "fp16", "int8") or "tensorrt" -> its file, in the order the build wrote them."""
        return {key: FileEntry.from_record(entry) for key, entry in self._document["files"].items()}

    def variant_entry(self, key: str, runtime: str) -> FileEntry:
        """The file entry ``runtime`` runs for ``key``: the runtime's own file where the build made one."""
        return self.files[key].for_runtime(runtime)

    @property
    def tools(self) -> dict[str, str]:
        return dict(self._document.get("tools", {}))

    @property
    def calibration(self) -> ImagesUsed | None:
        c = self._document.get("calibration")
        return None if not c else ImagesUsed(c["source"], c["images"], dict(c.get("image_sha256", {})))

    @property
    def validation(self) -> Validation:
        v = self._document.get("validation", {})
        return Validation(v.get("source", ""), v.get("images", 0), dict(v.get("image_sha256", {})),
                          v.get("reference", ""), v.get("gate") or None, tuple(v.get("checks", ())))

    def check_record(self, variant: str, runtime: str, exact: bool) -> Record | None:
        """The validation record for (variant, runtime, mode), if the build ran one."""
        mode = "exact" if exact or runtime != "openvino" else "default"
        for check in self.validation.checks:
            if (check["variant"] == variant and check["runtime"] == runtime and check["mode"] == mode
                    and not check.get("note")):
                return check
        return None

    @property
    def build(self) -> BuildInfo:
        b = self._document["build"]
        return BuildInfo(b["seconds"], b.get("peak_rss_mib", 0.0), b.get("created", ""), tuple(b.get("notes", ())))

    @property
    def int8(self) -> Record | None:
        """Which layers each INT8 file keeps in float and why (:mod:`.sensitivity`'s record)."""
        return self._document.get("int8")

    @property
    def fp16_range(self) -> Record | None:
        """The FP16 range audit of model.onnx (:func:`.range_audit.record`)."""
        return self._document.get("fp16_range")


def read_manifest(directory: Path) -> dict[str, Any]:
    """Compatibility for code that edits the JSON document: ``Manifest.read(directory).raw``."""
    return Manifest.read(directory).raw


def write_manifest(directory: Path, manifest: Manifest | Mapping[str, Any]) -> Path:
    """Write ``manifest`` (a :class:`Manifest`, or a JSON document, format-checked first)."""
    return (manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)).write(directory)


def verify_file(directory: Path, entry: FileEntry | Mapping[str, Any]) -> Path:
    """The file of a manifest entry, after checking it exists and its sha256 matches."""
    if not isinstance(entry, FileEntry):
        entry = FileEntry.from_record(entry)
    path = Path(directory) / entry.file
    if not path.exists():
        raise ArtifactError(f"{path} is listed in the manifest but missing")
    try:
        actual = sha256(path)
    except OSError as exc:   # a folder (a bind mount of a missing file makes one), unreadable
        raise ArtifactError(f"{path} is listed in the manifest but cannot be read: {exc.strerror or exc}") from exc
    if actual != entry.sha256:
        raise ArtifactError(f"{path} does not match its manifest (sha256 {actual[:12]}..., "
                            f"manifest says {entry.sha256[:12]}...): the artifact was modified; rebuild it")
    return path
