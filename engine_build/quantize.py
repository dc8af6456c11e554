"""Static INT8 (QDQ ONNX) for the CPU runtimes, calibrated on real photos.

Two quantisers, because no one QDQ file is the fastest on both CPU runtimes
(``benchmarks/throughput.py`` measures them side by side):

- :func:`quantize_nncf`: NNCF's post-training quantisation (OpenVINO's own) through its
  ONNX backend, with (fast) bias correction: each quantised layer's bias is shifted by the
  mean error quantisation causes in its output on the calibration images. The most accurate
  of the two, and the fastest on OpenVINO; ONNX Runtime runs it at about half speed, because NNCF places its
  quantisers where OpenVINO fuses them (after LRN, not after each ReLU), so ONNX
  Runtime leaves the two largest convolutions in float.
- :func:`quantize_minmax`: ONNX Runtime's static quantiser with MinMax ranges, which
  places a quantiser after every Conv/Gemm as ONNX Runtime's fusions expect.

Both keep the I/O contract: preprocessing, LRN and the softmax stay in float, and so do
the ``float_layers`` the sensitivity pass (:mod:`.sensitivity`) chose.

**The same numbers on every x86 CPU.** Without VNNI (AVX2, AVX-512 before Cascade Lake) the
int8 kernels of both runtimes multiply uint8 activations by int8 weights with
``vpmaddubsw``, whose 16-bit sums saturate when both weights of a pair are large: ONNX
Runtime's MinMax file gave max |dp| 0.0365 under an emulated AVX2-only EPYC and 0.0331 on
AVX-512 VNNI for the same file and photos. Both quantisers therefore keep weights to 7 bits
(ONNX Runtime's ``reduce_range``, NNCF's overflow fix on every layer): no pair can saturate,
so VNNI, AMX and AVX2 compute the same integers.
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFormatError
from .interrupts import checkpoint

log = logging.getLogger(__name__)
QUANTIZERS = ("nncf", "minmax")
# The ops either quantiser turns into int8 kernels: the layers a sensitivity pass may keep in float.
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


class _HideShapeInferenceHint(logging.Filter):
    """ONNX Runtime's quantizer suggests a pre-processing pass on the root logger; our graph
    already carries full shapes, so the hint is noise for every build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantizable_layers(graph: Any) -> list[str]:
    """Names of the nodes of ``graph`` (an ONNX GraphProto) an INT8 file may compute in int8, in order."""
    return [n.name for n in graph.node if n.op_type in QUANTIZED_OPS and n.name]


def output_layers(graph: Any) -> list[str]:
    """The quantisable layers that compute the model's outputs (the classifier's logits).

    They stay in float: an int8 output takes its range from the calibration photos, and a photo
    whose logits fall outside it is clipped (ONNX Runtime's quantiser quantises Gemm outputs).
    For a two-class head this is 2 x 4096 multiply-adds, nothing next to the rest.
    """
    producer = {out: node for node in graph.node for out in node.output}
    found: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or tensor in seen:
            continue
        seen.add(tensor)
        if node.op_type in QUANTIZED_OPS:
            found.append(node.name)
        else:
            stack.extend(node.input)
    return [n.name for n in graph.node if n.name in found]


def head_nodes(graph: Any) -> list[str]:
    """Every named node after the output layers (softmax, the average over ``--oversample``'s crops).

    NNCF puts quantisers on the inputs of such ops too: with ten crops it quantised each crop's
    logits and probabilities before their average, clipped them to the calibration photos' range
    and failed the gate by 0.08 to 0.11 on every model tried. Ignoring them keeps the head in float.
    """
    outputs = set(output_layers(graph))
    frontier = {out for n in graph.node if n.name in outputs for out in n.output}
    found: list[str] = []
    for node in graph.node:                       # ONNX nodes are in topological order
        if frontier & set(node.input):
            frontier |= set(node.output)
            if node.name:
                found.append(node.name)
    return found


def quantize_nncf(fp32_path: Path, int8_path: Path, calibration: np.ndarray,
                  float_layers: Sequence[str] = ()) -> dict:
    """NNCF PTQ (MinMax ranges + fast bias correction) to a QDQ file; returns what the manifest records.

    Fast bias correction, not NNCF's full one: on the full-size model it was as accurate here
    (max |dp| 0.0070 vs 0.0083 on OpenVINO) in a third of the time. NNCF's progress bars go
    to stdout; they are swallowed here (only the CLI prints).
    """
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    model = onnx.load(str(fp32_path))
    def feed(image: np.ndarray) -> dict[str, np.ndarray]:
        checkpoint()   # NNCF asks for each image in turn: a stop lands here, in Python, not in its native code
        return {"images": image}
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))], feed)
    log.info("calibrating INT8 (NNCF, fast bias correction) on %d images%s", len(calibration), _kept(float_layers))
    nncf.set_log_level(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR)
    ignored = nncf.IgnoredScope(names=[*float_layers, *head_nodes(model.graph)], validate=False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantized = nncf.quantize(model, dataset, subset_size=len(calibration), fast_bias_correction=True,
                                      ignored_scope=ignored,
                                      advanced_parameters=AdvancedQuantizationParameters(
                                          overflow_fix=OverflowFix.ENABLE))
    except (nncf.InternalError, nncf.ValidationError, ValueError) as exc:
        raise ModelFormatError(f"NNCF cannot quantise {fp32_path.name}: {exc}") from exc
    halved = seven_bit_weights(quantized)
    if halved:
        log.info("INT8 weights of %s taken to 7 bits (NNCF's overflow fix skips grouped convolutions)",
                 ", ".join(halved))
    onnx.save(quantized, str(int8_path))
    return {"quantizer": "nncf", "version": nncf.__version__,
            "method": "post-training, MinMax ranges, fast bias correction, 7-bit weights (overflow fix)",
            "format": "QDQ", "float_layers": list(float_layers)}


def quantize_minmax(fp32_path: Path, int8_path: Path, calibration: np.ndarray,
                    float_layers: Sequence[str] = (), batch: int = 8) -> dict:
    """ONNX Runtime's static quantiser: Conv/Gemm weights per-channel 7-bit int8, activations uint8, MinMax."""
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([calibration[i:i + batch] for i in range(0, len(calibration), batch)])

        def get_next(self) -> dict | None:
            checkpoint()
            images = next(self._batches, None)
            return None if images is None else {"images": images}

    log.info("calibrating INT8 (ONNX Runtime MinMax) on %d images%s", len(calibration), _kept(float_layers))
    hint = _HideShapeInferenceHint()
    logging.getLogger().addFilter(hint)
    try:
        quantize_static(str(fp32_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(float_layers),
                        calibration_providers=["CPUExecutionProvider"])
    finally:
        logging.getLogger().removeFilter(hint)
    return {"quantizer": "onnxruntime", "version": onnxruntime.__version__,
            "method": "static, MinMax ranges, per-channel 7-bit weights (reduce_range)", "format": "QDQ",
            "float_layers": list(float_layers)}


def seven_bit_weights(model: Any) -> list[str]:
    """Requantise every symmetric int8 weight outside [-64, 64] to 7 bits (half the values, twice
    the scale), in place; returns the layers changed.

    NNCF's overflow fix leaves grouped convolutions (CaffeNet's conv2, conv4 and conv5) at 8
    bits, where AVX2 without VNNI can saturate. A weight or scale that another node also reads
    is copied under a new name first, so nothing but this DequantizeLinear's layer changes.
    """
    from onnx import numpy_helper
    initializers = {init.name: init for init in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    changed: list[str] = []
    for node in model.graph.node:
        inputs = list(node.input) + [""] * (3 - len(node.input))
        weight, scale, zero = inputs[:3]
        if node.op_type != "DequantizeLinear" or weight not in initializers or scale not in initializers:
            continue
        values = numpy_helper.to_array(initializers[weight])
        users = consumers.get(node.output[0], [])
        if values.dtype != np.int8 or not users or any(u.op_type not in QUANTIZED_OPS for u in users):
            continue
        if zero and (zero not in initializers or np.any(numpy_helper.to_array(initializers[zero]) != 0)):
            continue     # asymmetric: halving would move the zero point
        if values.min() >= -64 and values.max() <= 64:
            continue
        factor = numpy_helper.to_array(initializers[scale])
        halved = np.clip(np.round(values.astype(np.float32) / 2), -64, 64).astype(np.int8)
        for position, name, array in ((0, weight, halved), (1, scale, (factor * 2).astype(factor.dtype))):
            if len(consumers[name]) > 1:            # shared: this node gets its own copy
                name = f"{name}__7bit_{node.name or node.output[0]}"
                model.graph.initializer.append(numpy_helper.from_array(array, name))
                node.input[position] = name
            else:
                initializers[name].CopyFrom(numpy_helper.from_array(array, name))
        changed.extend(u.name for u in users)
    used = {name for node in model.graph.node for name in node.input}
    orphans = [init for init in model.graph.initializer if init.name not in used]   # shared ones all copied
    for init in orphans:
        model.graph.initializer.remove(init)
    return changed


def _kept(float_layers: Sequence[str]) -> str:
    return f", keeping {', '.join(float_layers)} in float" if float_layers else ""
