"""CUDA through cuda-python's runtime API: pinned host buffers, device buffers, streams, the GPU.

Every call returns cuda-python's ``(err, *values)`` tuple; :func:`check` turns an error
into :class:`~engine_build.errors.CudaError` naming the call, so no CUDA failure leaves
this module as a bare tuple or a foreign exception.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, CudaError


def cudart() -> ModuleType:
    """cuda-python's runtime module (``cuda.bindings.runtime`` from 12.6, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
            return runtime
        except ImportError as exc:
            raise BackendUnavailable("cuda-python is not installed: pip install 'sentiment-stream[gpu]' "
                                     "(or [gpu-cu12] for a CUDA 12 driver)") from exc


def error_name(err: Any) -> str:
    """CUDA's name for an error code, e.g. ``cudaErrorMemoryAllocation``."""
    result = cudart().cudaGetErrorName(err)
    name = result[1] if isinstance(result, tuple) else result
    return name.decode() if isinstance(name, bytes) else str(name)


def check(result: tuple, call: str = "CUDA call") -> Any:
    """Unwrap a cuda-python ``(err, *values)`` tuple: the value(s), or CudaError on any error."""
    rt = cudart()
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        raise CudaError(call, int(err), error_name(err))
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def native_handle(obj: Any) -> int:
    """The address of a cuda-python object (a stream) as an int, for TensorRT.

    ``cuda.bindings.utils.get_cuda_native_handle`` where it exists (cuda-bindings 12.9.1+, which
    added ``cuda.bindings.utils`` and deprecated ``int(obj)``); ``int(obj)`` on older releases.
    """
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


class PinnedArray:
    """A page-locked host array alone (no device buffer): memory a CUDA copy reads asynchronously."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.ptr = int(check(cudart().cudaMallocHost(self.nbytes), "cudaMallocHost"))
        buffer = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array: np.ndarray | None = np.frombuffer(memoryview(buffer), dtype=self.dtype).reshape(shape)

    def holds(self, array: np.ndarray) -> bool:
        """Whether ``array`` is a C-contiguous run of this memory."""
        start = array.__array_interface__["data"][0]
        return array.flags.c_contiguous and self.ptr <= start and start + array.nbytes <= self.ptr + self.nbytes

    def free(self) -> None:
        ptr, self.ptr, self.array = self.ptr, 0, None
        if ptr:
            check(cudart().cudaFreeHost(ptr), "cudaFreeHost")


class PinnedBuffer:
    """A page-locked host array plus a device buffer of the same size."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        rt = cudart()
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.host_ptr = check(rt.cudaMallocHost(self.nbytes), "cudaMallocHost")
        try:
            self.device = check(rt.cudaMalloc(self.nbytes), "cudaMalloc")
        except CudaError:
            rt.cudaFreeHost(self.host_ptr)
            raise
        buffer = (ctypes.c_byte * self.nbytes).from_address(int(self.host_ptr))
        self._host: np.ndarray | None = np.frombuffer(memoryview(buffer), dtype=self.dtype).reshape(shape)

    @property
    def host(self) -> np.ndarray:
        """The page-locked host array (a view of the pinned memory; gone after :meth:`free`)."""
        if self._host is None:
            raise RuntimeError("PinnedBuffer.host used after free()")
        return self._host

    def to_device(self, nbytes: int, stream: Any, source: int | None = None) -> None:
        """Copy ``nbytes`` to the device from the host array, or from ``source`` (another page-locked
        address: a :class:`PinnedArray`'s)."""
        rt = cudart()
        check(rt.cudaMemcpyAsync(self.device, self.host_ptr if source is None else source, nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync to device")

    def to_host(self, nbytes: int, stream: Any) -> None:
        rt = cudart()
        check(rt.cudaMemcpyAsync(self.host_ptr, self.device, nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync to host")

    def free(self) -> None:
        """Free both buffers (once); the host array must not be used afterwards."""
        rt = cudart()
        device, host = self.device, self.host_ptr
        self.device = self.host_ptr = 0
        self._host = None
        if device:
            check(rt.cudaFree(device), "cudaFree")
        if host:
            check(rt.cudaFreeHost(host), "cudaFreeHost")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str   # "major.minor"


def gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of a GPU, for the engine identity."""
    props = check(cudart().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.split("\x00", 1)[0], f"{props.major}.{props.minor}")


def cuda_version(code: int) -> str:
    """CUDA's integer version (12080) as text (12.8)."""
    return f"{code // 1000}.{code % 1000 // 10}"


def driver_cuda_version() -> int:
    """The newest CUDA version the installed driver supports (e.g. 12080), 0 when there is no driver."""
    err, version = cudart().cudaDriverGetVersion()
    return int(version) if err == cudart().cudaError_t.cudaSuccess else 0
