"""TensorRT: run ``engine.plan`` with pinned host buffers, device buffers and a CUDA stream.

Each of the backend's two slots owns an execution context, a stream and its buffers;
two threads calling :meth:`infer` at once overlap one slot's copies with the other's
compute. Written against the TensorRT 10 and 11 Python APIs (tensor-address I/O,
``execute_async_v3``).
"""
from __future__ import annotations

import importlib.util
import queue
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, BackendUnavailable
from .base import INPUT_SHAPE, Backend, Outputs


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA GPU are usable here, else one line saying what is missing."""
    if importlib.util.find_spec("tensorrt") is None:
        return ("TensorRT is not installed: pip install 'sentiment-stream[gpu]' "
                "(tensorrt wheels come from NVIDIA's index, https://pypi.nvidia.com)")
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed: pip install 'cuda-python>=12'"
    try:
        from .cuda_memory import check, cudart
        count = check(cudart().cudaGetDeviceCount())
    except Exception as exc:  # no driver, no device, broken install
        return f"no usable CUDA GPU ({exc})"
    return None if count > 0 else "no CUDA GPU found"


def trt_logger():
    import tensorrt as trt
    return trt.Logger(trt.Logger.WARNING)


class _Slot:
    def __init__(self, engine, max_batch: int) -> None:
        from .cuda_memory import PinnedBuffer, check, cudart
        self.context = engine.create_execution_context()
        self.stream = check(cudart().cudaStreamCreate())
        self.input = PinnedBuffer((max_batch,) + INPUT_SHAPE, np.uint8)
        self.outputs = {name: PinnedBuffer((max_batch, 2), np.float32) for name in ("probs", "logits")}
        self.context.set_tensor_address("images", int(self.input.device))
        for name, buffer in self.outputs.items():
            self.context.set_tensor_address(name, int(buffer.device))

    def run(self, images: np.ndarray) -> Outputs:
        from .cuda_memory import check, cudart
        n = len(images)
        self.input.host[:n] = images
        self.context.set_input_shape("images", (n,) + INPUT_SHAPE)
        self.input.to_device(images.nbytes, self.stream)
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for buffer in self.outputs.values():
            buffer.to_host(n * 2 * 4, self.stream)
        check(cudart().cudaStreamSynchronize(self.stream))
        return Outputs(self.outputs["probs"].host[:n].copy(), self.outputs["logits"].host[:n].copy())

    def free(self) -> None:
        from .cuda_memory import cudart
        for buffer in [self.input, *self.outputs.values()]:
            buffer.free()
        cudart().cudaStreamDestroy(self.stream)


class TensorRtBackend(Backend):
    name = "tensorrt"
    concurrency = 2

    def __init__(self, path: Path, precision: str, max_batch: int) -> None:
        super().__init__(path, precision, max_batch)
        reason = tensorrt_unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
        import tensorrt as trt

        self._runtime = trt.Runtime(trt_logger())
        self._engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self._engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {path} (built by another TensorRT version?)")
        profile_max = self._engine.get_tensor_profile_shape("images", 0)[2][0]
        self.max_batch = min(max_batch, int(profile_max))
        self._slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(self.concurrency):
            self._slots.put(_Slot(self._engine, self.max_batch))

    def _infer_impl(self, images: np.ndarray) -> Outputs:
        slot = self._slots.get()
        try:
            return slot.run(images)
        finally:
            self._slots.put(slot)

    def close(self) -> None:
        while not self._slots.empty():
            self._slots.get().free()
