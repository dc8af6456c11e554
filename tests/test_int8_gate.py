"""INT8 that holds on a model with many near-ties, and a gate that means something."""
from __future__ import annotations

import contextlib
import io
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
def near_tie_build(near_tie_model, tmp_path_factory) -> tuple[Path, str, str]:
    """The near-tie model built by the build steps themselves (``run_build``, as ``build --precision
    fp32 int8`` runs them), once per session: the artifact, and what the steps wrote to stdout and stderr."""
    from engine_build.build import run_build
    from engine_build.config import BuildConfig
    out = tmp_path_factory.mktemp("near-tie-artifact") / "artifact"
    printed, warned = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(warned):
        run_build(BuildConfig(prototxt=near_tie_model[0], caffemodel=near_tie_model[1], output=out,
                              precisions=("fp32", "int8")))
    return out, printed.getvalue(), warned.getvalue()


@pytest.fixture(scope="session")
def near_tie_artifact(near_tie_build) -> Path:
    return near_tie_build[0]


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
                 "--output", str(out), "--precision", "fp32", "int8", "--int8-quantizer", "minmax",
                 "--int8-float-layers", "fc8_twitter"]) == 0     # which layers stay float is not the point here
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
                 "--output", str(out), "--precision", "fp32", "int8", "--int8-max-diff", "0.001",
                 # the layers the sensitivity pass always floats; the pass itself, aiming at 0.00075, would
                 # probe every layer of both quantisers before failing just the same
                 "--int8-float-layers", "fc8_twitter"])
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
    from engine_build.cli import parser
    from engine_build.config import OPTIONS, BuildConfig
    from engine_build.errors import ConfigError
    args = parser().parse_args(["build", "--output", "out", "--onnx", "m.onnx"])
    assert OPTIONS.from_args(args, {}) == BuildConfig(output=Path("out"), onnx=Path("m.onnx"))
    flagged = {f.name for f in OPTIONS.fields}
    assert flagged <= set(vars(args)) and {"confident_margin", "int8_max_diff", "fp16_mean_diff"} <= flagged
    with pytest.raises(ConfigError, match="--fp16-max-diff -1: must be between 0 and 1"):
        BuildConfig(output=Path("out"), onnx=Path("m.onnx"), fp16_max_diff=-1)
    with pytest.raises(ConfigError, match="either --prototxt and --caffemodel, or --onnx"):
        OPTIONS.from_args(parser().parse_args(["build", "--output", "out"]), {})


def test_build_steps_do_not_print(near_tie_build):
    """The session's near-tie build ran every step (import, both quantisers with their sensitivity
    passes, validation) with stdout and stderr captured: nothing was written to either."""
    _, printed, warned = near_tie_build
    assert printed == "" and warned == ""


# --- the same numbers on every CPU, the logits never clipped, the CPU recorded and re-checked ---------------------

def _int8_weights(path: Path) -> dict[str, np.ndarray]:
    """The int8 weight tensors a Conv/Gemm of ``path`` multiplies by, by consuming layer."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dequantized = {n.output[0]: inits[n.input[0]] for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8}
    return {n.name: dequantized[i] for n in model.graph.node if n.op_type in ("Conv", "Gemm")
            for i in n.input if i in dequantized}


def test_both_int8_files_keep_weights_to_7_bits(near_tie_artifact):
    """Without VNNI the int8 kernels add pairs of uint8 x int8 products in saturating 16-bit sums;
    255 x 64 x 2 fits, 255 x 127 x 2 does not. Weights within [-64, 64] compute the same on every x86 CPU."""
    for name in ("model.int8.onnx", "model.int8.onnxruntime.onnx"):
        weights = _int8_weights(near_tie_artifact / name)
        assert len(weights) == 7, (name, sorted(weights))          # every layer but the logits layer
        wide = {layer: (int(w.min()), int(w.max())) for layer, w in weights.items() if w.min() < -64 or w.max() > 64}
        assert not wide, f"{name}: 8-bit weights can saturate on AVX2: {wide}"


def test_the_logits_layer_stays_in_float_and_the_manifest_and_inspect_say_so(near_tie_artifact, capsys):
    import onnx
    manifest = read_manifest(near_tie_artifact)
    assert manifest["int8"]["float_layers"] == {"nncf": ["fc8_twitter"], "minmax": ["fc8_twitter"]}
    assert manifest["int8"]["chosen_by"] == "sensitivity pass"
    passes = manifest["int8"]["passes"]
    assert set(passes) == {"nncf", "minmax"}, "each quantiser probed with itself"
    for record in passes.values():
        assert record["output_layers"] == ["fc8_twitter"]
        assert record["held_out_max_abs_diff"]["chosen"] <= record["target_max_abs_diff"] == pytest.approx(0.02625)
    files = manifest["files"]["int8"]
    assert files["quantizer"]["float_layers"] == ["fc8_twitter"]
    assert files["by_runtime"]["onnxruntime"]["quantizer"]["float_layers"] == ["fc8_twitter"]
    for name in ("model.int8.onnx", "model.int8.onnxruntime.onnx"):
        graph = onnx.load(str(near_tie_artifact / name)).graph
        fc8 = next(n for n in graph.node if n.name == "fc8_twitter")
        assert not any(n.op_type == "QuantizeLinear" and fc8.output[0] in n.input for n in graph.node), \
            f"{name}: the logits are quantised"
    assert main(["inspect", str(near_tie_artifact)]) == 0
    out = capsys.readouterr().out
    assert "int8        nncf: layers in float: fc8_twitter (chosen by sensitivity pass)" in out
    assert "minmax: layers in float: fc8_twitter (chosen by sensitivity pass)" in out
    assert "nncf: held-out calibration folds max |dp|" in out and "minmax: held-out" in out


def test_every_check_records_the_cpu_it_ran_on(near_tie_artifact, capsys):
    from engine_build.runtime.cpu import this_cpu
    checks = read_manifest(near_tie_artifact)["validation"]["checks"]
    assert checks and all(c["cpu"] == this_cpu() for c in checks)
    assert this_cpu()["model"] and this_cpu()["machine"]
    assert main(["inspect", str(near_tie_artifact)]) == 0
    assert f"checked on  {this_cpu()['model']}" in capsys.readouterr().out


AVX512_VNNI = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n"
               "flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni\n\nprocessor\t: 1\n"
               "model name\t: ignored\nflags\t\t: fpu\n")
AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma f16c sha_ni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm bf16 sve\nCPU implementer\t: 0x41\n"


def test_cpu_description_keeps_the_extensions_that_pick_kernels():
    from engine_build.runtime.cpu import describe_cpu, numerics_differ
    intel, amd, arm = describe_cpu(AVX512_VNNI), describe_cpu(AVX2), describe_cpu(ARM)
    assert intel["model"] == "Intel(R) Xeon(R) Gold 6338"
    assert intel["extensions"] == ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni"]
    assert amd["extensions"] == ["avx2", "fma", "f16c"]              # sha_ni, sse2 change no result
    assert arm["extensions"] == ["asimd", "asimddp", "i8mm", "bf16", "sve"]
    assert numerics_differ(intel, dict(intel, model="another name")) is None
    why = numerics_differ(intel, amd)
    assert why == ("validated on Intel(R) Xeon(R) Gold 6338; this CPU (AMD EPYC 7B13) "
                   "lacks avx512f, avx512bw, avx512_vnni")
    assert "adds avx512f" in numerics_differ(amd, intel)
    assert numerics_differ(None, amd) == "its CPU was not recorded"
    assert "validated on aarch64, running on x86_64" in numerics_differ(dict(arm, machine="aarch64"),
                                                                         dict(amd, machine="x86_64"))


def _validated_elsewhere(artifact: Path, tmp_path: Path, int8_max_diff: float | None = None) -> Path:
    """A copy of ``artifact`` whose manifest says its checks ran on another CPU (and, optionally,
    whose recorded INT8 gate is ``int8_max_diff``)."""
    from engine_build.manifest import write_manifest
    copy = tmp_path / "elsewhere"
    shutil.copytree(artifact, copy)
    manifest = read_manifest(copy)
    for check in manifest["validation"]["checks"]:
        check["cpu"] = {"model": "AMD EPYC 7B13", "machine": check["cpu"]["machine"], "extensions": ["avx2", "fma"]}
    if int8_max_diff is not None:
        manifest["validation"]["gate"]["bounds"]["int8"]["max_abs_diff"] = int8_max_diff
    write_manifest(copy, manifest)
    return copy


def test_a_variant_validated_on_another_cpu_is_rechecked_where_it_opens(near_tie_artifact, tmp_path, caplog):
    import logging

    from engine_build.artifact import open_artifact
    caplog.set_level(logging.INFO, logger="engine_build")
    _, choice, backend = open_artifact(_validated_elsewhere(near_tie_artifact, tmp_path), "openvino", "int8", True)
    backend.close()
    assert choice.precision == "int8"
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("re-checking int8 on openvino before use: validated on AMD EPYC 7B13")
               for m in lines), lines
    assert any(m.startswith("re-check passed on this CPU: int8 on openvino max |dp|") for m in lines), lines


def test_a_variant_that_fails_its_recheck_is_refused_with_the_numbers(near_tie_artifact, tmp_path, caplog):
    import logging

    from engine_build.artifact import open_artifact
    from engine_build.errors import ArtifactError
    strict = _validated_elsewhere(near_tie_artifact, tmp_path, int8_max_diff=0.0001)
    caplog.set_level(logging.INFO, logger="engine_build")
    _, choice, backend = open_artifact(strict, "openvino")             # int8 first, as it passed at build time
    backend.close()
    assert (choice.precision, choice.exact) == ("fp32", True), "fell back to FP32, computed exactly"
    refused = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refused) == 1 and "\n" not in refused[0].getMessage()
    assert "int8 on openvino (runtime default) fails its gate on this CPU" in refused[0].getMessage()
    assert "max |dp|" in refused[0].getMessage() and "> 0.0001" in refused[0].getMessage()
    with pytest.raises(ArtifactError, match=r"int8 on onnxruntime fails its gate on this CPU .*max \|dp\| "):
        open_artifact(strict, "onnxruntime", "int8")


def test_the_same_cpu_opens_without_a_recheck(near_tie_artifact, caplog):
    import logging

    from engine_build.artifact import open_artifact
    caplog.set_level(logging.INFO, logger="engine_build")
    _, choice, backend = open_artifact(near_tie_artifact, "onnxruntime", "int8")
    backend.close()
    assert choice.precision == "int8"
    assert not any("re-check" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_sensitivity_pass_ranks_every_layer_and_floats_the_most_sensitive_first(near_tie_artifact, tmp_path):
    import onnx

    from engine_build.imagesets import builtin_set
    from engine_build.quantize import output_layers, quantizable_layers, quantize_minmax
    from engine_build.sensitivity import choose_float_layers, split_folds
    fp32 = near_tie_artifact / "model.onnx"
    calibration = builtin_set("calibration")
    (one, one_names), (two, two_names) = split_folds(calibration)
    assert len(one) == len(two) == 24 and not set(one_names) & set(two_names)
    graph = onnx.load(str(fp32)).graph
    layers = quantizable_layers(graph)
    # a target no INT8 file meets: every layer is probed, and the ranking decides what goes to float
    choice = choose_float_layers(fp32, calibration, 1e-6, 1e-6, quantize_minmax, "onnxruntime", layers, tmp_path,
                                 always_float=output_layers(graph))
    assert set(choice.sensitivity) == set(layers) - {"fc8_twitter"}
    ranked = sorted(choice.sensitivity, key=lambda layer: -choice.sensitivity[layer])
    assert choice.chosen > choice.target, "no choice meets it"
    tried = [("fc8_twitter", *ranked[:n]) for n in range(len(ranked))]
    assert choice.float_layers in tried, "the most sensitive first"
    assert list(tmp_path.iterdir()) == [], "probe files are removed"


def test_int8_float_layers_flag(near_tie_model, tmp_path, capsys):
    base = ["build", "--prototxt", str(near_tie_model[0]), "--caffemodel", str(near_tie_model[1]),
            "--precision", "fp32", "int8", "--int8-quantizer", "minmax"]
    assert main([*base, "--output", str(tmp_path / "bad"), "--int8-float-layers", "fc9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--int8-float-layers fc9: not a quantisable layer of model.onnx" in err
    assert main([*base, "--output", str(tmp_path / "all"), "--int8-float-layers", "--int8-max-diff", "1"]) == 0
    record = read_manifest(tmp_path / "all")["int8"]
    assert record == {"chosen_by": "--int8-float-layers", "float_layers": {"minmax": []}}
    assert len(_int8_weights(tmp_path / "all" / "model.int8.onnx")) == 8


@pytest.fixture(scope="session")
def full_near_tie_model(tmp_path_factory) -> tuple[Path, Path]:
    """A full-size placeholder with many near-ties: error a quarter-width model does not show."""
    from engine_build.placeholder import write_placeholder
    return write_placeholder(tmp_path_factory.mktemp("full-near-ties"), seed=3, logit_std=0.3)


@pytest.mark.slow
def test_full_size_int8_holds_within_0035_on_photos_the_build_never_saw(full_near_tie_model, tmp_path):
    out = tmp_path / "full"
    assert main(["build", "--prototxt", str(full_near_tie_model[0]), "--caffemodel", str(full_near_tie_model[1]),
                 "--output", str(out), "--precision", "fp32", "int8"]) == 0
    manifest = read_manifest(out)
    int8 = [c for c in manifest["validation"]["checks"] if c["variant"] == "int8"]
    assert {(c["runtime"], c["mode"]) for c in int8} == {("onnxruntime", "exact"), ("openvino", "exact"),
                                                        ("openvino", "default")}
    for check in int8:
        assert check["near_ties"] >= 10, "the model really has many near-ties"
        assert check["confident_flips"] == [] and not check["nan"], check
        assert check["max_abs_diff"] <= 0.035, check
    assert all("fc8_twitter" in kept for kept in manifest["int8"]["float_layers"].values())


@pytest.mark.parametrize("errors, target, limit, chosen", [
    # the output layer alone in float meets the target: nothing probed
    ({(): 0.01}, 0.02, 0.03, ()),
    # a and c in int8 alone hurt most; floating a then c meets the target: stop there
    ({(): 0.05, ("b", "c"): 0.04, ("a", "c"): 0.01, ("a", "b"): 0.03, ("a",): 0.025},
     0.02, 0.03, ("a", "c")),
    # nothing meets the target; the fewest within the gate's own bound win over the smallest error
    ({(): 0.05, ("b", "c"): 0.04, ("a", "c"): 0.025, ("a", "b"): 0.03, ("a",): 0.028}, 0.02, 0.03, ("a",)),
    # nothing within either: the smallest error
    ({(): 0.05, ("b", "c"): 0.045, ("a", "c"): 0.04, ("a", "b"): 0.035, ("a",): 0.06}, 0.02, 0.03, ("a", "b")),
])
def test_greedy_float_layers_takes_the_fewest_that_meet_the_target(errors, target, limit, chosen):
    from engine_build.sensitivity import greedy_float_layers
    asked = []

    def error(float_layers):
        key = tuple(sorted(float_layers))
        asked.append(key)
        return errors[key]
    best, found, sensitivity, tried = greedy_float_layers([], ["a", "b", "c"], error, target, limit)
    assert tuple(sorted(best)) == chosen and found == errors[tuple(sorted(best))]
    if len(errors) > 1:
        assert sensitivity == {"a": errors[("b", "c")], "b": errors[("a", "c")], "c": errors[("a", "b")]}
        assert list(tried)[1][0] == "a", "the layer that hurts most alone goes to float first"
    else:
        assert asked == [()] and sensitivity == {}


def _qdq_model(weights: dict[str, np.ndarray], scales: dict[str, np.ndarray], layers: list[tuple[str, str, str]]):
    """Gemm layers reading DequantizeLinear(weight, scale): (layer, weight name, scale name)."""
    from onnx import TensorProto, helper, numpy_helper
    nodes, inits = [], [numpy_helper.from_array(v, k) for k, v in {**weights, **scales}.items()]
    inits.append(numpy_helper.from_array(np.zeros(1, np.int8), "zero"))
    for layer, weight, scale in layers:
        nodes.append(helper.make_node("DequantizeLinear", [weight, scale, "zero"], [f"{layer}_w"], name=f"dq_{layer}",
                                      axis=0))
        nodes.append(helper.make_node("Gemm", ["x", f"{layer}_w"], [layer], name=layer, transB=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info(layer, TensorProto.FLOAT, None) for layer, _, _ in layers],
                              inits)
    return helper.make_model(graph)


def _dequantized(model, layer: str) -> np.ndarray:
    from onnx import numpy_helper
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.name == f"dq_{layer}")
    return inits[dq.input[0]].astype(np.float32) * inits[dq.input[1]].reshape(-1, 1)


def test_seven_bit_weights_keep_each_layer_and_touch_nothing_shared():
    from engine_build.quantize import seven_bit_weights
    w = np.array([[-128, 60], [100, -3]], np.int8)
    model = _qdq_model({"w": w, "small": np.array([[-64, 64], [1, 2]], np.int8)},
                       {"s1": np.array([0.1, 0.2], np.float32), "s2": np.array([0.5, 1.0], np.float32)},
                       [("a", "w", "s1"), ("b", "w", "s2"), ("c", "small", "s1")])
    before = {layer: _dequantized(model, layer) for layer in "abc"}
    assert sorted(seven_bit_weights(model)) == ["a", "b"], "-128 counts; an in-range weight is left alone"
    for layer in "abc":
        scale = np.array([0.1, 0.2] if layer != "b" else [0.5, 1.0], np.float32).reshape(-1, 1) * 2
        assert np.all(np.abs(_dequantized(model, layer) - before[layer]) <= scale / 2 + 1e-6), layer
    assert np.array_equal(_dequantized(model, "c"), before["c"]), "c shares a's scale and must not change"
    from onnx import numpy_helper
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype == np.int8 and init.name != "zero":
            assert values.min() >= -64 and values.max() <= 64, init.name


def test_fp32_on_openvino_default_mode_is_rechecked_on_another_cpu(near_tie_artifact):
    """The build machine may have computed it in FP32 (no bf16 there); this CPU may compute it in bf16."""
    from engine_build.manifest import Manifest
    from engine_build.recheck import needs_recheck
    document = read_manifest(near_tie_artifact)
    for check in document["validation"]["checks"]:
        check["cpu"] = {"model": "AMD EPYC 7B13", "machine": check["cpu"]["machine"], "extensions": ["avx2"]}
        check["compute"] = "fp32" if check["variant"] == "fp32" else check["compute"]
    manifest = Manifest.from_dict(document)
    assert needs_recheck(manifest, "fp32", "openvino", exact=False).startswith("validated on AMD EPYC 7B13")
    assert needs_recheck(manifest, "fp32", "openvino", exact=True) is None
    assert needs_recheck(manifest, "fp32", "onnxruntime", exact=True) is None
    first = next(c for c in document["validation"]["checks"] if c["variant"] == "int8")
    del first["cpu"]
    why = needs_recheck(Manifest.from_dict(document), first["variant"], first["runtime"], first["mode"] == "exact")
    assert why == "its CPU was not recorded (rebuild the artifact to record it)"


def test_oversample_int8_keeps_the_crops_logits_and_probabilities_in_float(tmp_path):
    """With ten crops NNCF quantised each crop's logits and probabilities before their average
    (max |dp| 0.08 on OpenVINO, every build failed): nothing after the logits layer is quantised."""
    import onnx

    from engine_build.placeholder import write_placeholder
    prototxt, caffemodel = write_placeholder(tmp_path / "model", width=0.25, seed=5)
    out = tmp_path / "ten-crops"
    assert main(["build", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel), "--output", str(out),
                 "--precision", "fp32", "int8", "--oversample",
                 # what the sensitivity pass chooses for this model (it meets its target with the logits
                 # layer alone in float): the same two INT8 files, byte for byte, without the pass's probes
                 "--int8-float-layers", "fc8_twitter"]) == 0
    for name in ("model.int8.onnx", "model.int8.onnxruntime.onnx"):
        graph = onnx.load(str(out / name)).graph
        producer = {o: n for n in graph.node for o in n.output}
        quantized = {producer[n.input[0]].name for n in graph.node
                     if n.op_type == "QuantizeLinear" and n.input[0] in producer}
        assert not quantized & {"fc8_twitter", "crop_probs", "crop_probs_grouped", "crop_logits_grouped"}, name
