"""The FP16 file: LRN and near-limit tensors in float32 islands, and the range audit behind it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engine_build.caffe_io import iter_caffemodel, load_prototxt
from engine_build.caffe_net import attach_weights, build_net
from engine_build.cli import main
from engine_build.manifest import read_manifest
from engine_build.onnx_graph import build_onnx
from engine_build.range_audit import FP16_MAX, _exposed, audit, float16_tensors, kept_float32


def _net(model):
    net = build_net(load_prototxt(model[0]))
    attach_weights(net, iter_caffemodel(model[1]))
    return net


def _input_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of each node's first input, by node name."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return {n.name: types.get(n.input[0]) for n in model.graph.node}


def test_fp16_graph_runs_lrn_in_float32_islands(small_model):
    model = build_onnx(_net(small_model), dtype="float16")
    inputs = _input_types(model)
    lrns = [n for n in model.graph.node if n.op_type == "LRN"]
    assert [n.name for n in lrns] == ["norm1", "norm2"]
    assert all(inputs[n.name] == TensorProto.FLOAT for n in lrns)
    assert inputs["conv2"] == inputs["conv1"] == TensorProto.FLOAT16, "the island closes after the LRN"
    half = float16_tensors(model)
    assert {"conv1", "pool1", "conv2", "fc7"} <= half and not {"norm1", "norm2"} & half


def test_flagged_tensor_keeps_its_writer_and_reader_in_float32(small_model):
    model = build_onnx(_net(small_model), dtype="float16", float32_tensors=["conv3"])
    inputs, half = _input_types(model), float16_tensors(model)
    assert "conv3" not in half and "relu3" not in half
    assert inputs["conv3"] == TensorProto.FLOAT and inputs["conv4"] == TensorProto.FLOAT16
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert weights["conv3_w"] == TensorProto.FLOAT and weights["conv4_w"] == TensorProto.FLOAT16


def _scaled_model(scale: float) -> onnx.ModelProto:
    """images -> float -> x * scale -> LRN -> (ReduceMax) : a graph whose range the test controls."""
    nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Mul", ["nchw", "scale"], ["big"], name="big"),
             helper.make_node("LRN", ["big"], ["norm"], name="norm", size=3, alpha=1e-4, beta=0.75),
             helper.make_node("ReduceMax", ["norm"], ["out"], name="out", keepdims=0)]
    graph = helper.make_graph(nodes, "scaled",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 4, 4, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("scale, flagged", [(100.0, False), (200.0, True)])
def test_audit_measures_max_abs_and_lrn_window(tmp_path, scale, flagged):
    path = tmp_path / "m.onnx"
    onnx.save(_scaled_model(scale), path)
    images = np.full((2, 4, 4, 3), 255, np.uint8)
    images[1, 0, 0] = (1, 2, 3)
    ranges = {r.tensor: r for r in audit(path, images, batch=1)}
    assert ranges["big"].max_abs == pytest.approx(255 * scale)
    assert ranges["big"].near_limit is flagged     # 25500 is under 65504/2, 51000 is over
    assert ranges["norm"].window_sum_sq == pytest.approx(3 * (255 * scale) ** 2)   # 3 channels in one window
    why = kept_float32(_scaled_model(scale), list(ranges.values()))
    assert why["norm"].startswith("TensorRT runs LRN in float32 only")
    assert ("big" in why) is flagged


def test_kept_float32_reports_a_flagged_tensor_left_in_float16(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_scaled_model(200.0), path)
    ranges = audit(path, np.full((1, 4, 4, 3), 255, np.uint8))
    half = _scaled_model(200.0)
    half.graph.node[0].attribute[0].i = TensorProto.FLOAT16   # everything downstream float16
    half.graph.initializer[0].data_type = TensorProto.FLOAT16
    assert kept_float32(half, ranges)["big"].startswith("NOT kept float32")


def test_manifest_and_inspect_show_the_range_audit(small_artifact, capsys):
    manifest = read_manifest(small_artifact)
    audit_record = manifest["fp16_range"]
    assert audit_record["limit"] == FP16_MAX and audit_record["images"] == manifest["calibration"]["images"] > 0
    tensors = {t["tensor"]: t for t in audit_record["tensors"]}
    assert tensors["norm1"]["fp16_file"] == "float32" and tensors["norm1"]["window_sum_sq"] > 0
    assert tensors["conv1"]["fp16_file"] == "float16" and tensors["conv1"]["max_abs"] > 0
    assert main(["inspect", str(small_artifact)]) == 0
    out = capsys.readouterr().out
    assert "fp16 range" in out and "TensorRT runs LRN in float32 only" in out


def _fp16_peaks(path, images) -> dict[str, float]:
    """Largest |x| of every float16 tensor of the FP16 file itself, run on ``images``."""
    import onnxruntime as ort
    model = onnx.load(str(path))
    half = float16_tensors(model)
    exposed, _ = _exposed(model)
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs() if o.name in half]
    peaks = dict.fromkeys(names, 0.0)
    for start in range(0, len(images), 8):
        for name, value in zip(names, session.run(names, {"images": images[start:start + 8]}), strict=True):
            peaks[name] = max(peaks[name], float(np.abs(value.astype(np.float32)).max()))
    return peaks


@pytest.mark.slow
def test_full_size_fp16_file_stays_within_half_of_fp16_range(full_model, tmp_path):
    """The published architecture at full size: the LRN windows overflow FP16 (why LRN is float32),
    and no tensor the FP16 file computes in float16 comes within 2x of 65504 on real photos."""
    from engine_build.imaging import builtin_photos, photo_views
    out = tmp_path / "full"
    assert main(["build", "--prototxt", str(full_model[0]), "--caffemodel", str(full_model[1]),
                 "--output", str(out), "--precision", "fp32", "fp16"]) == 0
    tensors = {t["tensor"]: t for t in read_manifest(out)["fp16_range"]["tensors"]}
    assert tensors["norm1"]["window_sum_sq"] > FP16_MAX, "the overflow the islands exist for"
    assert tensors["norm1"]["fp16_file"] == tensors["norm2"]["fp16_file"] == "float32"
    peaks = _fp16_peaks(out / "model.fp16.onnx", photo_views(builtin_photos()))
    assert {"conv1", "conv5", "fc7"} <= set(peaks)
    assert max(peaks.values()) < FP16_MAX / 2, max(peaks.items(), key=lambda kv: kv[1])
