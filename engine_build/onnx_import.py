"""Import an ONNX classifier in place of the Caffe files.

The classifier must take what Caffe's ``data`` blob took — float32 [N, 3, 227, 227],
BGR with the ILSVRC mean already subtracted — and give two scores per image
(logits, or probabilities when its graph ends in a Softmax; 0 negative, 1 positive).
It is converted to this project's opset by ONNX's version converter, made FP16 by
ONNX Runtime's float16 converter (inputs and outputs kept FP32; LRN and the nodes the FP16
range audit flags kept in float32 islands, as in a Caffe import), and wrapped in the same
preprocessing and outputs as a Caffe import, so the artifact contract is the same.
"""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .caffe_net import all_finite
from .errors import ModelFormatError
from .onnx_graph import FLOAT32_ONLY_OPS, OPSET, GraphBuilder, add_preprocessing, finish_model
from .preprocess import CROP_SIZE

PREFIX = "classifier/"   # the classifier's tensor and node names inside the wrapped model
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def load_classifier(path: Path) -> onnx.ModelProto:
    """Read, check and convert to our opset; one clear line for each way it can be unfit (a weight that is
    NaN or infinite, as in a Caffe import, included)."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except (OSError, onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise ModelFormatError(f"--onnx {path}: not a valid ONNX model ({str(exc).splitlines()[0]})") from exc
    except Exception as exc:  # protobuf DecodeError for non-ONNX bytes
        raise ModelFormatError(f"--onnx {path}: not an ONNX model ({type(exc).__name__})") from exc
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelFormatError(f"--onnx {path}: needs exactly one input and one output, has "
                               f"{len(inputs)} and {len(graph.output)}")
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value or d.dim_param for d in tensor.shape.dim]
    if tensor.elem_type != TensorProto.FLOAT or len(dims) != 4 or dims[1:] != [3, CROP_SIZE, CROP_SIZE]:
        raise ModelFormatError(f"--onnx {path}: input '{inputs[0].name}' must be float32 [N,3,{CROP_SIZE},{CROP_SIZE}] "
                               f"(Caffe's data blob), got {TensorProto.DataType.Name(tensor.elem_type)} {dims}")
    out_dims = [d.dim_value or d.dim_param for d in graph.output[0].type.tensor_type.shape.dim]
    if len(out_dims) != 2 or out_dims[1] != 2:
        raise ModelFormatError(f"--onnx {path}: output '{graph.output[0].name}' must be [N,2] "
                               f"(negative, positive), got {out_dims}")
    for what, value in ((f"input '{inputs[0].name}'", dims[0]), (f"output '{graph.output[0].name}'", out_dims[0])):
        if isinstance(value, int) and value:   # the build, the evaluation and the service run batches
            raise ModelFormatError(f"--onnx {path}: {what} has a fixed batch dimension {value}; it must be dynamic: "
                                   f"export with dynamic axes (torch.onnx.export(..., dynamic_axes="
                                   f"{{'{inputs[0].name}': {{0: 'N'}}, '{graph.output[0].name}': {{0: 'N'}}}}))")
    for init in graph.initializer:
        if init.data_type in _FLOATS and not all_finite(numpy_helper.to_array(init)):
            raise ModelFormatError(f"--onnx {path}: initializer '{init.name}' holds NaN or infinite values")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=OPSET)
    if opset != OPSET:
        try:
            model = onnx.version_converter.convert_version(model, OPSET)
        except Exception as exc:
            raise ModelFormatError(f"--onnx {path}: cannot convert opset {opset} to {OPSET}: {exc}") from exc
    return model


def _logits_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose output is the logits: a final Softmax is dropped (ours follows, in FP32)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producer = [i for i, n in enumerate(graph.node) if graph.output[0].name in n.output]
    if producer and graph.node[producer[0]].op_type == "Softmax":
        softmax = graph.node[producer[0]]
        del graph.node[producer[0]]
        del graph.output[:]
        graph.output.append(helper.make_tensor_value_info(softmax.input[0], TensorProto.FLOAT, ["N", 2]))
    return out


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes ordered so each comes after the producers of its inputs (the float16 converter
    appends its boundary casts at the end of the list)."""
    ordered, pending, ready = [], list(range(len(nodes))), set(available)
    while pending:
        runnable = [i for i in pending if all(not t or t in ready for t in nodes[i].input)]
        if not runnable:
            raise ModelFormatError(f"the classifier graph has a cycle or a dangling input near node "
                                   f"'{nodes[pending[0]].name}'")
        for i in runnable:
            ordered.append(nodes[i])
            ready.update(nodes[i].output)
        pending = sorted(set(pending) - set(runnable))
    return ordered


def float32_nodes(model: onnx.ModelProto, float32_tensors: Collection[str] = ()) -> list[str]:
    """Classifier nodes the FP16 variant keeps in float32: TensorRT's float32-only ops, and every
    node reading or writing a tensor in ``float32_tensors`` (names as in the wrapped model)."""
    flagged = {t[len(PREFIX):] for t in float32_tensors if t.startswith(PREFIX)}
    return [node.name for node in model.graph.node if node.op_type in FLOAT32_ONLY_OPS
            or flagged.intersection(node.output) or flagged.intersection(node.input)]


def wrap_classifier(model: onnx.ModelProto, oversample: bool = False, dtype: str = "float32",
                    metadata: dict[str, str] | None = None, float32_tensors: Collection[str] = ()) -> onnx.ModelProto:
    """Preprocessing + the classifier's logits + our FP32 softmax, honouring the artifact contract."""
    body = _logits_only(model)
    if dtype == "float16":
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
        for i, node in enumerate(body.graph.node):   # the converter blocks nodes by name
            node.name = node.name or f"node_{i}"
        # FP16 inside, FP32 at its edges and in the islands of float32_nodes()
        body = convert_float_to_float16(body, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                        node_block_list=float32_nodes(body, float32_tensors))
    g = GraphBuilder(np.float32)
    x, n_crops = add_preprocessing(g, oversample)
    graph = body.graph
    initializers = {t.name for t in graph.initializer}
    (source,) = [i.name for i in graph.input if i.name not in initializers]

    def name(tensor: str) -> str:
        return x if tensor == source else (PREFIX + tensor if tensor else tensor)

    inits, nodes = [], []
    for init in graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = name(init.name)
        inits.append(copy)
    for node in _topological(list(graph.node), initializers | {source}):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.input[:]
        del copy.output[:]
        copy.input.extend(name(t) for t in node.input)
        copy.output.extend(name(t) for t in node.output)
        copy.name = PREFIX + (node.name or node.output[0])
        nodes.append(copy)
    g.adopt(nodes, inits)
    return finish_model(g, name(graph.output[0].name), n_crops, 2, graph.name or "onnx_classifier", metadata)
