"""INT8 that holds on a model with many near-ties, and a gate that means something."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine_build.cli import main
from engine_build.manifest import read_manifest, sha256

PHOTOS = Path(__file__).resolve().parents[1] / "engine_build" / "photos"


@pytest.fixture(scope="session")
def near_tie_model(tmp_path_factory) -> tuple[Path, Path]:
    """A quarter-width placeholder whose logit gap has a spread of 0.3: about a third of the
    photos sit within 0.05 of p = 0.5, as a real two-class model does on ambiguous photos."""
    from engine_build.placeholder import write_placeholder
    return write_placeholder(tmp_path_factory.mktemp("near-ties"), width=0.25, seed=1, logit_std=0.3)


@pytest.fixture(scope="session")
def near_tie_artifact(near_tie_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("near-tie-artifact")
    assert main(["build", "--prototxt", str(near_tie_model[0]), "--caffemodel", str(near_tie_model[1]),
                 "--output", str(out), "--precision", "fp32", "int8"]) == 0
    return out


def test_int8_holds_on_near_ties_on_photos_the_build_never_saw(near_tie_artifact):
    manifest = read_manifest(near_tie_artifact)
    calibration = manifest["calibration"]["image_sha256"]
    validation = manifest["validation"]["image_sha256"]
    assert calibration and validation
    assert not set(calibration.values()) & set(validation.values()), "calibrated and validated on disjoint photos"
    assert not set(calibration) & set(validation)
    int8 = [c for c in manifest["validation"]["checks"] if c["variant"] == "int8"]
    assert {(c["runtime"], c["mode"]) for c in int8} == {("onnxruntime", "exact"), ("openvino", "exact"),
                                                        ("openvino", "default")}
    for check in int8:
        assert check["near_ties"] >= 10, "the model really has many near-ties"
        assert check["passed"] and not check["nan"], check
        assert check["confident_flips"] == [], check
        assert check["max_abs_diff"] <= 0.035, check
        assert check["mean_abs_diff"] <= 0.01, check


def test_manifest_records_the_sha256_of_every_source_image(near_tie_artifact):
    manifest = read_manifest(near_tie_artifact)
    for kind in ("calibration", "validation"):
        recorded = manifest[kind]["image_sha256"]
        from engine_build.imaging import builtin_photos
        expected = {p.name: sha256(p) for p in builtin_photos(kind)}
        assert recorded == expected
        assert manifest[kind]["images"] == 6 * len(expected)


def test_int8_has_the_fastest_file_per_runtime_and_the_service_picks_it(near_tie_artifact):
    """OpenVINO runs NNCF's file; ONNX Runtime runs the MinMax file its kernels fuse."""
    from engine_build.artifact import open_artifact, select
    files = read_manifest(near_tie_artifact)["files"]
    assert files["int8"]["quantizer"]["quantizer"] == "nncf"
    own = files["int8"]["by_runtime"]["onnxruntime"]
    assert own["quantizer"]["quantizer"] == "onnxruntime" and own["file"] != files["int8"]["file"]
    _, ov = select(near_tie_artifact, "openvino", "int8")
    _, ort = select(near_tie_artifact, "onnxruntime", "int8")
    assert ov.file.name == files["int8"]["file"] and ov.sha256 == files["int8"]["sha256"]
    assert ort.file.name == own["file"] and ort.sha256 == own["sha256"]
    _, _, backend = open_artifact(near_tie_artifact, "onnxruntime", "int8")   # verifies the runtime's own file
    backend.close()


def test_one_quantizer_makes_one_file(near_tie_model, tmp_path):
    out = tmp_path / "one"
    assert main(["build", "--prototxt", str(near_tie_model[0]), "--caffemodel", str(near_tie_model[1]),
                 "--output", str(out), "--precision", "fp32", "int8", "--int8-quantizer", "minmax"]) == 0
    int8 = read_manifest(out)["files"]["int8"]
    assert int8["quantizer"]["quantizer"] == "onnxruntime" and not int8["by_runtime"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.int8.onnx", "model.onnx"]


def _gate():
    from engine_build.validate import Bounds, Gate
    return Gate(0.05, {"int8": Bounds(0.1, 0.05), "fp16": Bounds(0.02, 0.004)})


def _probs(p: list[float]) -> np.ndarray:
    p = np.asarray(p, np.float32)
    return np.stack([1 - p, p], axis=1)


def test_gate_fails_a_confident_flip_and_names_the_image():
    from engine_build.validate import Check, compare
    reference = _probs([0.56, 0.52, 0.30, 0.90])
    probs = _probs([0.49, 0.48, 0.31, 0.91])       # 0.56 -> 0.49 flips a confident image; 0.52 a near-tie
    measured = compare(reference, probs, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], _gate(), "int8")
    assert measured["near_ties"] == 1 and measured["near_tie_flips"] == 1
    assert measured["confident_flips"] == [{"image": "a.jpg", "reference_p": 0.56}]
    assert measured["agreement"] == 0.5 and not measured["passed"]
    check = Check("int8", "openvino", "exact", "int8", 4, file="model.int8.onnx", **measured)
    assert "a.jpg (FP32 p(positive) 0.560)" in check.failure() and "b.jpg" not in check.failure()


def test_gate_passes_near_tie_flips_within_bounds_and_fails_on_bounds_or_nan():
    from engine_build.validate import compare
    reference = _probs([0.51, 0.8, 0.2])
    assert compare(reference, _probs([0.49, 0.8, 0.2]), list("abc"), _gate(), "int8")["passed"]
    too_far = compare(reference, _probs([0.51, 0.68, 0.2]), list("abc"), _gate(), "int8")
    assert not too_far["passed"] and too_far["max_abs_diff"] == pytest.approx(0.12, abs=1e-6)
    assert not compare(reference, _probs([0.51, 0.8, 0.2]) + np.float32(0.03), list("abc"), _gate(), "bf16")["passed"]
    nan = compare(reference, _probs([0.51, np.nan, 0.2]), list("abc"), _gate(), "int8")
    assert nan["nan"] and not nan["passed"]


def test_failing_variant_is_never_used_and_its_message_says_why(near_tie_model, tmp_path, capsys):
    from engine_build.artifact import select
    from engine_build.errors import ArtifactError
    out = tmp_path / "strict"
    code = main(["build", "--prototxt", str(near_tie_model[0]), "--caffemodel", str(near_tie_model[1]),
                 "--output", str(out), "--precision", "fp32", "int8", "--int8-max-diff", "0.001"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "validation failed: int8 on" in err and "max |dp|" in err and "> 0.001" in err
    _, auto = select(out, "auto")
    assert auto.precision == "fp32", "the failed INT8 file is skipped"
    with pytest.raises(ArtifactError, match="failed its validation gate"):
        select(out, "onnxruntime", "int8")


def test_calibration_and_validation_images_must_be_disjoint(near_tie_model, tmp_path, capsys):
    same = tmp_path / "same"
    same.mkdir()
    for name in ("coffee.jpg", "rocket.jpg"):
        shutil.copy(PHOTOS / name, same / name)
    out = tmp_path / "never"
    assert main(["build", "--prototxt", str(near_tie_model[0]), "--caffemodel", str(near_tie_model[1]),
                 "--output", str(out), "--calibration-images", str(same)]) == 1
    err = capsys.readouterr().err
    assert "2 validation image(s) are also calibration images" in err and err.count("\n") == 1
    assert not out.exists()


def test_build_config_is_declared_once():
    """Every flag comes from a field, with the field's default; invalid values cannot make a config."""
    from dataclasses import fields

    from engine_build.cli import parser
    from engine_build.config import BuildConfig
    from engine_build.errors import ConfigError
    args = parser().parse_args(["build", "--output", "out", "--onnx", "m.onnx"])
    assert BuildConfig.from_namespace(args) == BuildConfig(output=Path("out"), onnx=Path("m.onnx"))
    flagged = {f.name for f in fields(BuildConfig) if f.metadata}
    assert flagged <= set(vars(args)) and {"confident_margin", "int8_max_diff", "fp16_mean_diff"} <= flagged
    with pytest.raises(ConfigError, match="--fp16-max-diff -1: must be between 0 and 1"):
        BuildConfig(output=Path("out"), onnx=Path("m.onnx"), fp16_max_diff=-1)
    with pytest.raises(ConfigError, match="either --prototxt and --caffemodel, or --onnx"):
        BuildConfig.from_namespace(argparse.Namespace(**{**vars(args), "onnx": None}))


def test_build_steps_do_not_print(near_tie_model, tmp_path, capsys):
    from engine_build.build import run_build
    from engine_build.config import BuildConfig
    run_build(BuildConfig(prototxt=near_tie_model[0], caffemodel=near_tie_model[1], output=tmp_path / "quiet",
                          precisions=("fp32", "int8")))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
