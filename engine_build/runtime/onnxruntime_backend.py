"""ONNX Runtime on CPU: the portable path and the FP32 reference.

One session serves ``streams`` callers at once (``session.run`` is thread-safe), the
cores split between them; ``0`` means one stream per core, at most four.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from .base import Backend, Outputs


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: Path, precision: str, max_batch: int, threads: int | None = None,
                 streams: int = 1) -> None:
        super().__init__(path, precision, max_batch)
        import onnxruntime as ort

        cores = os.cpu_count() or 1
        self.concurrency = streams or min(cores, 4)
        options = ort.SessionOptions()
        if threads or self.concurrency > 1:
            options.intra_op_num_threads = max(1, (threads or cores) // self.concurrency)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            raise ModelFormatError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc

    def _infer_impl(self, images: np.ndarray) -> Outputs:
        probs, logits = self._session.run(["probs", "logits"], {"images": images})
        return Outputs(probs, logits)
