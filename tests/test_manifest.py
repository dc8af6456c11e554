"""The manifest type: format 1 read and written unchanged, typed views, one-line errors."""
from __future__ import annotations

import copy
import json
import operator

import pytest

from engine_build.cli import main
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
                   "gate": {"confident_margin": 0.05,
                            "bounds": {"int8": {"max_abs_diff": 0.035, "mean_abs_diff": 0.01},
                                       "fp16": {"max_abs_diff": 0.02, "mean_abs_diff": 0.004}}},
                   "checks": [{"variant": "int8", "runtime": "openvino", "mode": "default", "compute": "int8+bf16",
                               "images": 6, "max_abs_diff": 0.01, "agreement": 1.0, "nan": False, "passed": True,
                               "cpu": {"model": "C", "machine": "x86_64", "extensions": ["avx2"]}},
                              {"variant": "int8", "runtime": "openvino", "mode": "exact", "compute": "-", "images": 6,
                               "max_abs_diff": None, "agreement": 0.0, "nan": False, "passed": False,
                               "note": "informational", "cpu": {}}]},
    "build": {"seconds": 1.5, "notes": ["TensorRT engine skipped"], "peak_rss_mib": 10.0,
              "created": "2026-01-01T00:00:00+00:00"},
    "fp16_range": {"limit": 65504.0, "margin": 2.0, "images": 12, "source": "built-in", "largest_fp16": 712.0,
                   "tensors": [{"tensor": "conv1", "op": "Conv", "max_abs": 712.0, "window_sum_sq": None,
                                "near_limit": False, "fp16_file": "float16", "float32": None}]},
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
    (json.dumps({k: v for k, v in DOCUMENT.items() if k != "files"}), r"is malformed \(files: missing\)"),
    (json.dumps({**DOCUMENT, "files": "x"}), r'is malformed \(files: expected an object, got "x"\)'),
    (json.dumps({k: v for k, v in DOCUMENT.items() if k != "model"}), r"is malformed \(model: missing\)"),
    (json.dumps({**DOCUMENT, "validation": 5}), r"is malformed \(validation: expected an object, got 5\)"),
    (json.dumps({**DOCUMENT, "files": {"fp32": {"file": 5, "sha256": "cc"}}}),
     r"is malformed \(files.fp32.file: expected a file name in the artifact directory, got 5\)"),
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


def _at(document: dict, path: str) -> tuple:
    """The container of the key at dotted ``path`` (list indices as numbers), and that key."""
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in parents:
        document = document[key]
    return document, last


def _set(path: str, value: object):
    return lambda document: operator.setitem(*_at(document, path), value)


def _drop(path: str):
    return lambda document: operator.delitem(*_at(document, path))


def _both(*edits):
    def edit(document: dict) -> None:
        for each in edits:
            each(document)
    return edit


# The adversarial tester's tamperings (inspect or evaluate ended in a traceback, or "false" counted as passed),
# and the neighbours of each: every one is refused by Manifest.read, naming the key.
TAMPERED = {
    "gate-missing-bounds": (_drop("validation.gate.bounds"), "validation.gate.bounds: missing"),
    "gate-missing-fp16-bounds": (_drop("validation.gate.bounds.fp16"), "validation.gate.bounds.fp16: missing"),
    "gate-string": (_set("validation.gate", "x"), 'validation.gate: expected an object, got "x"'),
    "int8-record-empty": (_set("int8", {}), "int8.chosen_by: missing"),
    "fp16-range-empty": (_set("fp16_range", {}), "fp16_range.limit: missing"),
    "fp16-range-limit-zero": (_set("fp16_range.limit", 0), "fp16_range.limit: expected a number above 0, got 0"),
    "fp16-range-tensor-max-str": (_set("fp16_range.tensors.0.max_abs", "big"),
                                  'fp16_range.tensors[0].max_abs: expected a number, got "big"'),
    "quantizer-string": (_set("files.int8.quantizer", "nncf"),
                         'files.int8.quantizer: expected an object, got "nncf"'),
    "runtime-file-quantizer-string": (_set("files.int8.by_runtime.onnxruntime.quantizer", "minmax"),
                                      'files.int8.by_runtime.onnxruntime.quantizer: expected an object'),
    "check-cpu-string": (_set("validation.checks.0.cpu", "x"),
                         'validation.checks[0].cpu: expected an object, got "x"'),
    "check-cpu-no-extensions": (_drop("validation.checks.0.cpu.extensions"),
                                "validation.checks[0].cpu.extensions: missing"),
    "check-max-diff-string": (_set("validation.checks.0.max_abs_diff", "x"),
                              'validation.checks[0].max_abs_diff: expected a number, got "x"'),
    "check-passed-string-false": (_set("validation.checks.0.passed", "false"),
                                  'validation.checks[0].passed: expected true or false, got "false"'),
    "check-images-true": (_set("validation.checks.1.images", True),
                          "validation.checks[1].images: expected an integer, got true"),
    "check-without-compute": (_drop("validation.checks.0.compute"), "validation.checks[0].compute: missing"),
    "foreign-cpu-and-no-bounds": (_both(_set("validation.checks.0.cpu.extensions", ["avx512f"]),
                                        _drop("validation.gate.bounds")), "validation.gate.bounds: missing"),
    "placeholder-string": (_set("model.placeholder", "false"),
                           'model.placeholder: expected true or false, got "false"'),
    "labels-int": (_set("model.labels", 5), "model.labels: expected a list, got 5"),
    "notes-null": (_set("build.notes", None), "build.notes: expected a list, got null"),
    "files-list": (_set("files", []), "files: expected an object, got []"),
    "files-without-fp32": (_drop("files.fp32"), "files.fp32: missing"),
    "file-outside-the-artifact": (_set("files.fp32.file", "/elsewhere/model.onnx"),
                                  'files.fp32.file: expected a file name in the artifact directory'),
    "engine-batch-string": (_set("files.tensorrt.identity.max_batch", "32"),
                            'files.tensorrt.identity.max_batch: expected an integer, got "32"'),
    "calibration-images-string": (_set("calibration.images", "12"),
                                  'calibration.images: expected an integer, got "12"'),
}


@pytest.mark.parametrize("name", TAMPERED)
def test_a_tampered_manifest_is_refused_when_read_in_one_line_naming_the_key(tmp_path, name, capsys):
    """Manifest.read promised a malformed manifest is refused when read, "not met later as a KeyError"; it read
    a few parts, so these reached inspect and evaluate (the service's path) as tracebacks, or read
    "passed": "false" as passed. The shape of every key a reader uses is now declared and checked."""
    edit, problem = TAMPERED[name]
    document = copy.deepcopy(DOCUMENT)
    edit(document)
    _write(tmp_path, document)
    with pytest.raises(ArtifactError) as caught:
        Manifest.read(tmp_path)
    assert f"manifest.json is malformed ({problem}" in str(caught.value) and "\n" not in str(caught.value)
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1


def test_the_untampered_document_is_read_and_inspected(tmp_path, capsys):
    _write(tmp_path, DOCUMENT)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "int8     openvino  default" in capsys.readouterr().out
