"""ONNX Runtime on CPU: the portable path and the FP32 reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from .base import Backend, Outputs


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: Path, precision: str, max_batch: int, threads: int | None = None) -> None:
        super().__init__(path, precision, max_batch)
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            raise ModelFormatError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc

    def _infer_impl(self, images: np.ndarray) -> Outputs:
        probs, logits = self._session.run(["probs", "logits"], {"images": images})
        return Outputs(probs, logits)
