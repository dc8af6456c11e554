"""Caffe import: parity with OpenCV's independent importer, every file variant, error cases."""
from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from engine_build.caffe_io import iter_caffemodel, load_prototxt
from engine_build.caffe_net import attach_weights, build_net, pool_out
from engine_build.errors import ModelFormatError, UnsupportedLayerError
from engine_build.onnx_graph import build_onnx
from engine_build.placeholder import write_placeholder
from engine_build.preprocess import reference_crops

assert cv2.__version__.startswith("4."), "OpenCV 5 has no Caffe importer: the oracle needs opencv<5"


def ours(prototxt, caffemodel, images, oversample=False, dtype="float32"):
    net = build_net(load_prototxt(prototxt))
    attach_weights(net, iter_caffemodel(caffemodel, progress=False))
    model = build_onnx(net, oversample=oversample, dtype=dtype)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probs, logits = session.run(["probs", "logits"], {"images": images})
    return probs, logits


def opencv_logits(prototxt, caffemodel, crops, blob="fc8_twitter"):
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setInput(crops)
    return net.forward(blob)


def assert_close_relative(actual, expected, rtol=1e-4):
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, (np.abs(actual - expected).max(), scale)


@pytest.mark.parametrize("legacy_format,legacy_shapes,packed", [
    (False, False, True), (False, True, True), (True, False, True), (True, True, True),
    (False, False, False), (True, True, False)])
def test_logits_match_opencv_for_every_file_variant(tmp_path, photos, legacy_format, legacy_shapes, packed):
    prototxt, caffemodel = write_placeholder(tmp_path, width=0.25, seed=3, legacy_format=legacy_format,
                                             legacy_shapes=legacy_shapes, packed=packed)
    _, logits = ours(prototxt, caffemodel, photos)
    expected = opencv_logits(prototxt, caffemodel, reference_crops(photos, oversample=False))
    assert_close_relative(logits, expected)


@pytest.mark.parametrize("input_form", ["input_shape", "layer"])
def test_input_declaration_forms(tmp_path, photos, input_form):
    prototxt, caffemodel = write_placeholder(tmp_path, width=0.25, seed=4, input_form=input_form)
    _, logits = ours(prototxt, caffemodel, photos[:3])
    assert_close_relative(logits, opencv_logits(prototxt, caffemodel, reference_crops(photos[:3], False)))


POOLING_CASES = {
    # average pooling with padding and a ceil-rounding overhang (27 -> 14 with Caffe's clip rule)
    "ave_pad_overhang": {"pool2": dict(pool="AVE", kernel_size=2, stride=2, pad=1)},
    # max pooling where ceil rounding adds a partial window (27 -> 14)
    "max_overhang": {"pool2": dict(pool="MAX", kernel_size=2, stride=2)},
    "ave_plain": {"pool1": dict(pool="AVE", kernel_size=3, stride=2)},
    "dilated_leaky": {"conv3": dict(num_output=384, pad=2, kernel_size=3, dilation=2),
                      "relu3": dict(negative_slope=0.1)},
}


@pytest.mark.parametrize("case", sorted(POOLING_CASES))
def test_pooling_and_convolution_rules_match_opencv(tmp_path, photos, case):
    prototxt, caffemodel = write_placeholder(tmp_path, width=0.25, seed=5, overrides=POOLING_CASES[case])
    for layer, params in POOLING_CASES[case].items():   # the variant really is in the file
        for key in params:
            assert f"{key}:" in prototxt.read_text(), (layer, key)
    _, logits = ours(prototxt, caffemodel, photos[:4])
    assert_close_relative(logits, opencv_logits(prototxt, caffemodel, reference_crops(photos[:4], False)))


def test_caffe_pool_output_size_rule():
    assert pool_out(55, 3, 0, 2) == 27
    assert pool_out(27, 2, 0, 2) == 14          # ceil, not floor
    assert pool_out(27, 2, 1, 2) == 14          # the last window would start in the padding: clipped
    assert pool_out(13, 3, 0, 2) == 6


def test_oversampling_matches_numpy_ten_crops(small_model, photos):
    prototxt, caffemodel = small_model
    probs, logits = ours(prototxt, caffemodel, photos[:4], oversample=True)
    crops = reference_crops(photos[:4], oversample=True)            # [10 * 4, 3, 227, 227], crop-major
    per_crop = opencv_logits(prototxt, caffemodel, crops)
    e = np.exp(per_crop - per_crop.max(1, keepdims=True))
    crop_probs = e / e.sum(1, keepdims=True)
    expected = crop_probs.reshape(10, 4, 2).mean(0)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(logits, per_crop.reshape(10, 4, 2).mean(0), rtol=1e-4, atol=1e-3)
    # the ten crops really differ: corners, centre and mirrors each move the answer
    assert len({round(float(v), 6) for v in per_crop[:, 0]}) == 40


def test_reference_crop_geometry_follows_caffe_oversample():
    from engine_build.preprocess import crop_origins
    assert crop_origins(False) == [(14, 14, False)]
    plain = [(0, 0), (0, 29), (29, 0), (29, 29), (14, 14)]
    assert crop_origins(True) == [(r, c, False) for r, c in plain] + [(r, c, True) for r, c in plain]
    images = np.arange(256 * 256 * 3, dtype=np.uint32).reshape(1, 256, 256, 3).astype(np.uint8)
    crops = reference_crops(images, True)
    np.testing.assert_array_equal(crops[5], crops[0][:, :, ::-1])   # mirror of the top-left crop


def test_published_prototxt_parses(reference_dir):
    net = build_net(load_prototxt(reference_dir / "sentiment_deploy.prototxt"))
    assert net.name == "Twitter_finetuned"
    assert net.input_shape == (3, 227, 227)
    shapes = {layer.name: layer.out_shape for layer in net.layers}
    assert shapes["pool5"] == (256, 6, 6) and shapes["fc6"] == (4096,) and shapes["fc8_twitter"] == (2,)
    assert [layer.name for layer in net.learned()] == ["conv1", "conv2", "conv3", "conv4", "conv5",
                                                       "fc6", "fc7", "fc8_twitter"]


@pytest.mark.slow
def test_full_size_parity_on_the_published_prototxt(reference_dir, full_model, photos):
    """The authors' own deploy file with full-size weights, against OpenCV."""
    _, caffemodel = full_model
    prototxt = reference_dir / "sentiment_deploy.prototxt"
    probs, logits = ours(prototxt, caffemodel, photos)
    expected = opencv_logits(prototxt, caffemodel, reference_crops(photos, False))
    assert_close_relative(logits, expected)
    assert len(set(probs.argmax(1))) == 2, "placeholder labels should vary with the image"


# ---- errors: one clear line naming the layer or the offset ----

def test_unsupported_layer_names_the_layer(tmp_path, small_model):
    text = small_model[0].read_text().replace('type: "LRN"', 'type: "BatchNorm"', 1)
    (tmp_path / "bad.prototxt").write_text(text)
    with pytest.raises(UnsupportedLayerError, match="layer 'norm1': type BatchNorm is not supported"):
        build_net(load_prototxt(tmp_path / "bad.prototxt"))


def _in_layer(text: str, layer: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced by ``new`` once, inside layer ``layer``'s braces."""
    start = text.index(f'name: "{layer}"')
    end = text.index("\n}\n", start)
    assert old in text[start:end], (layer, old)
    return text[:start] + text[start:end].replace(old, new, 1) + text[end:]


@pytest.mark.parametrize("layer,old,new,message", [
    ("conv1", "stride: 4", "stride: 0", "stride 0: must be at least 1"),
    ("conv1", "stride: 4", "stride_h: 0 stride_w: 4", "stride_h/stride_w 0/4: must be at least 1"),
    ("pool1", "stride: 2", "stride: 0", "stride 0: must be at least 1"),
    ("pool1", "stride: 2", "stride_h: 2 stride_w: 0", "stride_h/stride_w 2/0: must be at least 1"),
    ("conv2", "group: 2", "group: 0", "group 0: must be at least 1"),
    ("conv1", "kernel_size: 11", "kernel_size: 0", "kernel_size 0: must be at least 1"),
    ("pool1", "kernel_size: 3", "kernel_size: 0", "kernel_size 0: must be at least 1"),
    ("conv1", "num_output: 24", "num_output: 0", "num_output 0: must be at least 1"),
    ("fc6", "num_output: 1024", "num_output: 0", "num_output 0: must be at least 1"),
    ("conv1", "stride: 4", "stride: 4 dilation: 0", "dilation 0: must be at least 1"),
    ("pool1", "stride: 2", "stride: 2 pad: 3", "pad 3: must be smaller than kernel_size 3"),
    ("norm1", "beta: 0.75", "beta: -3", "beta -3: must be above 0"),
    ("norm1", "alpha: 0.0001", "alpha: 0", "alpha 0: must be above 0"),
    (None, "input_dim: 3\n", "input_dim: 0\n", r"input 'data' must be 4-D N,C,H,W with C, H and W at least 1, "
                                                r"got \[10, 0, 227, 227\]"),
    (None, "input_dim: 227\n", "input_dim: -2\n", r"input 'data' .* got \[10, 3, -2, 227\]"),
])
def test_zero_or_negative_layer_parameters_are_one_line_naming_the_layer_and_field(tmp_path, small_model, layer, old,
                                                                                    new, message):
    """Caffe refuses these (CHECK_GT / CHECK_LT); a 0 stride or group divided by zero in the shape rules
    (ZeroDivisionError, a traceback), the others passed the import and failed later, far from their cause:
    a weights shape mismatch in fc6, or ONNX Runtime refusing the LRN."""
    text = small_model[0].read_text()
    text = _in_layer(text, layer, old, new) if layer else text.replace(old, new, 1)
    (tmp_path / "bad.prototxt").write_text(text)
    where = rf"layer '{layer}' \(\w+\): " if layer else ""
    with pytest.raises(ModelFormatError, match=where + message) as info:
        build_net(load_prototxt(tmp_path / "bad.prototxt"))
    assert "\n" not in str(info.value)


def test_missing_weights_name_the_layer(tmp_path, small_model):
    text = small_model[0].read_text().replace('name: "fc7"', 'name: "fc7_renamed"')
    (tmp_path / "renamed.prototxt").write_text(text)
    net = build_net(load_prototxt(tmp_path / "renamed.prototxt"))
    with pytest.raises(ModelFormatError, match="layer 'fc7_renamed': no weights in the caffemodel"):
        attach_weights(net, iter_caffemodel(small_model[1], progress=False))


def test_shape_mismatch_names_the_layer(small_model, tmp_path):
    text = small_model[0].read_text().replace("num_output: 2\n", "num_output: 3\n")
    (tmp_path / "three.prototxt").write_text(text)
    net = build_net(load_prototxt(tmp_path / "three.prototxt"))
    with pytest.raises(ModelFormatError, match=r"layer 'fc8_twitter': weights shape \[2, 1024\] in the caffemodel, "
                                               r"the prototxt needs \[3, 1024\]"):
        attach_weights(net, iter_caffemodel(small_model[1], progress=False))


def _with_value(caffemodel, out, layer: str, blob: int, value: float):
    """A copy of ``caffemodel`` with one value of one blob of ``layer`` replaced."""
    from engine_build.caffe_io import write_caffemodel
    records = [(r.name, r.type, [b.copy() for b in r.blobs]) for r in iter_caffemodel(caffemodel, progress=False)]
    dict((name, blobs) for name, _, blobs in records)[layer][blob].flat[7] = value
    write_caffemodel(out, "with-value", records)
    return out


@pytest.mark.parametrize("layer,blob,value", [("fc8_twitter", 0, np.nan), ("conv1", 1, np.inf),
                                              ("fc7", 0, -np.inf)])
def test_non_finite_weights_name_the_layer_and_blob(small_model, tmp_path, layer, blob, value):
    """A NaN weight went through the import and gave NaN probabilities (an INT8 build ended in a
    61-line traceback from ONNX Runtime's quantiser); now the import refuses it in one line."""
    bad = _with_value(small_model[1], tmp_path / "bad.caffemodel", layer, blob, value)
    net = build_net(load_prototxt(small_model[0]))
    what = ("weights", "bias")[blob]
    with pytest.raises(ModelFormatError, match=f"^layer '{layer}': {what} hold NaN or infinite values$"):
        attach_weights(net, iter_caffemodel(bad, progress=False))
    fine = _with_value(small_model[1], tmp_path / "fine.caffemodel", layer, blob, 3e38)
    attach_weights(build_net(load_prototxt(small_model[0])), iter_caffemodel(fine, progress=False))


def test_truncated_caffemodel_names_the_offset(small_model, tmp_path):
    data = small_model[1].read_bytes()
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError,
                       match=r"truncated: the record at byte offset \d+ declares \d+ bytes but only \d+ remain"):
        list(iter_caffemodel(cut, progress=False))


def test_corrupt_layer_names_the_offset(small_model, tmp_path):
    data = bytearray(small_model[1].read_bytes())
    # first layer record: tag (field 100) is 2 bytes, then its length varint, then the message
    data[60:80] = b"\xff" * 20
    bad = tmp_path / "corrupt.caffemodel"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=r"byte offset \d+"):
        list(iter_caffemodel(bad, progress=False))


def test_not_a_caffemodel(tmp_path):
    bad = tmp_path / "photo.caffemodel"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(ModelFormatError, match="caffemodel .* (corrupt|truncated)"):
        list(iter_caffemodel(bad, progress=False))
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError, match="is empty"):
        list(iter_caffemodel(empty, progress=False))


def test_prototxt_syntax_error_is_one_line(tmp_path):
    (tmp_path / "broken.prototxt").write_text('name: "x"\nlayer { name: "a" type: "ReLU" bottom: ')
    with pytest.raises(ModelFormatError) as info:
        load_prototxt(tmp_path / "broken.prototxt")
    assert "\n" not in str(info.value)


def test_training_only_layers_are_ignored(tmp_path, photos):
    """A caffemodel with data/loss layers beside the deploy layers loads; extra names are reported."""
    from engine_build.caffe_io import write_caffemodel
    prototxt, caffemodel = write_placeholder(tmp_path, width=0.25, seed=6)
    records = [(r.name, r.type, r.blobs) for r in iter_caffemodel(caffemodel, progress=False)]
    records.insert(0, ("data", "Data", []))
    records.append(("loss_helper", "InnerProduct", [np.ones((2, 2), np.float32)]))
    write_caffemodel(tmp_path / "train.caffemodel", "train", records)
    net = build_net(load_prototxt(prototxt))
    assert attach_weights(net, iter_caffemodel(tmp_path / "train.caffemodel", progress=False)) == ["loss_helper"]
