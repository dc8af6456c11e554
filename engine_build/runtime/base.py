"""The backend interface shared by validation, evaluation, the service and benchmarks.

A backend runs one artifact file (``model.onnx``, ``model.fp16.onnx``,
``model.int8.onnx`` or ``engine.plan``): uint8 BGR [N,256,256,3] in, ``probs`` and
``logits`` float32 [N,2] out. :meth:`Backend.infer` checks the input and splits
batches above ``max_batch``; subclasses implement :meth:`Backend._infer_impl` only.
``concurrency`` says how many threads may call ``infer`` at once with benefit.
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ConfigError
from ..preprocess import IMAGE_SIZE

INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)


@dataclass
class Outputs:
    probs: np.ndarray
    logits: np.ndarray


class Backend(ABC):
    name: str = "?"
    concurrency: int = 1

    def __init__(self, path: Path, precision: str, max_batch: int) -> None:
        self.path = Path(path)
        self.precision = precision          # precision of the file: fp32/fp16/int8
        self.max_batch = max_batch
        self.compute_precision = precision  # what the runtime actually computes in

    def infer(self, images: np.ndarray) -> Outputs:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != INPUT_SHAPE:
            raise ValueError(f"expected uint8 [N,{IMAGE_SIZE},{IMAGE_SIZE},3], got {images.dtype} {images.shape}")
        if len(images) == 0:
            empty = np.zeros((0, 2), np.float32)
            return Outputs(empty, empty.copy())
        parts = [self._infer_impl(np.ascontiguousarray(images[i:i + self.max_batch]))
                 for i in range(0, len(images), self.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return Outputs(np.concatenate([p.probs for p in parts]), np.concatenate([p.logits for p in parts]))

    @abstractmethod
    def _infer_impl(self, images: np.ndarray) -> Outputs: ...

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.name} {self.precision} file, computing in {self.compute_precision}"

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def available_backends() -> dict[str, str | None]:
    """Each backend name -> None when usable here, else the reason it is not."""
    from .tensorrt_backend import tensorrt_unavailable_reason
    return {
        "tensorrt": tensorrt_unavailable_reason(),
        "openvino": None if importlib.util.find_spec("openvino") else "OpenVINO is not installed (pip install openvino)",
        "onnxruntime": None if importlib.util.find_spec("onnxruntime") else "ONNX Runtime is not installed (pip install onnxruntime)",
    }


def open_backend(kind: str, path: Path, precision: str, max_batch: int = 32, exact: bool = False,
                 threads: int | None = None) -> Backend:
    """Open ``path`` on runtime ``kind``.

    ``exact`` makes runtimes that would silently lower precision (OpenVINO's bf16 on
    CPUs that have it) compute in the file's own precision.
    """
    reason = available_backends().get(kind, f"unknown backend '{kind}'")
    if reason:
        raise BackendUnavailable(reason)
    if not Path(path).exists():
        raise ConfigError(f"{path} does not exist")
    if kind == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend(path, precision, max_batch, threads=threads)
    if kind == "openvino":
        from .openvino_backend import OpenVinoBackend
        return OpenVinoBackend(path, precision, max_batch, exact=exact, threads=threads)
    from .tensorrt_backend import TensorRtBackend
    return TensorRtBackend(path, precision, max_batch)
