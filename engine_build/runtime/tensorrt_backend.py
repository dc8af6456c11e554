"""TensorRT: run ``engine.plan`` with pinned host buffers, device buffers and a CUDA stream.

Each of the backend's two slots owns an execution context, a stream and its buffers;
two threads calling :meth:`infer` at once overlap one slot's copies with the other's
compute. Inputs and outputs are bound by name (the engine's I/O order is its own),
and buffers are sized from the engine's tensor shapes and types at its profile's
largest batch. Written against the TensorRT 10 and 11 Python APIs (tensor-address
I/O, ``execute_async_v3``) and cuda-python 12.9+/13.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, BackendUnavailable, InferenceError
from .base import INPUT_SHAPE, Backend, Outputs, Slots
from .cuda_memory import PinnedArray, PinnedBuffer, check, cudart, native_handle
from .tensorrt_support import tensorrt_unavailable_reason, trt_logger

log = logging.getLogger(__name__)
INPUT, OUTPUTS = "images", ("probs", "logits")


class _Slot:
    """One execution context with its stream and buffers; used by one thread at a time."""

    def __init__(self, engine: Any, dtypes: dict[str, np.dtype], shapes: dict[str, tuple[int, ...]],
                 pinned: Callable[[np.ndarray], bool]) -> None:
        """``pinned``: whether an input array is page-locked memory the backend handed out (copied to
        the device as it is, not through this slot's host buffer)."""
        self.pinned = pinned
        self.context = engine.create_execution_context()
        if self.context is None:
            raise InferenceError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = check(cudart().cudaStreamCreate(), "cudaStreamCreate")
        self.buffers: dict[str, PinnedBuffer] = {}
        try:
            for name, shape in shapes.items():
                self.buffers[name] = PinnedBuffer(shape, dtypes[name])
                if not self.context.set_tensor_address(name, int(self.buffers[name].device)):
                    raise InferenceError(f"TensorRT refused the address of tensor '{name}'")
        except BaseException:
            self.free()
            raise

    def run(self, images: np.ndarray) -> Outputs:
        n = len(images)
        context, stream = self.context, self.stream
        source = self.buffers[INPUT]
        if self.pinned(images):      # the batch was stacked into page-locked memory: no second copy
            address = images.__array_interface__["data"][0]
        else:
            source.host[:n] = images
            address = None
        if not context.set_input_shape(INPUT, (n,) + INPUT_SHAPE):
            raise InferenceError(f"TensorRT refused input shape {(n,) + INPUT_SHAPE}")
        source.to_device(n * source.host[0].nbytes, stream, address)
        if not context.execute_async_v3(native_handle(stream)):
            raise InferenceError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        sizes = {}
        for name in OUTPUTS:
            shape = tuple(context.get_tensor_shape(name))
            sizes[name] = int(np.prod(shape))
            self.buffers[name].to_host(sizes[name] * self.buffers[name].dtype.itemsize, stream)
        check(cudart().cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        probs, logits = (self.buffers[name].host.reshape(-1)[:sizes[name]].reshape(n, -1).astype(np.float32)
                         for name in OUTPUTS)
        return Outputs(probs, logits)

    def free(self) -> None:
        """Free buffers and stream, then drop the context (before its engine goes)."""
        errors = []
        for buffer in self.buffers.values():
            try:
                buffer.free()
            except InferenceError as exc:
                errors.append(exc)
        self.buffers = {}
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                check(cudart().cudaStreamDestroy(stream), "cudaStreamDestroy")
            except InferenceError as exc:
                errors.append(exc)
        self.context = None
        if errors:
            raise errors[0]


def _io_tensors(engine: Any, path: Path) -> tuple[dict[str, np.dtype], dict[str, tuple[int, ...]], int]:
    """The engine's I/O by name: numpy dtypes, buffer shapes at the profile's largest batch, that batch."""
    import tensorrt as trt

    modes = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        modes[name] = engine.get_tensor_mode(name)
    missing = [n for n in (INPUT, *OUTPUTS) if n not in modes]
    if missing or modes[INPUT] != trt.TensorIOMode.INPUT or any(modes[n] != trt.TensorIOMode.OUTPUT for n in OUTPUTS):
        raise ArtifactError(f"{path} does not have this project's I/O (input '{INPUT}', outputs "
                            f"{', '.join(OUTPUTS)}); it has {', '.join(f'{n} ({m})' for n, m in modes.items())}")
    profile_max = int(engine.get_tensor_profile_shape(INPUT, 0)[2][0])
    dtypes, shapes = {}, {}
    for name in (INPUT, *OUTPUTS):
        dtypes[name] = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        dims = [int(d) for d in engine.get_tensor_shape(name)]
        shapes[name] = tuple(profile_max if d < 0 else d for d in dims)
    if dtypes[INPUT] != np.uint8 or shapes[INPUT][1:] != INPUT_SHAPE:
        raise ArtifactError(f"{path}: input '{INPUT}' is {dtypes[INPUT]} {list(shapes[INPUT])}, "
                            f"expected uint8 [N,{','.join(map(str, INPUT_SHAPE))}]")
    return dtypes, shapes, profile_max


class TensorRtBackend(Backend):
    name = "tensorrt"
    on_cpu = False

    def __init__(self, path: Path, precision: str, max_batch: int, streams: int = 1) -> None:
        super().__init__(path, precision, max_batch)
        self.concurrency = streams or 2    # auto: one slot copies while the other computes
        reason = tensorrt_unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
        import tensorrt as trt

        self._runtime = trt.Runtime(trt_logger())
        self._engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self._engine is None:
            raise ArtifactError(f"TensorRT {trt.__version__} could not deserialize {path} "
                                "(built by another TensorRT version or for another GPU?)")
        dtypes, shapes, profile_max = _io_tensors(self._engine, Path(path))
        self.max_batch = min(max_batch, profile_max)
        self._inputs: list[PinnedArray] = []          # handed out by input_buffer, freed on close
        self._inputs_lock = threading.Lock()
        self._slots = Slots((_Slot(self._engine, dtypes, shapes, self._pinned) for _ in range(self.concurrency)),
                            _Slot.free)

    def input_buffer(self, rows: int) -> np.ndarray:
        """Page-locked memory for ``rows`` images, copied to the device as it is (valid until close)."""
        buffer = PinnedArray((rows, *INPUT_SHAPE), np.uint8)
        with self._inputs_lock:
            self._inputs.append(buffer)
        assert buffer.array is not None
        return buffer.array

    def _pinned(self, images: np.ndarray) -> bool:
        with self._inputs_lock:
            return any(buffer.holds(images) for buffer in self._inputs)

    def _infer_impl(self, images: np.ndarray) -> Outputs:
        with self._slots.use() as slot:
            return slot.run(images)

    def _close_impl(self, timeout: float = 30.0) -> None:
        """Free idle slots now and running ones as they come back (waiting up to ``timeout`` s);
        threads waiting for a slot get BackendClosed."""
        running = self._slots.close(timeout)
        if running:
            log.warning("%d TensorRT slot(s) still running after %.0f s; their buffers are left to the process",
                        running, timeout)
            return      # a running copy may still read the input buffers
        with self._inputs_lock:
            inputs, self._inputs = self._inputs, []
        errors = []
        for buffer in inputs:   # every one, whatever one of them raises
            try:
                buffer.free()
            except InferenceError as exc:
                errors.append(exc)
        self._engine = None
        self._runtime = None
        if errors:
            raise errors[0]
