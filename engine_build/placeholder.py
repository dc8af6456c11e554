"""Placeholder weights: the published architecture with seeded random weights.

The real fine-tuned weights (``twitter_finetuned_test4_iter_180.caffemodel``) are
published by the authors and cannot be fetched on every machine. Everything built
from these placeholder weights is flagged as such in the manifest and wherever a
label is shown: its labels mean nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message

from .caffe_io import load_prototxt, write_caffemodel
from .caffe_net import Net, build_net, expected_blob_shapes
from .caffe_schema import schema

PLACEHOLDER_NAME = "Twitter_finetuned_PLACEHOLDER"

# CaffeNet as published: (name, type, params). Widths scale for small test nets.
_ARCH: list[tuple[str, str, dict[str, Any]]] = [
    ("conv1", "Convolution", dict(num_output=96, kernel_size=11, stride=4)),
    ("relu1", "ReLU", {}), ("pool1", "Pooling", dict(kernel_size=3, stride=2)),
    ("norm1", "LRN", dict(local_size=5, alpha=0.0001, beta=0.75)),
    ("conv2", "Convolution", dict(num_output=256, pad=2, kernel_size=5, group=2)),
    ("relu2", "ReLU", {}), ("pool2", "Pooling", dict(kernel_size=3, stride=2)),
    ("norm2", "LRN", dict(local_size=5, alpha=0.0001, beta=0.75)),
    ("conv3", "Convolution", dict(num_output=384, pad=1, kernel_size=3)),
    ("relu3", "ReLU", {}),
    ("conv4", "Convolution", dict(num_output=384, pad=1, kernel_size=3, group=2)),
    ("relu4", "ReLU", {}),
    ("conv5", "Convolution", dict(num_output=256, pad=1, kernel_size=3, group=2)),
    ("relu5", "ReLU", {}), ("pool5", "Pooling", dict(kernel_size=3, stride=2)),
    ("fc6", "InnerProduct", dict(num_output=4096)), ("relu6", "ReLU", {}),
    ("drop6", "Dropout", dict(dropout_ratio=0.5)),
    ("fc7", "InnerProduct", dict(num_output=4096)), ("relu7", "ReLU", {}),
    ("drop7", "Dropout", dict(dropout_ratio=0.5)),
    ("fc8_twitter", "InnerProduct", dict(num_output=2)),
    ("prob", "Softmax", {}),
]
_PARAM_FIELD = {"Convolution": "convolution_param", "InnerProduct": "inner_product_param",
                "Pooling": "pooling_param", "LRN": "lrn_param", "Dropout": "dropout_param",
                "ReLU": "relu_param"}


def deploy_net(width: float = 1.0, name: str = PLACEHOLDER_NAME, input_form: str = "input_dim",
               overrides: dict[str, dict] | None = None) -> Message:
    """NetParameter for CaffeNet-Twitter; ``width`` < 1 shrinks channel counts for tests.

    ``input_form``: ``input_dim`` (as published), ``input_shape`` or ``layer`` (Input layer).
    ``overrides`` replaces params of named layers (tests use it for other pooling modes).
    """
    S = schema()
    net = S.NetParameter(name=name)
    dims = [10, 3, 227, 227]
    if input_form == "layer":
        layer = net.layer.add(name="data", type="Input", top=["data"])
        layer.input_param.shape.add().dim.extend(dims)
    else:
        net.input.append("data")
        if input_form == "input_shape":
            net.input_shape.add().dim.extend(dims)
        else:
            net.input_dim.extend(dims)
    bottom = "data"
    for layer_name, kind, params in _ARCH:
        params = dict((overrides or {}).get(layer_name, params))
        if "num_output" in params and layer_name != "fc8_twitter":
            groups = params.get("group", 1)
            params["num_output"] = max(groups, int(round(params["num_output"] * width / groups)) * groups)
        in_place = kind in ("ReLU", "Dropout")
        top = bottom if in_place else layer_name
        layer = net.layer.add(name=layer_name, type=kind, bottom=[bottom], top=[top])
        if kind in _PARAM_FIELD:
            target = getattr(layer, _PARAM_FIELD[kind])
            for key, value in params.items():
                if hasattr(getattr(target, key), "append"):   # repeated field
                    getattr(target, key).append(value)
                elif key == "pool":
                    target.pool = S.enums["PoolMethod"].values_by_name[value].number
                else:
                    setattr(target, key, value)
        bottom = top
    return net


def _final_layer(net: Net, features: np.ndarray, rng: np.random.Generator, logit_std: float = 4.0) -> list[np.ndarray]:
    """fc8 that reads the top principal direction of the features, centred on their median.

    Deep ReLU nets with random weights map every image to nearly the same features;
    a random final layer then gives margins inside numerical noise. Projecting onto
    the direction along which real photos differ most gives image-dependent labels,
    a quarter to three quarters of each on the built-in photos, with logit gaps of a few units.
    ``logit_std`` is the spread of the logit gap over the photos: a small one (0.3) makes a model
    with many near-ties (probabilities within 0.05 of 0.5), as a real two-class model has on
    ambiguous photos, which is the hard case for reduced precision.
    """
    centred = features - features.mean(axis=0)
    direction = np.linalg.svd(centred, full_matrices=False)[2][0]
    projection = features @ direction
    direction = direction * (logit_std / max(projection.std(), 1e-12))
    # Decision boundary in the widest gap among the middle half of the photos, so
    # no photo sits right on it and the precision variants can be compared fairly.
    ordered = np.sort(features @ direction)
    lo, hi = len(ordered) // 4, max(len(ordered) // 4 + 1, 3 * len(ordered) // 4)
    gaps = np.diff(ordered[lo:hi + 1])
    widest = lo + int(np.argmax(gaps))
    middle = float((ordered[widest] + ordered[widest + 1]) / 2)
    noise = rng.normal(0.0, 1e-4, size=(2, features.shape[1]))
    weight = (np.stack([-direction / 2, direction / 2]) + noise).astype(np.float32)
    bias = np.array([middle / 2, -middle / 2], dtype=np.float32)
    return [weight, bias]


def seeded_weights(net: Net, seed: int = 0, logit_std: float = 4.0) -> list[tuple[str, str, list[np.ndarray]]]:
    """He-initialised weights; the last layer is fitted to the features of the built-in photos."""
    import dataclasses

    import onnxruntime as ort

    from .imaging import builtin_photos, photo_views
    from .onnx_graph import build_onnx

    rng = np.random.default_rng(seed)
    learned = net.learned()
    for layer in learned:
        shapes = expected_blob_shapes(layer)
        fan_in = int(np.prod(shapes[0][1:])) if layer.type == "Convolution" else int(np.prod(layer.in_shape))
        layer.weights = [rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shapes[0]).astype(np.float32)]
        if len(shapes) > 1:
            layer.weights.append(rng.normal(0.0, 0.01, size=shapes[1]).astype(np.float32))
    last = net.layers.index(learned[-1])
    body = dataclasses.replace(net, layers=net.layers[:last])
    session = ort.InferenceSession(build_onnx(body).SerializeToString(), providers=["CPUExecutionProvider"])
    features = session.run(["logits"], {"images": photo_views(builtin_photos())})[0].astype(np.float64)
    learned[-1].weights = _final_layer(net, features, rng, logit_std)
    return [(layer.name, layer.type, layer.weights) for layer in learned]


def write_placeholder(output: str | Path, width: float = 1.0, seed: int = 0,
                      legacy_format: bool = False, legacy_shapes: bool = False, packed: bool = True,
                      input_form: str = "input_dim", overrides: dict[str, dict] | None = None,
                      logit_std: float = 4.0) -> tuple[Path, Path]:
    """Write ``deploy.prototxt`` and ``placeholder.caffemodel`` into ``output``.

    ``logit_std``: spread of the final logit gap over the built-in photos (see ``_final_layer``).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    proto = deploy_net(width, input_form=input_form, overrides=overrides)
    prototxt = output / "deploy.prototxt"
    prototxt.write_text("# PLACEHOLDER architecture file written by engine_build placeholder-model\n"
                        + text_format.MessageToString(proto))
    net = build_net(load_prototxt(prototxt))
    caffemodel = output / "placeholder.caffemodel"
    write_caffemodel(caffemodel, proto.name, seeded_weights(net, seed, logit_std),
                     legacy_format=legacy_format, legacy_shapes=legacy_shapes, packed=packed)
    return prototxt, caffemodel


def ensure_placeholder(output: str | Path) -> tuple[Path, Path]:
    """The placeholder files in ``output``, written only if they are not there yet."""
    output = Path(output)
    prototxt, caffemodel = output / "deploy.prototxt", output / "placeholder.caffemodel"
    if prototxt.exists() and caffemodel.exists():
        return prototxt, caffemodel
    return write_placeholder(output)
