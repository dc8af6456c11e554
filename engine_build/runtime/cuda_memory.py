"""Pinned host buffers, device buffers and streams through cuda-python's runtime API."""
from __future__ import annotations

import ctypes

import numpy as np

from ..errors import BackendUnavailable


def cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime`` from 12.6, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
            return runtime
        except ImportError as exc:
            raise BackendUnavailable("cuda-python is not installed (pip install 'cuda-python>=12')") from exc


def check(result):
    """Unwrap a cuda-python ``(err, *values)`` tuple, raising on any error."""
    rt = cudart()
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else values


class PinnedBuffer:
    """A page-locked host array plus a device buffer of the same size."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        rt = cudart()
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.host_ptr = check(rt.cudaMallocHost(self.nbytes))
        buffer = (ctypes.c_byte * self.nbytes).from_address(int(self.host_ptr))
        self.host = np.frombuffer(buffer, dtype=self.dtype).reshape(shape)
        self.device = check(rt.cudaMalloc(self.nbytes))

    def to_device(self, nbytes: int, stream) -> None:
        rt = cudart()
        check(rt.cudaMemcpyAsync(self.device, self.host_ptr, nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def to_host(self, nbytes: int, stream) -> None:
        rt = cudart()
        check(rt.cudaMemcpyAsync(self.host_ptr, self.device, nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def free(self) -> None:
        rt = cudart()
        if self.device:
            rt.cudaFree(self.device)
            self.device = 0
        if self.host_ptr:
            rt.cudaFreeHost(self.host_ptr)
            self.host_ptr = 0


def gpu_identity(device: int = 0) -> dict:
    """Name and compute capability of a GPU, for the manifest and staleness checks."""
    rt = cudart()
    props = check(rt.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
