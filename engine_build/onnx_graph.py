"""Emit the ONNX graph: authors' preprocessing + the Caffe net, in FP32 or FP16.

Contract (relied on by the service and by users):
  input  ``images``  uint8 [N, 256, 256, 3], BGR, N dynamic
  output ``probs``   float32 [N, 2]  softmax (averaged over crops with oversampling)
  output ``logits``  float32 [N, 2]  pre-softmax scores (mean over crops with oversampling)

The FP16 graph keeps the preprocessing and the final softmax in FP32 and computes the
network itself in FP16, so a strongly typed TensorRT build gets FP16 kernels, except in
float32 islands (a Cast in, the layer in float32, a Cast out): every layer TensorRT runs
in float32 only (LRN), and every layer whose input or output the FP16 range audit
(:mod:`.range_audit`) found too close to FP16's limit.

The public builder (:class:`GraphBuilder`, :func:`add_preprocessing`, :func:`finish_model`)
is shared with :mod:`.onnx_import`, which wraps an ONNX classifier the same way.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .caffe_net import Layer, Net, pool_out
from .preprocess import CROP_SIZE, IMAGE_SIZE, MEAN_BGR, crop_origins

OPSET = 17
INPUT, PROBS, LOGITS = "images", "probs", "logits"
# Caffe layer types TensorRT runs in float32 only: its LRN takes float32 inputs.
FLOAT32_ONLY_LAYERS = frozenset({"LRN"})
FLOAT32_ONLY_OPS = frozenset({"LRN"})
_ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


class GraphBuilder:
    """Nodes and initialisers of one model under construction.

    ``dtype`` is the graph's compute type (float32, or float16 for the FP16 variant).
    A tensor is named after its hint, with ``_2``, ``_3``... only when the hint repeats,
    so a Caffe layer's output tensor carries the layer's own name.
    """

    def __init__(self, dtype: np.dtype | type) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.dtype = np.dtype(dtype)
        self._used: set[str] = set()

    def name(self, hint: str) -> str:
        """A tensor name not used yet in this graph, ``hint`` itself when free."""
        name, n = hint, 1
        while name in self._used:
            n += 1
            name = f"{hint}_{n}"
        self._used.add(name)
        return name

    def const(self, hint: str, value: object, dtype: np.dtype | type | None = None) -> str:
        """An initialiser (in the graph's dtype unless told) and its name."""
        array = np.asarray(value, dtype=dtype if dtype is not None else self.dtype)
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        """Append one node with one output; returns the output's name."""
        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def cast(self, x: str, dtype: np.dtype | type, hint: str) -> str:
        return self.op("Cast", [x], hint, to=_ONNX_TYPE[np.dtype(dtype)])

    def adopt(self, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> None:
        """Append nodes and initialisers built elsewhere (their names must already be unique)."""
        for node in nodes:
            self._used.update(node.output)
        self._used.update(t.name for t in inits)
        self.nodes.extend(nodes)
        self.inits.extend(inits)


def add_preprocessing(g: GraphBuilder, oversample: bool) -> tuple[str, int]:
    """Cast, crop(s) and mean subtraction of ``images``; returns (NCHW tensor in g's dtype, crops)."""
    # Cast first: TensorRT accepts a uint8 network input only as the input of a Cast. The mean is
    # subtracted after cropping, next to the first convolution, where OpenVINO's INT8 path fuses
    # it (subtracting it over the whole 256x256 image cost 15% of INT8 throughput).
    x = g.cast(INPUT, np.float32, "as_float")
    crops = []
    for row, col, mirrored in crop_origins(oversample):
        if mirrored:
            starts = [row, col + CROP_SIZE - 1]
            ends = [row + CROP_SIZE, col - 1 if col > 0 else -(IMAGE_SIZE + 1)]
            steps = [1, -1]
        else:
            starts, ends, steps = [row, col], [row + CROP_SIZE, col + CROP_SIZE], [1, 1]
        crops.append(g.op("Slice", [x, g.const("starts", starts, np.int64), g.const("ends", ends, np.int64),
                                    g.const("axes", [1, 2], np.int64), g.const("steps", steps, np.int64)], "crop"))
    x = crops[0] if len(crops) == 1 else g.op("Concat", crops, "crops", axis=0)
    x = g.op("Sub", [x, g.const("mean_bgr", MEAN_BGR, np.float32)], "centred")
    if g.dtype == np.float16:
        x = g.cast(x, np.float16, "as_half")
    return g.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2]), len(crops)


def _pool(g: GraphBuilder, layer: Layer, x: str) -> str:
    p = layer.params
    if p["global_pooling"]:
        return g.op("GlobalMaxPool" if p["pool"] == "MAX" else "GlobalAveragePool", [x], layer.name)
    extra = []
    for size, k, pad, s in zip(layer.in_shape[1:], p["kernel"], p["pad"], p["stride"], strict=True):
        out = pool_out(size, k, pad, s)
        # End padding so that floor rounding yields Caffe's ceil-rounded size.
        extra.append(max(0, (out - 1) * s + k - (size + 2 * pad)))
    common = dict(kernel_shape=list(p["kernel"]), strides=list(p["stride"]))
    if p["pool"] == "MAX":
        pads = [p["pad"][0], p["pad"][1], p["pad"][0] + extra[0], p["pad"][1] + extra[1]]
        return g.op("MaxPool", [x], layer.name, pads=pads, **common)
    # Caffe's average divides by the window clipped to the padded input (pads count,
    # the ceil overhang does not): pad explicitly, then exclude only the overhang.
    if any(p["pad"]):
        pads = [0, 0, p["pad"][0], p["pad"][1], 0, 0, p["pad"][0], p["pad"][1]]
        x = g.op("Pad", [x, g.const("pads", pads, np.int64)], layer.name + "_pad")
    return g.op("AveragePool", [x], layer.name, pads=[0, 0, extra[0], extra[1]], count_include_pad=0, **common)


def _layer(g: GraphBuilder, layer: Layer, x: str, dtype: np.dtype) -> str:
    """One Caffe layer computed in ``dtype`` (its weights stored in it)."""
    p = layer.params
    if layer.type == "Convolution":
        inputs = [x, g.const(layer.name + "_w", layer.weights[0], dtype)]
        if p["bias_term"]:
            inputs.append(g.const(layer.name + "_b", layer.weights[1], dtype))
        return g.op("Conv", inputs, layer.name, kernel_shape=list(p["kernel"]), strides=list(p["stride"]),
                    pads=[p["pad"][0], p["pad"][1], p["pad"][0], p["pad"][1]], dilations=list(p["dilation"]),
                    group=p["group"])
    if layer.type == "InnerProduct":
        if len(layer.in_shape) != 1:
            x = g.op("Flatten", [x], layer.name + "_flat", axis=1)
        inputs = [x, g.const(layer.name + "_w", layer.weights[0], dtype)]
        if p["bias_term"]:
            inputs.append(g.const(layer.name + "_b", layer.weights[1], dtype))
        return g.op("Gemm", inputs, layer.name, transB=0 if p["transpose"] else 1)
    if layer.type == "ReLU":
        if p["negative_slope"]:
            return g.op("LeakyRelu", [x], layer.name, alpha=p["negative_slope"])
        return g.op("Relu", [x], layer.name)
    if layer.type == "Pooling":
        return _pool(g, layer, x)
    if layer.type == "LRN":
        return g.op("LRN", [x], layer.name, size=p["local_size"], alpha=p["alpha"], beta=p["beta"], bias=p["k"])
    if layer.type == "Dropout":
        return x   # identity at inference
    if layer.type == "Softmax":
        return g.op("Softmax", [x], layer.name, axis=1)
    raise AssertionError(layer.type)


def _model(graph: onnx.GraphProto, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Wrap a graph at this project's opset and IR version, with metadata, checked."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="engine_build")
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(model)
    return model


def finish_model(g: GraphBuilder, x: str, n_crops: int, classes: int, name: str,
                 metadata: dict[str, str] | None, x_dtype: np.dtype | type | None = None) -> onnx.ModelProto:
    """Logits ``x`` (in ``x_dtype``, default g's) -> the contract's FP32 ``logits`` and ``probs``,
    averaged over crops; returns the checked model."""
    if np.dtype(x_dtype if x_dtype is not None else g.dtype) != np.float32:
        x = g.cast(x, np.float32, "logits_f32")
    if n_crops == 1:
        g.nodes.append(helper.make_node("Identity", [x], [LOGITS], name=LOGITS))
        g.nodes.append(helper.make_node("Softmax", [x], [PROBS], name=PROBS, axis=1))
    else:
        shape = g.const("crop_major", [n_crops, -1, classes], np.int64)
        probs = g.op("Softmax", [x], "crop_probs", axis=1)
        grouped_p = g.op("Reshape", [probs, shape], "crop_probs_grouped")
        grouped_l = g.op("Reshape", [x, shape], "crop_logits_grouped")
        g.nodes.append(helper.make_node("ReduceMean", [grouped_p], [PROBS], name=PROBS, axes=[0], keepdims=0))
        g.nodes.append(helper.make_node("ReduceMean", [grouped_l], [LOGITS], name=LOGITS, axes=[0], keepdims=0))
    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", IMAGE_SIZE, IMAGE_SIZE, 3])],
        [helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", classes])],
        initializer=g.inits)
    return _model(graph, metadata)


def _body_layers(net: Net) -> list[Layer]:
    """The net without its final Softmax: we emit our own FP32 softmax after the logits."""
    return net.layers[:-1] if net.layers[-1].type == "Softmax" else net.layers


def float32_layer_names(net: Net, float32_tensors: Collection[str] = ()) -> list[str]:
    """Layers the FP16 graph computes in float32: TensorRT's float32-only types, and every
    layer reading or writing a tensor in ``float32_tensors`` (named after its layer)."""
    keep, previous = [], None
    for layer in _body_layers(net):
        if layer.type == "Dropout":
            continue   # no node: identity at inference
        if (layer.type in FLOAT32_ONLY_LAYERS or layer.name in float32_tensors
                or previous in float32_tensors):
            keep.append(layer.name)
        previous = layer.name
    return keep


def build_onnx(net: Net, oversample: bool = False, dtype: str = "float32",
               metadata: dict[str, str] | None = None, float32_tensors: Collection[str] = ()) -> onnx.ModelProto:
    """The whole classifier as one ONNX model honouring the I/O contract above.

    In float16, the layers of :func:`float32_layer_names` run in float32 islands.
    """
    g = GraphBuilder(np.float16 if dtype == "float16" else np.float32)
    x, n_crops = add_preprocessing(g, oversample)
    islands = set(float32_layer_names(net, float32_tensors)) if g.dtype == np.float16 else set()
    current = g.dtype
    for layer in _body_layers(net):
        if layer.type != "Dropout":
            wanted = np.dtype(np.float32) if layer.name in islands else g.dtype
            if wanted != current:
                x = g.cast(x, wanted, f"{layer.name}_in_{'f32' if wanted == np.float32 else 'f16'}")
                current = wanted
        x = _layer(g, layer, x, current)
    return finish_model(g, x, n_crops, net.output_shape[0], net.name, metadata, x_dtype=current)


def build_classifier_onnx(net: Net) -> onnx.ModelProto:
    """The Caffe net alone, as Caffe runs it: ``data`` float [N,3,227,227] (mean-subtracted BGR) -> ``prob``."""
    g = GraphBuilder(np.float32)
    x = "data"
    for layer in _body_layers(net):
        x = _layer(g, layer, x, g.dtype)
    g.nodes.append(helper.make_node("Softmax", [x], ["prob"], name="prob", axis=1))
    graph = helper.make_graph(
        g.nodes, net.name, [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", *net.input_shape])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", net.output_shape[0]])], initializer=g.inits)
    return _model(graph)
