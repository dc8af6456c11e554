"""A deploy net as plain data: layers in order, Caffe's shape rules, weights attached.

Pure logic over the parsed prototxt and the arrays read from a caffemodel; no files.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import Message

from .caffe_io import CaffeLayerWeights, layer_type
from .errors import ModelFormatError, UnsupportedLayerError

SUPPORTED = ("Convolution", "InnerProduct", "ReLU", "Pooling", "LRN", "Dropout", "Softmax")
_LEARNED = ("Convolution", "InnerProduct")


@dataclass
class Layer:
    name: str
    type: str
    bottom: str
    top: str
    params: dict
    in_shape: tuple[int, ...] = ()     # C, H, W (or features) of the bottom, batch excluded
    out_shape: tuple[int, ...] = ()
    weights: list[np.ndarray] = field(default_factory=list)


@dataclass
class Net:
    name: str
    input_name: str
    input_shape: tuple[int, int, int]  # C, H, W
    layers: list[Layer]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.layers[-1].out_shape

    def learned(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.type in _LEARNED]


def _pair(repeated: Iterable[int], single_h: int, single_w: int, has_h: bool, default: int) -> tuple[int, int]:
    if has_h:
        return int(single_h), int(single_w)
    values = list(repeated)
    if not values:
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise ValueError(f"expected 1 or 2 values, got {len(values)} (only 2-D nets are supported)")


def _shown(values: tuple[int, ...]) -> str:
    return "/".join(map(str, values)) if len(set(values)) > 1 else str(values[0])


def _named(field: str, has_hw: bool, single: str = "") -> str:
    """``stride``, or ``stride_h/stride_w`` where the prototxt gave the pair."""
    return f"{field}_h/{field}_w" if has_hw else single or field


def _at_least_1(fields: dict[str, tuple[int, ...]]) -> None:
    """Caffe's CHECK_GT(x, 0) for kernel, stride, dilation, group and num_output: one line for the first that fails
    (a 0 divided the shape rules, a traceback)."""
    for name, values in fields.items():
        if min(values) < 1:
            raise ValueError(f"{name} {_shown(values)}: must be at least 1")


def _conv_params(p: Any) -> dict:
    if p.axis != 1:
        raise ValueError("convolution axis other than 1 is not supported")
    kernel_hw, stride_hw = p.HasField("kernel_h"), p.HasField("stride_h")
    if not kernel_hw and not len(p.kernel_size):
        raise ValueError("kernel_size is missing")
    kernel = _pair(p.kernel_size, p.kernel_h, p.kernel_w, kernel_hw, 0)
    stride = _pair(p.stride, p.stride_h, p.stride_w, stride_hw, 1)
    dilation = _pair(p.dilation, 0, 0, False, 1)
    _at_least_1({_named("kernel", kernel_hw, "kernel_size"): kernel, _named("stride", stride_hw): stride,
                 "dilation": dilation, "group": (int(p.group),), "num_output": (int(p.num_output),)})
    return dict(num_output=int(p.num_output), bias_term=bool(p.bias_term), kernel=kernel,
                pad=_pair(p.pad, p.pad_h, p.pad_w, p.HasField("pad_h") or p.HasField("pad_w"), 0),
                stride=stride, dilation=dilation, group=int(p.group))


def _pool_params(p: Any) -> dict:
    pool = {0: "MAX", 1: "AVE"}.get(p.pool)
    if pool is None:
        raise ValueError("STOCHASTIC pooling is not supported (it is random at train time only)")
    pad_hw = p.HasField("pad_h") or p.HasField("pad_w")
    kernel_hw, stride_hw = p.HasField("kernel_h"), p.HasField("stride_h")
    pad = (int(p.pad_h), int(p.pad_w)) if pad_hw else (int(p.pad),) * 2
    kernel = (int(p.kernel_h), int(p.kernel_w)) if kernel_hw else (int(p.kernel_size),) * 2
    stride = (int(p.stride_h), int(p.stride_w)) if stride_hw else (int(p.stride),) * 2
    if not p.global_pooling:
        if not kernel_hw and not p.HasField("kernel_size"):
            raise ValueError("kernel_size is missing")
        kernel_name = _named("kernel", kernel_hw, "kernel_size")
        _at_least_1({kernel_name: kernel, _named("stride", stride_hw): stride})
        if any(pd >= k for pd, k in zip(pad, kernel, strict=True)):   # Caffe's CHECK_LT(pad, kernel)
            raise ValueError(f"{_named('pad', pad_hw)} {_shown(pad)}: must be smaller than "
                             f"{kernel_name} {_shown(kernel)}")
    return dict(pool=pool, pad=pad, kernel=kernel, stride=stride, global_pooling=bool(p.global_pooling))


def _params(kind: str, layer: Any) -> dict:
    if kind == "Convolution":
        return _conv_params(layer.convolution_param)
    if kind == "InnerProduct":
        p = layer.inner_product_param
        if p.axis != 1:
            raise ValueError("inner product axis other than 1 is not supported")
        _at_least_1({"num_output": (int(p.num_output),)})
        return dict(num_output=int(p.num_output), bias_term=bool(p.bias_term), transpose=bool(p.transpose))
    if kind == "Pooling":
        return _pool_params(layer.pooling_param)
    if kind == "LRN":
        p = layer.lrn_param
        if p.norm_region != 0:
            raise ValueError("LRN WITHIN_CHANNEL is not supported (only ACROSS_CHANNELS)")
        if p.local_size % 2 == 0:
            raise ValueError("LRN local_size must be odd")
        for name in ("alpha", "beta"):
            if not getattr(p, name) > 0:       # ONNX Runtime refuses the model otherwise
                raise ValueError(f"{name} {getattr(p, name):g}: must be above 0")
        return dict(local_size=int(p.local_size), alpha=float(p.alpha), beta=float(p.beta), k=float(p.k))
    if kind == "ReLU":
        return dict(negative_slope=float(layer.relu_param.negative_slope))
    if kind == "Softmax":
        if layer.softmax_param.axis not in (1, -1):
            raise ValueError("softmax axis other than 1 is not supported")
        return {}
    return {}


def _included(layer: Any) -> bool:
    """Caffe's NetStateRule check for the TEST phase, level 0, no stages."""
    def matches(rule: Message) -> bool:
        if rule.HasField("phase") and rule.phase != 1:
            return False
        if rule.HasField("min_level") and rule.min_level > 0:
            return False
        if rule.HasField("max_level") and rule.max_level < 0:
            return False
        return not len(rule.stage)
    if len(layer.include):
        return any(matches(r) for r in layer.include)
    return not any(matches(r) for r in layer.exclude)


def _input_spec(proto: Any) -> tuple[str, tuple[int, ...], list]:
    layers = list(proto.layer) or list(proto.layers)
    if len(proto.input):
        name = proto.input[0]
        if len(proto.input_shape):
            dims = tuple(proto.input_shape[0].dim)
        elif len(proto.input_dim) >= 4:
            dims = tuple(proto.input_dim[:4])
        else:
            raise ModelFormatError(f"input '{name}' has no input_shape or input_dim")
        return name, dims, layers
    for i, layer in enumerate(layers):
        if layer_type(layer) == "Input":
            if not len(layer.input_param.shape):
                raise ModelFormatError(f"Input layer '{layer.name}' has no shape")
            return layer.top[0], tuple(layer.input_param.shape[0].dim), layers[:i] + layers[i + 1:]
    raise ModelFormatError("the prototxt declares no input "
                           "(need 'input:' + 'input_dim'/'input_shape' or an Input layer)")


def conv_out(size: int, kernel: int, pad: int, stride: int, dilation: int = 1) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def pool_out(size: int, kernel: int, pad: int, stride: int) -> int:
    """Caffe's pooling output size: ceil rounding, last window must start inside input+pad."""
    out = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _infer(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    p = layer.params
    if layer.type == "Convolution":
        c, h, w = shape
        if c % p["group"] or p["num_output"] % p["group"]:
            raise ValueError(f"group {p['group']} does not divide {c} inputs and {p['num_output']} outputs")
        out = (p["num_output"],) + tuple(
            conv_out(s, k, pd, st, d)
            for s, k, pd, st, d in zip((h, w), p["kernel"], p["pad"], p["stride"], p["dilation"], strict=True))
    elif layer.type == "Pooling":
        c, h, w = shape
        if p["global_pooling"]:
            out = (c, 1, 1)
        else:
            out = (c,) + tuple(pool_out(s, k, pd, st)
                               for s, k, pd, st in zip((h, w), p["kernel"], p["pad"], p["stride"], strict=True))
    elif layer.type == "InnerProduct":
        out = (p["num_output"],)
    else:
        out = shape
    if min(out) <= 0:
        raise ValueError(f"output shape {list(out)} is empty for input {list(shape)}")
    return out


def build_net(proto: Message) -> Net:
    """Resolve a parsed deploy prototxt into an ordered chain of supported layers."""
    input_name, dims, raw_layers = _input_spec(proto)
    if len(dims) != 4 or min(dims[1:]) < 1:
        raise ModelFormatError(f"input '{input_name}' must be 4-D N,C,H,W with C, H and W at least 1, "
                               f"got {list(dims)}")
    shape = tuple(int(d) for d in dims[1:])
    layers: list[Layer] = []
    current = input_name
    for raw in raw_layers:
        if not _included(raw):
            continue
        kind = layer_type(raw)
        if kind not in SUPPORTED:
            raise UnsupportedLayerError(
                f"layer '{raw.name}': type {kind} is not supported (supported: {', '.join(SUPPORTED)})")
        if len(raw.bottom) != 1 or len(raw.top) != 1:
            raise UnsupportedLayerError(f"layer '{raw.name}': only single-input single-output layers are supported")
        if raw.bottom[0] != current:
            raise UnsupportedLayerError(
                f"layer '{raw.name}': reads '{raw.bottom[0]}' but the chain is at '{current}' "
                "(only sequential nets are supported)")
        try:
            layer = Layer(name=raw.name, type=kind, bottom=raw.bottom[0], top=raw.top[0],
                          params=_params(kind, raw), in_shape=shape)
            if kind in ("Convolution", "Pooling", "LRN") and len(shape) != 3:
                raise ValueError(f"needs a C,H,W input, got {list(shape)}")
            layer.out_shape = shape = _infer(layer, shape)
        except ValueError as exc:
            raise ModelFormatError(f"layer '{raw.name}' ({kind}): {exc}") from exc
        layers.append(layer)
        current = raw.top[0]
    if not layers:
        raise ModelFormatError("the prototxt has no layers after its input")
    return Net(name=proto.name or "caffe_net", input_name=input_name, input_shape=shape_of(dims), layers=layers)


def shape_of(dims: Sequence[int]) -> tuple[int, int, int]:
    """C, H, W of a 4-D N,C,H,W input."""
    c, h, w = (int(d) for d in dims[1:4])
    return c, h, w


def expected_blob_shapes(layer: Layer) -> list[tuple[int, ...]]:
    p = layer.params
    if layer.type == "Convolution":
        weight = (p["num_output"], layer.in_shape[0] // p["group"]) + tuple(p["kernel"])
    else:
        fan_in = int(np.prod(layer.in_shape))
        weight = (fan_in, p["num_output"]) if p["transpose"] else (p["num_output"], fan_in)
    return [weight, (p["num_output"],)] if p["bias_term"] else [weight]


def all_finite(values: np.ndarray) -> bool:
    """No NaN and no infinity in ``values``: max and min propagate NaN and reach an infinity without the
    mask ``np.isfinite`` would allocate (a quarter of fc6's bytes, over a memory-mapped file)."""
    return values.size == 0 or bool(np.isfinite(values.max()) and np.isfinite(values.min()))


def attach_weights(net: Net, records: Iterable[CaffeLayerWeights]) -> list[str]:
    """Match caffemodel layers to the net by name; returns the names that were ignored.

    Every blob must have the shape the prototxt needs and hold finite values: a NaN or an infinity
    would reach every output, and the INT8 quantisers fail on it with a traceback."""
    by_name = {layer.name: layer for layer in net.learned()}
    ignored = []
    for record in records:
        layer = by_name.get(record.name)
        if layer is None:
            ignored.append(record.name)
            continue
        expected = expected_blob_shapes(layer)
        if len(record.blobs) != len(expected):
            raise ModelFormatError(f"layer '{layer.name}': caffemodel has {len(record.blobs)} blobs, "
                                   f"the prototxt needs {len(expected)} "
                                   f"(weights{' and bias' if len(expected) == 2 else ''})")
        arrays = []
        names = ("weights", "bias")[:len(expected)]
        for blob, legacy, want, what in zip(record.blobs, record.legacy_shapes, expected, names, strict=True):
            shape = tuple(blob.shape)
            if legacy:   # num/channels/height/width: compare as Caffe does, padded to 4-D
                match = shape == (1,) * (4 - len(want)) + want if len(want) <= 4 else False
            else:
                match = shape == want
            if not match:
                raise ModelFormatError(f"layer '{layer.name}': {what} shape {list(shape)} in the caffemodel, "
                                       f"the prototxt needs {list(want)}")
            if not all_finite(blob):
                raise ModelFormatError(f"layer '{layer.name}': {what} hold NaN or infinite values")
            arrays.append(blob.reshape(want))
        layer.weights = arrays
    missing = [layer.name for layer in net.learned() if not layer.weights]
    if missing:
        raise ModelFormatError(f"layer '{missing[0]}': no weights in the caffemodel"
                               + (f" (nor for {', '.join(missing[1:])})" if len(missing) > 1 else ""))
    return ignored
