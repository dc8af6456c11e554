"""The build command end to end: artifact contents, gate, manifest, inspect, evaluate, errors."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from engine_build.caffe_io import iter_caffemodel
from engine_build.cli import main
from engine_build.errors import ArtifactError, ConfigError
from engine_build.manifest import read_manifest, verify_file
from engine_build.runtime import open_backend


def test_artifact_honours_the_io_contract(small_artifact, photos):
    manifest = read_manifest(small_artifact)
    assert set(manifest["files"]) == {"fp32", "fp16", "int8"}
    for entry in manifest["files"].values():
        model = onnx.load(str(small_artifact / entry["file"]), load_external_data=False)
        (inp,) = model.graph.input
        assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert dims == ["N", 256, 256, 3]
        assert [o.name for o in model.graph.output] == ["probs", "logits"]
        assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    fp16 = onnx.load(str(small_artifact / "model.fp16.onnx"))
    assert {t.data_type for t in fp16.graph.initializer if t.name.startswith("conv")} == {onnx.TensorProto.FLOAT16}
    with open_backend("onnxruntime", small_artifact / "model.onnx", "fp32") as backend:
        out = backend.infer(photos[:5])
    assert out.probs.shape == (5, 2) and np.allclose(out.probs.sum(1), 1, atol=1e-5)


def test_manifest_records_gate_sources_and_placeholder(small_artifact, small_model):
    manifest = read_manifest(small_artifact)
    assert manifest["model"]["placeholder"] is True
    assert manifest["model"]["labels"] == ["negative", "positive"]
    assert manifest["preprocessing"]["mean_bgr"] == [104.0069879317889, 116.66876761696767, 122.6789143406786]
    assert manifest["model"]["source"]["caffemodel"]["sha256"]
    checks = manifest["validation"]["checks"]
    seen = {(c["variant"], c["runtime"], c["mode"]) for c in checks}
    assert {("fp16", "onnxruntime", "exact"), ("int8", "onnxruntime", "exact"), ("fp32", "openvino", "default"),
            ("int8", "openvino", "default")} <= seen
    for c in checks:
        assert c["images"] == 48 and c["passed"], c
        assert not c["nan"] and not c["confident_flips"]
    assert {"onnxruntime", "openvino", "onnx", "numpy", "nncf"} <= set(manifest["tools"])


def test_inspect_shows_the_placeholder_flag(small_artifact, capsys):
    assert main(["inspect", str(small_artifact)]) == 0
    out = capsys.readouterr().out
    assert "PLACEHOLDER WEIGHTS" in out and "int8" in out and "PASS" in out


def test_tampered_file_is_refused(small_artifact, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(small_artifact, copy)
    manifest = read_manifest(copy)
    verify_file(copy, manifest["files"]["fp32"])
    data = bytearray((copy / "model.int8.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        verify_file(copy, manifest["files"]["int8"])


def test_an_artifact_file_that_is_a_folder_is_refused_in_one_line(small_artifact, tmp_path):
    """A bind mount of a missing file makes a folder in its place: reading it for its checksum raised
    IsADirectoryError, a traceback from python -m stream."""
    import shutil

    from engine_build.artifact import open_artifact
    copy = tmp_path / "copy"
    shutil.copytree(small_artifact, copy)
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").mkdir()
    with pytest.raises(ArtifactError, match=r"model.onnx is listed in the manifest but cannot be read: Is a "
                                            r"directory") as caught:
        open_artifact(copy, "onnxruntime", "fp32")
    assert "\n" not in str(caught.value)


def test_failing_gate_fails_the_build(small_model, tmp_path, capsys):
    """INT8 calibrated on one flat grey image saturates on real photos: the gate must catch it."""
    import cv2
    flat = tmp_path / "flat"
    flat.mkdir()
    cv2.imwrite(str(flat / "grey.png"), np.full((256, 256, 3), 128, np.uint8))
    code = main(["build", "--prototxt", str(small_model[0]), "--caffemodel", str(small_model[1]),
                 "--output", str(tmp_path / "a"), "--precision", "fp32", "int8", "--calibration-images", str(flat)])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 1 and "validation failed: int8" in err and err.count("\n") == 1
    assert "FAIL int8 on" in captured.out, "the table and a line per failing check are still shown"
    assert (tmp_path / "a" / "manifest.json").exists(), "the manifest records the failed gate"


def test_a_reference_that_gives_nan_fails_the_build_and_a_previous_artifact_stays(small_model, small_artifact,
                                                                                  tmp_path, capsys):
    """Weights finite but so large that model.onnx gives NaN: nothing checked the reference itself, so a build
    into a folder holding a good artifact failed on OpenVINO's check only, and ONNX Runtime FP32 was then served
    NaN for every image (with default precisions the INT8 quantisers ended in a traceback first). Now the
    reference is checked first, and an artifact nothing in could run is not published: the good one stays (it
    was replaced by one every reader refused, an outage at the service's next restart)."""
    import json
    import shutil

    from engine_build.artifact import open_artifact
    from engine_build.caffe_io import write_caffemodel
    records = [(r.name, r.type, [b.copy() for b in r.blobs]) for r in iter_caffemodel(small_model[1], progress=False)]
    records[-1][2][0][...] = 3e38          # fc8: every logit overflows float32
    write_caffemodel(tmp_path / "huge.caffemodel", "huge", records)
    out = tmp_path / "art"
    shutil.copytree(small_artifact, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["build", "--prototxt", str(small_model[0]), "--caffemodel", str(tmp_path / "huge.caffemodel"),
                 "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == ("engine_build: error: validation failed: fp32 on onnxruntime (exact, model.onnx): "
                   "NaN or infinity in its output\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the previous artifact stays as it was"
    open_artifact(out, "onnxruntime", "fp32")[2].close()

    # an artifact whose reference failed (written by an older build, or by hand) is refused whole, in one line
    manifest = json.loads((out / "manifest.json").read_text())
    (reference,) = [c for c in manifest["validation"]["checks"] if (c["variant"], c["runtime"]) == ("fp32",
                                                                                                   "onnxruntime")]
    reference.update(nan=True, passed=False, max_abs_diff=float("nan"))
    (out / "manifest.json").write_text(json.dumps(manifest))
    for backend, precision in (("auto", None), ("onnxruntime", "fp32"), ("openvino", None), ("onnxruntime", "int8")):
        with pytest.raises(ArtifactError, match=r"art failed validation when it was built: fp32 on onnxruntime "
                                                r"\(exact, model.onnx\): NaN or infinity in its output; nothing in "
                                                r"it may run") as caught:
            open_artifact(out, backend, precision)
        assert "\n" not in str(caught.value)
    photo = next((Path(__file__).parents[1] / "engine_build" / "photos").glob("*.jpg"))
    (tmp_path / "list.txt").write_text(f"{photo.name} 1\n")
    assert main(["evaluate", str(out), "--images", str(photo.parent), "--list", str(tmp_path / "list.txt")]) == 1
    assert "failed validation when it was built" in capsys.readouterr().err


def test_fp32_on_onnxruntime_runs_only_where_the_reference_passed_its_check(small_artifact, tmp_path):
    """FP32 on ONNX Runtime was trusted whatever the manifest said; it now needs its record, like every variant."""
    import json
    import shutil

    from engine_build.artifact import select
    out = tmp_path / "art"
    shutil.copytree(small_artifact, out)
    assert select(out, "onnxruntime", "fp32")[1].reason == "explicit request"
    document = json.loads((out / "manifest.json").read_text())
    document["validation"]["checks"] = [c for c in document["validation"]["checks"]
                                        if (c["variant"], c["runtime"]) != ("fp32", "onnxruntime")]
    (out / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match=r"fp32 on onnxruntime: never validated \(the artifact predates the "
                                            r"reference's own check: rebuild it\)"):
        select(out, "onnxruntime", "fp32")


def test_tensorrt_missing_is_one_line_and_cpu_artifacts_still_built(small_model, tmp_path, capsys):
    code = main(["build", "--prototxt", str(small_model[0]), "--caffemodel", str(small_model[1]),
                 "--output", str(tmp_path / "t"), "--precision", "fp32", "fp16", "--tensorrt",
                 "--validation-images", str(Path(__file__).parents[1] / "engine_build" / "photos")])
    out = capsys.readouterr().out
    from engine_build.runtime.tensorrt_support import tensorrt_unavailable_reason
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT is present here: covered by the gpu tests")
    assert code == 0
    assert "TensorRT engine skipped:" in out and "pip install" in out
    assert (tmp_path / "t" / "model.fp16.onnx").exists() and not (tmp_path / "t" / "engine.plan").exists()


def test_evaluate_on_a_folder_and_list(small_artifact, tmp_path, capsys):
    import shutil
    images = tmp_path / "imgs"
    images.mkdir()
    photos = sorted((Path(__file__).parents[1] / "engine_build" / "photos").glob("*.jpg"))
    lines = []
    for i, p in enumerate(photos):
        shutil.copy(p, images / p.name)
        lines.append(f"{p.name} {i % 2}")
    lines.append("missing.jpg 1")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    lines.append("broken.jpg 0")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    assert main(["evaluate", str(small_artifact), "--images", str(images), "--list", str(tmp_path / "list.txt"),
                 "--backend", "onnxruntime", "--precision", "int8"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and f"/{len(photos)})" in out
    assert "skipped 1 listed images missing from the folder: missing.jpg" in out
    assert "skipped 1 unreadable images: broken.jpg (not_an_image)" in out
    assert "onnxruntime int8 file" in out and "PLACEHOLDER" in out


def test_evaluate_counts_no_class_for_nan_probabilities(tmp_path):
    """argmax of a NaN row is 0: evaluate counted every NaN answer as 'negative'. Such images are now
    counted apart, named, and in neither class."""
    import cv2

    from engine_build.evaluate import evaluate
    from tests.standins import PixelModel

    class DarkIsNaN(PixelModel):
        def _infer_impl(self, images):
            out = super()._infer_impl(images)
            out.probs[out.probs[:, 1] < 0.2] = np.nan
            return out
    entries = []
    for name, level, label in (("black.png", 0, 0), ("dark.png", 20, 0), ("white.png", 255, 1), ("grey.png", 200, 0)):
        cv2.imwrite(str(tmp_path / name), np.full((256, 256, 3), level, np.uint8))
        entries.append((name, label))
    result = evaluate(DarkIsNaN(), tmp_path, entries, batch=3, progress=False)
    assert (result.total, result.correct, result.confusion.tolist()) == (2, 1, [[0, 1], [0, 1]])
    assert "skipped 2 images the model gave NaN or infinite probabilities for (no class): black.png, dark.png" \
        in result.report()
    with pytest.raises(ConfigError, match="none of the 2 listed images could be evaluated from .*: 0 missing, "
                                          "0 unreadable, 2 with NaN or infinite probabilities"):
        evaluate(DarkIsNaN(), tmp_path, entries[:2], progress=False)


@pytest.mark.parametrize("argv,message", [
    (["build", "--prototxt", "/nope.prototxt", "--caffemodel", "/nope", "--output", "/tmp/x"],
     "--prototxt /nope.prototxt: no such file"),
    (["inspect", "/definitely/not/here"], "does not exist"),
    (["evaluate", "/definitely/not/here", "--images", "/tmp", "--list", "/nope.txt"], "cannot read list"),
    (["placeholder-model", "--output", "/tmp/x", "--seed", "-1"], "--seed -1: must be 0 or more"),
    (["placeholder-model", "--output", "/tmp/x", "--logit-std", "nan"], "--logit-std nan: must be a number above 0"),
    (["fetch-weights", "--dest", "/tmp/x", "--prototxt-url", "notaurl"],
     "--prototxt-url notaurl: not an http(s) or file URL"),
    (["placeholder-model", "--output", "/proc/no-such-process/model"], "No such file or directory: /proc/"),
])
def test_user_errors_are_one_line_exit_1(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_help_works_without_tensorrt(tmp_path):
    """With tensorrt and cuda made unimportable (as on a CPU host), --help still works."""
    for name in ("tensorrt", "cuda"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    probe = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "hidden by the test" in probe.stderr, "the shadow really hides TensorRT"
    cases = ((["--help"], "build"), (["build", "--help"], "--tensorrt"), (["inspect", "--help"], "--json"))
    for argv, expected in cases:
        result = subprocess.run([sys.executable, "-m", "engine_build", *argv], capture_output=True, text=True,
                                env=env, cwd=Path(__file__).resolve().parents[1])
        assert result.returncode == 0 and expected in result.stdout, result.stderr


@pytest.mark.slow
def test_full_size_caffemodel_memory_bound(full_model):
    """Loading 217 MiB of weights stays under two copies of them (plus the interpreter)."""
    code = f"""
import resource, sys
from engine_build.caffe_io import iter_caffemodel, load_prototxt
from engine_build.caffe_net import attach_weights, build_net
import numpy, onnxruntime, google.protobuf, tqdm
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
net = build_net(load_prototxt({str(full_model[0])!r}))
attach_weights(net, iter_caffemodel({str(full_model[1])!r}, progress=True))
weights = sum(w.nbytes for l in net.learned() for w in l.weights)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(weights, (peak - base) * 1024)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    weights, grown = map(int, result.stdout.split())
    assert weights > 200 * 2**20
    assert grown < 2 * weights, f"grew {grown / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights"


def test_uint8_input_feeds_only_a_cast_as_tensorrt_requires(small_artifact):
    """TensorRT accepts a uint8 network input only as the input of a Cast."""
    for name in ("model.onnx", "model.fp16.onnx"):
        graph = onnx.load(str(small_artifact / name)).graph
        consumers = [n for n in graph.node if "images" in n.input]
        assert [n.op_type for n in consumers] == ["Cast"], name
        assert consumers[0].attribute[0].i == onnx.TensorProto.FLOAT


def test_onnx_classifier_import_matches_the_caffe_import(small_model, small_artifact, tmp_path, photos):
    """The same net given as an ONNX classifier yields the same artifact outputs."""
    from engine_build.caffe_io import iter_caffemodel, load_prototxt
    from engine_build.caffe_net import attach_weights, build_net
    from engine_build.onnx_graph import build_classifier_onnx
    net = build_net(load_prototxt(small_model[0]))
    attach_weights(net, iter_caffemodel(small_model[1], progress=False))
    classifier = build_classifier_onnx(net)
    classifier.opset_import[0].version = 13      # an older exporter: converted to our opset on import
    onnx.save(classifier, tmp_path / "classifier.onnx")
    out = tmp_path / "from-onnx"
    # the small model's random layers exceed the default INT8 bound (see conftest.small_artifact)
    assert main(["build", "--onnx", str(tmp_path / "classifier.onnx"), "--output", str(out),
                 "--int8-max-diff", "0.1", "--int8-mean-diff", "0.02"]) == 0
    manifest = read_manifest(out)
    assert set(manifest["model"]["source"]) == {"onnx"} and manifest["model"]["placeholder"] is False
    assert all(c["passed"] for c in manifest["validation"]["checks"])
    for variant, atol in (("model.onnx", 0.0), ("model.fp16.onnx", 5e-3)):
        with open_backend("onnxruntime", out / variant, "fp32") as ours, \
                open_backend("onnxruntime", small_artifact / variant, "fp32") as caffe:
            np.testing.assert_allclose(ours.infer(photos).probs, caffe.infer(photos).probs, atol=max(atol, 1e-6))


@pytest.mark.parametrize("shape,message", [([None, 3, 224, 224], r"must be float32 \[N,3,227,227\]"),
                                           ([None, 1, 227, 227], r"must be float32 \[N,3,227,227\]")])
def test_onnx_classifier_with_wrong_input_is_one_line(tmp_path, shape, message, capsys):
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 1, 1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "bad.onnx")
    assert main(["build", "--onnx", str(tmp_path / "bad.onnx"), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert __import__("re").search(message, err) and err.count("\n") == 1


def _tiny_classifier(path: Path, weights: np.ndarray, declared: list) -> Path:
    """An ONNX classifier of Caffe's data blob: mean of each channel, then one Gemm with ``weights``
    [classes, 3]; its output declared ``declared``."""
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1)]
    data = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 227, 227])
    graph = helper.make_graph(nodes, "tiny", [data], [helper.make_tensor_value_info("y", TensorProto.FLOAT, declared)],
                              [numpy_helper.from_array(weights.astype(np.float32), "W"),
                               numpy_helper.from_array(np.zeros(len(weights), np.float32), "B")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused_at_import_in_one_line(small_model, tmp_path, value, capsys):
    """NaN weights were imported and validated against a NaN reference; the build failed, but its artifact
    replaced a good one and ONNX Runtime FP32 was served, NaN for every image. Now the import refuses them,
    Caffe or ONNX, before anything is written."""
    from engine_build.caffe_io import write_caffemodel
    records = [(r.name, r.type, [b.copy() for b in r.blobs]) for r in iter_caffemodel(small_model[1], progress=False)]
    records[-1][2][0][0, 0] = value
    write_caffemodel(tmp_path / "bad.caffemodel", "bad", records)
    weights = np.full((2, 3), 0.1)
    weights[1, 2] = value
    for source in (["--prototxt", str(small_model[0]), "--caffemodel", str(tmp_path / "bad.caffemodel")],
                   ["--onnx", str(_tiny_classifier(tmp_path / "bad.onnx", weights, ["N", 2]))]):
        assert main(["build", *source, "--output", str(tmp_path / "never"), "--precision", "fp32"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "NaN or infinite values" in err, err
        assert ("layer 'fc8_twitter': weights" if "--onnx" not in source else "initializer 'W'") in err
        assert not (tmp_path / "never").exists()


def test_a_classifier_that_computes_another_shape_than_it_declares_is_refused(small_artifact, tmp_path, capsys):
    """A classifier declaring [N,2] and computing [N,3] built with exit 0 and served [N,3] probabilities. The
    reference run now checks the computed shape: one line, nothing written, the previous artifact kept."""
    import shutil
    lying = _tiny_classifier(tmp_path / "lying.onnx", np.full((3, 3), 0.1), ["N", 2])
    out = tmp_path / "art"
    shutil.copytree(small_artifact, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["build", "--onnx", str(lying), "--output", str(out), "--precision", "fp32"]) == 1
    err = capsys.readouterr().err
    assert err == ("engine_build: error: the model computes probabilities of shape [48, 3] for 48 images "
                   "(model.onnx on ONNX Runtime): a sentiment model gives [N, 2] (negative, positive), "
                   "whatever its output declares\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no staging folder left"
    honest = _tiny_classifier(tmp_path / "honest.onnx", np.full((2, 3), 0.1), ["N", 2])
    assert main(["build", "--onnx", str(honest), "--output", str(tmp_path / "ok"), "--precision", "fp32"]) == 0


def test_build_needs_one_kind_of_source(tmp_path, capsys, small_model):
    assert main(["build", "--prototxt", str(small_model[0]), "--onnx", str(small_model[1]),
                 "--output", str(tmp_path)]) == 1
    assert "either --prototxt and --caffemodel, or --onnx" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--int8-max-diff", "1.5"], "--int8-max-diff 1.5: must be between 0 and 1"),
    (["--confident-margin", "0.7"], "--confident-margin 0.7: must be between 0 and 0.5"),
    (["--max-batch", "0"], "--max-batch 0: must be at least 1"),
    (["--validation-images", "/definitely/not/here"], "--validation-images /definitely/not/here: no such folder"),
    (["--calibration-images", "/etc/hostname"], "--calibration-images /etc/hostname: no such folder"),
    (["--precision", "fp32", "int8", "--tensorrt"], "--tensorrt builds from the FP16 model"),
])
def test_bad_build_requests_fail_before_any_work(small_model, tmp_path, extra, message, capsys):
    out = tmp_path / "never"
    assert main(["build", "--prototxt", str(small_model[0]), "--caffemodel", str(small_model[1]),
                 "--output", str(out)] + extra) == 1
    assert message in capsys.readouterr().err
    assert not out.exists(), "nothing was written"


@pytest.mark.parametrize("batch", ["0", "-3"])
def test_evaluate_batch_below_one_is_one_line(small_artifact, tmp_path, batch, capsys):
    (tmp_path / "list.txt").write_text("a.jpg 1\n")
    assert main(["evaluate", str(small_artifact), "--images", str(tmp_path), "--list", str(tmp_path / "list.txt"),
                 "--batch", batch]) == 1
    err = capsys.readouterr().err
    assert f"--batch {batch}: must be at least 1" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["build", "placeholder-model"])
def test_output_pointing_at_a_file_is_one_line(small_model, tmp_path, command, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    extra = ["--prototxt", str(small_model[0]), "--caffemodel", str(small_model[1])] if command == "build" else []
    assert main([command, "--output", str(target)] + extra) == 1
    err = capsys.readouterr().err
    assert f"--output {target}: is a file" in err and err.count("\n") == 1
    assert target.read_text() == "keep me"


def test_inspect_json_into_a_closed_pipe_ends_quietly(small_artifact):
    """The reader closed the pipe before the first write and output is unbuffered (``python -u``), so
    the write itself fails, not the flush at exit: the command still ends quietly with 0."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-u", "-m", "engine_build", "inspect", "--json", str(small_artifact)],
                                stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                                cwd=Path(__file__).resolve().parents[1])
    finally:
        os.close(write)
    assert result.stderr == "" and result.returncode == 0, result


@pytest.mark.parametrize("json_flag", [["--json"], []])
def test_inspect_into_a_reader_that_quit_ends_quietly(small_artifact, json_flag):
    """``inspect DIR | head``: the reader has what it wanted (here ``true`` quits before Python writes at all;
    the table fits the pipe's buffer and failed only when Python flushed it at exit)."""
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m engine_build inspect "
                                           f"{' '.join(json_flag)} {small_artifact} | true"],
                            capture_output=True, text=True, timeout=120)
    assert result.stderr == "" and result.returncode == 0, result


@pytest.mark.parametrize("argv,message", [
    (["build"], "missing --output (or ENGINE_BUILD_OUTPUT)"),
    (["build", "--output", "o", "--onnx", "m.onnx", "--max-batch", "many"], "--max-batch='many': expected int"),
    (["inspect"], "the following arguments are required: artifact"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["fetch-weights", "--dest"], "expected one argument"),
])
def test_usage_errors_are_one_line_exit_1_as_stream_does(argv, message, capsys):
    from stream.cli import main as stream_main
    assert stream_main(["--max-batch"], {}) == 1          # the convention to follow
    capsys.readouterr()
    assert main(argv, {}) == 1
    err = capsys.readouterr().err
    assert err.startswith("engine_build: error: ") and message in err and err.count("\n") == 1, err


def test_build_flags_have_environment_twins_and_a_flag_wins():
    """``ENGINE_BUILD_<FLAG>`` fills a flag not given: several values comma-separated, a switch true or
    false (``--no-x`` undoes it), an empty list for a flag that takes none."""
    from engine_build.cli import parser
    from engine_build.config import OPTIONS
    environ = {"ENGINE_BUILD_OUTPUT": "out", "ENGINE_BUILD_ONNX": "m.onnx", "ENGINE_BUILD_PRECISION": "fp32, fp16",
               "ENGINE_BUILD_TENSORRT": "true", "ENGINE_BUILD_INT8_FLOAT_LAYERS": "", "ENGINE_BUILD_MAX_BATCH": "8"}
    cfg = OPTIONS.from_args(parser().parse_args(["build", "--max-batch", "4"]), environ)
    assert (cfg.output, cfg.onnx, cfg.precisions) == (Path("out"), Path("m.onnx"), ("fp32", "fp16"))
    assert cfg.tensorrt is True and cfg.int8_float_layers == () and cfg.max_batch == 4
    cfg = OPTIONS.from_args(parser().parse_args(["build", "--no-tensorrt", "--precision", "int8", "fp32"]), environ)
    assert cfg.tensorrt is False and cfg.precisions == ("int8", "fp32") and cfg.max_batch == 8
    plain = OPTIONS.from_args(parser().parse_args(["build", "--output", "o", "--onnx", "m"]), {})
    assert plain.int8_float_layers is None and plain.tensorrt is False


@pytest.mark.parametrize("name,value,message", [
    ("ENGINE_BUILD_MAX_BATCH", "many", "ENGINE_BUILD_MAX_BATCH='many': expected int"),
    ("ENGINE_BUILD_TENSORRT", "maybe", "ENGINE_BUILD_TENSORRT='maybe': expected one of 1, true"),
    ("ENGINE_BUILD_PRECISION", "fp32,fp8", "--precision fp8: choose from fp32, fp16, int8"),
    ("ENGINE_BUILD_INT8_QUANTIZER", "best", "--int8-quantizer best: choose from auto, nncf, minmax"),
])
def test_bad_build_environment_values_are_one_line(tmp_path, name, value, message, capsys):
    out = tmp_path / "never"
    assert main(["build", "--onnx", str(tmp_path / "m.onnx")], {"ENGINE_BUILD_OUTPUT": str(out), name: value}) == 1
    err = capsys.readouterr().err
    assert err.startswith("engine_build: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_failed_build_leaves_no_half_written_artifact(small_model, small_artifact, tmp_path):
    """A crash mid-build (here: in quantisation) keeps the previous artifact as it was, and no staging folder."""
    import shutil

    from engine_build.build import run_build
    from engine_build.config import BuildConfig
    out = tmp_path / "art"
    shutil.copytree(small_artifact, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written: list[str] = []

    def crash(cfg, fp32, calibration):
        written.extend(p.name for p in cfg.output.iterdir())
        raise RuntimeError("simulated crash during quantisation")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_build(BuildConfig(prototxt=small_model[0], caffemodel=small_model[1], output=out), quantize=crash)
    assert "model.onnx" in written, "the crash came half way, with files already written"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"], "the staging folder is gone"
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        run_build(BuildConfig(prototxt=small_model[0], caffemodel=small_model[1], output=fresh), quantize=crash)
    assert not fresh.exists()


def test_a_sigterm_in_a_build_step_stops_the_build_after_that_step_not_inside_it(small_model, tmp_path,
                                                                                  monkeypatch):
    """An exception raised from the signal handler landed wherever the main thread was: inside the import of a
    native module it read "ImportError: initialization failed" (exit 1, not 130), elsewhere the process died by
    SIGINT after saying it was interrupted. The first SIGTERM now only asks: the step under way (here the INT8
    step, which signals its own process) runs to its end, and the build stops at its next checkpoint, leaving
    nothing behind."""
    import os
    import signal

    from engine_build.build import run_build
    from engine_build.config import BuildConfig
    from engine_build.interrupts import stop_on_signals
    finished: list[str] = []

    def signalled_mid_step(cfg, fp32, calibration):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(20):   # where the handler's exception used to land: pure Python between two calls
            time.sleep(0.01)
        finished.append("int8 step")
        return {"*": fp32}, {}, {}
    out = tmp_path / "art"
    validated: list[object] = []
    monkeypatch.setattr("engine_build.build.run_checks", lambda *args, **kwargs: validated.append(args))
    # what the worker had before (an in-process `python -m stream` test leaves its own handlers behind)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals(), pytest.raises(KeyboardInterrupt):
        run_build(BuildConfig(prototxt=small_model[0], caffemodel=small_model[1], output=out),
                  quantize=signalled_mid_step)
    assert finished == ["int8 step"], "the step the signal came in ran to its end"
    assert not validated, "and the build stopped at the next checkpoint, before validating"
    assert list(tmp_path.iterdir()) == [], "no staging folder and no artifact"
    assert {sig: signal.getsignal(sig) for sig in before} == before, "the handlers are put back"


def test_signals_while_an_artifact_is_moved_into_place_or_while_stopping_never_cut_it_short(small_model, tmp_path,
                                                                                             monkeypatch):
    """Two signals during the move of a finished artifact into place left it half published (the new fp16 file
    beside the old manifest); two during the stop's cleanup cut the cleanup and the process died by the
    signal. Now a signal in either only notes the stop."""
    import os
    import signal

    from engine_build import build as build_module
    from engine_build.build import run_build
    from engine_build.config import BuildConfig
    from engine_build.interrupts import stop_on_signals
    real_publish = build_module._publish

    def signalled_publish(staging, output):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(20):
            time.sleep(0.005)
        real_publish(staging, output)
    monkeypatch.setattr(build_module, "_publish", signalled_publish)
    out = tmp_path / "art"
    with stop_on_signals():
        run_build(BuildConfig(prototxt=small_model[0], caffemodel=small_model[1], output=out, precisions=("fp32",)))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"], "published whole"

    def signalled_twice(cfg, fp32, calibration):
        os.kill(os.getpid(), signal.SIGTERM)
        return {"*": fp32}, {}, {}
    removed: list[str] = []
    monkeypatch.setattr(build_module.shutil, "rmtree", lambda path, **kw: (os.kill(os.getpid(), signal.SIGTERM),
                                                                         removed.append(str(path))))
    with stop_on_signals(), pytest.raises(KeyboardInterrupt):
        run_build(BuildConfig(prototxt=small_model[0], caffemodel=small_model[1], output=tmp_path / "b"),
                  quantize=signalled_twice)
    assert [Path(p).name.split("-")[0] for p in removed] == [".building", ".making"], \
        "the cleanup ran to its end (each of the staging folder's two names) despite a second signal in it"


def test_evaluate_by_default_runs_what_the_service_would(small_artifact, tmp_path, capsys):
    import shutil

    from engine_build.artifact import select
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(Path(__file__).parents[1] / "engine_build" / "photos" / "coffee.jpg", images / "coffee.jpg")
    (tmp_path / "list.txt").write_text("coffee.jpg 1\n")
    _, service = select(small_artifact, "auto")
    assert main(["evaluate", str(small_artifact), "--images", str(images), "--list", str(tmp_path / "list.txt")]) == 0
    out = capsys.readouterr().out
    assert f"{service.backend} {service.precision} file" in out and service.reason in out
    assert main(["evaluate", str(small_artifact), "--images", str(images), "--list", str(tmp_path / "list.txt"),
                 "--backend", "onnxruntime", "--precision", "fp32"]) == 0
    assert "onnxruntime fp32 file" in capsys.readouterr().out


def test_build_shows_each_step_as_it_starts(small_model, tmp_path, capsys):
    """A first build took a minute in silence: each step is said as it starts, with the seconds so far."""
    assert main(["build", "--prototxt", str(small_model[0]), "--caffemodel", str(small_model[1]),
                 "--output", str(tmp_path / "a"), "--int8-max-diff", "0.1", "--int8-mean-diff", "0.02"]) == 0
    captured = capsys.readouterr()
    steps = [line for line in captured.out.splitlines() if re.match(r"engine_build: \[ *\d+\.\d s\] ", line)]
    expected = ["importing", "imported", "writing model.onnx", "FP16 range audit: model.onnx on 48",
                "writing model.fp16.onnx", "calibrating INT8 (NNCF", "INT8 sensitivity (openvino)",
                "calibrating INT8 (ONNX Runtime MinMax", "INT8 sensitivity (onnxruntime)",
                "validating every variant", "checked fp32 on openvino (exact)", "checked fp16 on onnxruntime",
                "checked int8 on onnxruntime", "checked int8 on openvino (exact)"]
    at = [next((i for i, line in enumerate(steps) if step in line), -1) for step in expected]
    assert -1 not in at and at == sorted(at), "\n".join(steps)
    assert captured.out.index("validating every variant") < captured.out.index("calibration 48 images")
    assert captured.err == ""


def test_sigterm_during_a_build_removes_its_staging_folder(small_model, tmp_path):
    """``timeout`` or a supervisor stops a build with SIGTERM: it ends as Ctrl-C does (exit 130) and leaves no
    staging folder in its output (326 MB for the full-size model)."""
    import signal
    import subprocess
    import sys
    import time
    build = subprocess.Popen([sys.executable, "-m", "engine_build", "build", "--prototxt", str(small_model[0]),
                              "--caffemodel", str(small_model[1]), "--output", str(tmp_path / "art")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("art/.building-*")) and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(tmp_path.glob("art/.building-*")), "the build started staging"
        build.send_signal(signal.SIGTERM)
        _, err = build.communicate(timeout=60)
    finally:
        build.kill()
    assert build.returncode == 130 and "engine_build: interrupted" in err, err
    assert not list(tmp_path.glob("art/.building-*")) and not (tmp_path / "art").exists()


def tiny_classifier(path: Path, nan: bool = False, batch: int | str = "N", reshape_to: int | None = None) -> Path:
    """A two-score ONNX classifier over Caffe's data blob (pool, flatten, one Gemm) that builds in about a second
    with ``--precision fp32``; ``nan``: a weight so large that its outputs overflow to NaN (finite weights pass the
    import; the reference's gate fails); ``batch``: the batch dimension
    it declares; ``reshape_to``: a Reshape to [reshape_to, 3] in place of the Flatten, as an export without
    dynamic axes writes (with ``batch`` 1)."""
    from onnx import TensorProto, helper, numpy_helper
    weights = np.random.default_rng(0).normal(0, 0.05, (2, 3)).astype(np.float32)
    if nan:
        weights[0, 0] = 3e38
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.zeros(2, np.float32), "B")]
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"])]
    if reshape_to is not None:
        inits.append(numpy_helper.from_array(np.array([reshape_to, 3], np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["g", "shape"], ["f"], name="flatten"))
    else:
        nodes.append(helper.make_node("Flatten", ["g"], ["f"]))
    nodes.append(helper.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 227, 227])
    graph = helper.make_graph(nodes, "tiny", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("precision", [["fp32"], ["fp16"]])
def test_an_onnx_classifier_with_a_fixed_batch_dimension_is_refused_in_one_line(tmp_path, precision, capfd):
    """An export without dynamic axes ([1,3,227,227], a Reshape to [1, 3]) was accepted and then failed in ONNX
    Runtime on the first batch of 4 or 16 (the FP16 range audit or the FP32 reference): a 46-line traceback."""
    model = tiny_classifier(tmp_path / "batch1.onnx", batch=1, reshape_to=1)
    assert main(["build", "--onnx", str(model), "--output", str(tmp_path / "o"), "--precision", *precision]) == 1
    err = capfd.readouterr().err
    assert err == (f"engine_build: error: --onnx {model}: input 'x' has a fixed batch dimension 1; it must be dynamic: "
                   "export with dynamic axes (torch.onnx.export(..., dynamic_axes={'x': {0: 'N'}, 'y': {0: 'N'}}))\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("precision,step", [("fp32", ""), ("fp16", "FP16 range audit: ")])
def test_a_classifier_onnx_runtime_cannot_run_is_one_line_naming_the_node(tmp_path, precision, step, capfd):
    """A classifier declaring a dynamic batch that its Reshape does not keep: ONNX Runtime's own exception (and its
    own log line on stderr) became a traceback from whichever step ran it first."""
    model = tiny_classifier(tmp_path / "lies.onnx", reshape_to=1)
    assert main(["build", "--onnx", str(model), "--output", str(tmp_path / "o"), "--precision", precision]) == 1
    err = capfd.readouterr().err
    assert err.startswith(f"engine_build: error: {step}ONNX Runtime cannot run model.onnx: ") and err.count("\n") == 1
    assert "Reshape node. Name:'classifier/flatten'" in err


FAILED_GATE = "engine_build: error: validation failed: fp32 on onnxruntime"


@pytest.mark.parametrize("nan,last_read,stderr_too,code,err", [
    (True, "importing", False, 1, FAILED_GATE),
    (True, "checking the reference", False, 1, FAILED_GATE),   # quits before the report
    (True, "importing", True, 1, ""),                                      # 2>&1 | head -1: the status says it
    (False, "importing", False, 0, "")])
def test_a_build_into_a_reader_that_quits_exits_as_the_build_ended_without_tracebacks(tmp_path, nan, last_read,
                                                                                      stderr_too, code, err):
    """``build ... | head``: a failed gate still exits 1 and says so on stderr (its report to the closed
    stdout had raised BrokenPipeError in its place, and exit 0 followed); a passing build exits 0; neither
    prints a traceback (each progress line after the reader quit printed a logging error)."""
    model = tiny_classifier(tmp_path / "tiny.onnx", nan=nan)
    with open(tmp_path / "stderr", "w+") as stderr:
        build = subprocess.Popen([sys.executable, "-m", "engine_build", "build", "--onnx", str(model),
                                  "--output", str(tmp_path / "art"), "--precision", "fp32"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT if stderr_too else stderr,
                                 text=True, cwd=Path(__file__).resolve().parents[1])
        try:
            assert build.stdout is not None
            while last_read not in (line := build.stdout.readline()):
                assert line, f"the build ended before saying {last_read!r}"
            build.stdout.close()          # as head does, with the build's next lines still to come
            assert build.wait(timeout=120) == code
        finally:
            build.kill()
        stderr.seek(0)
        text = stderr.read()
    assert text.startswith(err) and text.count("\n") == (1 if err else 0), text
