"""The manifest type: format 1 read and written unchanged, typed views, one-line errors."""
from __future__ import annotations

import json

import pytest

from engine_build.errors import ArtifactError
from engine_build.manifest import (
    MANIFEST,
    BuildInfo,
    FileEntry,
    ImagesUsed,
    Manifest,
    ModelInfo,
    Preprocessing,
    SourceFile,
    Validation,
    read_manifest,
    write_manifest,
)

# A format-1 manifest as the build has written it since format 1 (keys in their written order).
DOCUMENT = {
    "format": 1,
    "model": {"name": "m", "placeholder": True, "labels": ["negative", "positive"],
              "source": {"prototxt": {"path": "/p/deploy.prototxt", "sha256": "aa"},
                         "caffemodel": {"path": "/p/w.caffemodel", "sha256": "bb"}}},
    "input": {"name": "images", "dtype": "uint8", "shape": ["N", 256, 256, 3], "layout": "NHWC", "channels": "BGR"},
    "outputs": {"probs": {"dtype": "float32", "shape": ["N", 2], "meaning": "softmax; index 0 negative, 1 positive"},
                "logits": {"dtype": "float32", "shape": ["N", 2]}},
    "preprocessing": {"resize": "256x256 bilinear, aspect not kept (done by the caller)",
                      "mean_bgr": [104.0, 116.5, 122.5], "crop": "centre", "crop_size": 227, "oversample": False},
    "files": {
        "fp32": {"file": "model.onnx", "precision": "fp32", "sha256": "f32"},
        "int8": {"file": "model.int8.onnx", "precision": "int8", "sha256": "i8",
                 "quantizer": {"quantizer": "nncf", "version": "2"},
                 "by_runtime": {"onnxruntime": {"file": "model.int8.onnxruntime.onnx", "sha256": "i8o",
                                                "quantizer": {"quantizer": "minmax", "version": "1"}}}},
        "tensorrt": {"file": "engine.plan", "precision": "fp16", "onnx_sha256": "f16",
                     "identity": {"tensorrt": "10", "gpu": "G", "compute_capability": "9.0", "min_batch": 1,
                                  "max_batch": 32},
                     "timing_cache": {"file": "timing.cache", "reused": False}, "sha256": "plan"},
    },
    "tools": {"engine_build": "1", "numpy": "2"},
    "calibration": {"source": "built-in", "images": 12, "image_sha256": {"a.jpg": "x"}},
    "validation": {"reference": "onnxruntime model.onnx", "source": "built-in", "images": 6,
                   "image_sha256": {"b.jpg": "y"},
                   "gate": {"confident_margin": 0.05, "bounds": {"int8": {"max_abs_diff": 0.035,
                                                                          "mean_abs_diff": 0.01}}},
                   "checks": [{"variant": "int8", "runtime": "openvino", "mode": "default", "passed": True},
                              {"variant": "int8", "runtime": "openvino", "mode": "exact", "passed": False,
                               "note": "informational"}]},
    "build": {"seconds": 1.5, "notes": ["TensorRT engine skipped"], "peak_rss_mib": 10.0,
              "created": "2026-01-01T00:00:00+00:00"},
    "fp16_range": {"limit": 65504.0, "tensors": []},
    "int8": {"chosen_by": "sensitivity pass", "float_layers": {"nncf": ["fc8"]}},
}


def _write(directory, document) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).write_text(json.dumps(document, indent=2) + "\n")


def test_a_written_manifest_is_read_and_written_back_byte_for_byte(tmp_path):
    _write(tmp_path / "a", DOCUMENT)
    Manifest.read(tmp_path / "a").write(tmp_path)
    assert (tmp_path / MANIFEST).read_bytes() == (tmp_path / "a" / MANIFEST).read_bytes()
    assert read_manifest(tmp_path) == DOCUMENT


def test_create_lays_out_the_format_1_document():
    minmax = FileEntry("model.int8.onnxruntime.onnx", "i8o", quantizer={"quantizer": "minmax", "version": "1"})
    files = {"fp32": FileEntry("model.onnx", "f32", "fp32"),
             "int8": FileEntry("model.int8.onnx", "i8", "int8", quantizer={"quantizer": "nncf", "version": "2"},
                               by_runtime={"onnxruntime": minmax}),
             "tensorrt": FileEntry("engine.plan", "plan", "fp16", onnx_sha256="f16",
                                   identity=DOCUMENT["files"]["tensorrt"]["identity"],
                                   timing_cache={"file": "timing.cache", "reused": False})}
    made = Manifest.create(
        model=ModelInfo("m", True, ("negative", "positive"),
                        {"prototxt": SourceFile("/p/deploy.prototxt", "aa"),
                         "caffemodel": SourceFile("/p/w.caffemodel", "bb")}),
        preprocessing=Preprocessing("256x256 bilinear, aspect not kept (done by the caller)", (104.0, 116.5, 122.5),
                                    "centre", 227, False),
        files=files, tools=DOCUMENT["tools"], calibration=ImagesUsed("built-in", 12, {"a.jpg": "x"}),
        validation=Validation("built-in", 6, {"b.jpg": "y"}, "onnxruntime model.onnx",
                              DOCUMENT["validation"]["gate"], tuple(DOCUMENT["validation"]["checks"])),
        build=BuildInfo(1.5, 10.0, "2026-01-01T00:00:00+00:00", ("TensorRT engine skipped",)),
        fp16_range=DOCUMENT["fp16_range"], int8=DOCUMENT["int8"])
    assert json.dumps(made.raw) == json.dumps(DOCUMENT), "same keys, same values, same order"


def test_typed_views_read_what_the_document_says(tmp_path):
    _write(tmp_path, DOCUMENT)
    manifest = Manifest.read(tmp_path)
    assert manifest.model.placeholder is True and manifest.model.source["caffemodel"].sha256 == "bb"
    assert manifest.preprocessing.crop == "centre" and manifest.input.shape == ["N", 256, 256, 3]
    assert list(manifest.files) == ["fp32", "int8", "tensorrt"]
    assert manifest.files["tensorrt"].identity == DOCUMENT["files"]["tensorrt"]["identity"]
    assert manifest.build.notes == ("TensorRT engine skipped",) and manifest.build.seconds == 1.5
    assert manifest.calibration is not None and manifest.calibration.images == 12
    assert manifest.validation.gate == DOCUMENT["validation"]["gate"]
    assert manifest.int8 == DOCUMENT["int8"] and manifest.fp16_range == DOCUMENT["fp16_range"]


def test_a_runtime_gets_its_own_file_and_the_rest_of_the_variant_entry(tmp_path):
    _write(tmp_path, DOCUMENT)
    manifest = Manifest.read(tmp_path)
    own = manifest.variant_entry("int8", "onnxruntime")
    assert (own.file, own.sha256, own.precision, own.quantizer) == \
        ("model.int8.onnxruntime.onnx", "i8o", "int8", {"quantizer": "minmax", "version": "1"})
    assert manifest.variant_entry("int8", "openvino").file == "model.int8.onnx"
    assert manifest.variant_entry("fp32", "onnxruntime").file == "model.onnx"


def test_check_record_skips_notes_and_matches_the_mode(tmp_path):
    _write(tmp_path, DOCUMENT)
    manifest = Manifest.read(tmp_path)
    assert manifest.check_record("int8", "openvino", exact=False) == DOCUMENT["validation"]["checks"][0]
    assert manifest.check_record("int8", "openvino", exact=True) is None, "a note is not a gate"
    assert manifest.check_record("fp16", "openvino", exact=False) is None


def test_raw_is_a_copy_and_write_manifest_checks_the_format(tmp_path):
    _write(tmp_path, DOCUMENT)
    manifest = Manifest.read(tmp_path)
    changed = manifest.raw
    changed["model"]["placeholder"] = False
    assert manifest.model.placeholder is True
    write_manifest(tmp_path, changed)
    assert Manifest.read(tmp_path).model.placeholder is False
    with pytest.raises(ArtifactError, match="has format 2, this version reads 1"):
        write_manifest(tmp_path, {**DOCUMENT, "format": 2})


@pytest.mark.parametrize("content, message", [
    (None, "has no manifest.json"),
    ("{not json", "is unreadable"),
    (json.dumps({**DOCUMENT, "format": 2}), "has format 2, this version reads 1"),
    (json.dumps([1]), "has format 'list', this version reads 1"),
    (json.dumps({k: v for k, v in DOCUMENT.items() if k != "files"}), r"is malformed \(KeyError: 'files'\)"),
    (json.dumps({**DOCUMENT, "files": "x"}), r"is malformed \(AttributeError"),
    (json.dumps({k: v for k, v in DOCUMENT.items() if k != "model"}), r"is malformed \(KeyError: 'model'\)"),
    (json.dumps({**DOCUMENT, "validation": 5}), r"is malformed \(AttributeError"),
    (json.dumps({**DOCUMENT, "files": {"fp32": {"file": 5, "sha256": "cc"}}}),
     r"is malformed \(TypeError: files.fp32: 'file' and 'sha256' must be strings\)"),
])
def test_a_bad_manifest_is_one_line(tmp_path, content, message):
    if content is not None:
        (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(ArtifactError, match=message) as caught:
        Manifest.read(tmp_path)
    assert "\n" not in str(caught.value)
    with pytest.raises(ArtifactError, match="does not exist"):
        Manifest.read(tmp_path / "missing")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ArtifactError, match="a-file is a file: an artifact is the directory a build writes"):
        Manifest.read(tmp_path / "a-file")


def test_an_int8_entry_always_lists_its_runtimes_files_and_others_never_do():
    made = {"quantizer": "minmax", "version": "1"}
    assert FileEntry("model.int8.onnx", "i8", "int8", quantizer=made).record() == \
        {"file": "model.int8.onnx", "precision": "int8", "sha256": "i8", "quantizer": made, "by_runtime": {}}
    assert FileEntry("model.onnx", "f32", "fp32").record() == {"file": "model.onnx", "precision": "fp32",
                                                               "sha256": "f32"}
