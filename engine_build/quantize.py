"""Static INT8 (QDQ) for CPU runtimes, calibrated on real photos with ONNX Runtime's tools."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class _HideShapeInferenceHint(logging.Filter):
    """ONNX Runtime's quantizer suggests a pre-processing pass on the root logger; our graph
    already carries full shapes, so the hint is noise for every build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray, batch: int = 8) -> None:
    """Write a QDQ INT8 model: Conv/Gemm weights per-channel int8, activations uint8.

    Preprocessing, LRN and the softmax stay in float; the I/O contract is unchanged.
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([calibration[i:i + batch] for i in range(0, len(calibration), batch)])

        def get_next(self):
            images = next(self._batches, None)
            return None if images is None else {"images": images}

    log.info("calibrating INT8 on %d images", len(calibration))
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
