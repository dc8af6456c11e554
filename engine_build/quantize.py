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

Both keep the I/O contract: preprocessing, LRN and the softmax stay in float.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from .errors import ModelFormatError

log = logging.getLogger(__name__)
QUANTIZERS = ("nncf", "minmax")


class _HideShapeInferenceHint(logging.Filter):
    """ONNX Runtime's quantizer suggests a pre-processing pass on the root logger; our graph
    already carries full shapes, so the hint is noise for every build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_nncf(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> dict:
    """NNCF PTQ (MinMax ranges + fast bias correction) to a QDQ file; returns what the manifest records.

    Fast bias correction, not NNCF's full one: on the full-size model it was as accurate here
    (max |dp| 0.0070 vs 0.0083 on OpenVINO) in a third of the time. NNCF's progress bars go
    to stdout; they are swallowed here (only the CLI prints).
    """
    import nncf
    import onnx

    model = onnx.load(str(fp32_path))
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))], lambda x: {"images": x})
    log.info("calibrating INT8 (NNCF, fast bias correction) on %d images", len(calibration))
    nncf.set_log_level(logging.INFO if log.isEnabledFor(logging.INFO) else logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantized = nncf.quantize(model, dataset, subset_size=len(calibration), fast_bias_correction=True)
    except (nncf.InternalError, nncf.ValidationError, ValueError) as exc:
        raise ModelFormatError(f"NNCF cannot quantise {fp32_path.name}: {exc}") from exc
    onnx.save(quantized, str(int8_path))
    return {"quantizer": "nncf", "version": nncf.__version__,
            "method": "post-training, MinMax ranges, fast bias correction", "format": "QDQ"}


def quantize_minmax(fp32_path: Path, int8_path: Path, calibration: np.ndarray, batch: int = 8) -> dict:
    """ONNX Runtime's static quantiser: Conv/Gemm weights per-channel int8, activations uint8, MinMax."""
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
            images = next(self._batches, None)
            return None if images is None else {"images": images}

    log.info("calibrating INT8 (ONNX Runtime MinMax) on %d images", len(calibration))
    hint = _HideShapeInferenceHint()
    logging.getLogger().addFilter(hint)
    try:
        quantize_static(str(fp32_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", "Gemm"], per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        calibration_providers=["CPUExecutionProvider"])
    finally:
        logging.getLogger().removeFilter(hint)
    return {"quantizer": "onnxruntime", "version": onnxruntime.__version__,
            "method": "static, MinMax ranges, per-channel weights", "format": "QDQ"}
