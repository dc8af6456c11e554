"""What TensorRT needs here: the one logger, and why the TensorRT path is not usable.

TensorRT keeps a single logger pointer per process, so every Builder and Runtime
gets :func:`trt_logger`'s one instance. The checks run from cheapest to dearest and
end in one line saying what to install: the ``gpu`` extra (TensorRT and cuda-python
for CUDA 13, an R580+ driver) or ``gpu-cu12`` (for a CUDA 12 driver).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import threading
from typing import Any

from ..errors import SentimentError

INSTALL_HINT = ("pip install 'sentiment-stream[gpu]' (CUDA 13 driver, R580+) or 'sentiment-stream[gpu-cu12]' "
                "(CUDA 12 driver); tensorrt wheels come from NVIDIA's index, https://pypi.nvidia.com")
_logger: tuple[Any, Any] | None = None     # (the tensorrt module, its one Logger)
_logger_lock = threading.Lock()


def trt_logger() -> Any:
    """The process's one ``tensorrt.Logger`` (warnings and errors), made on first use: one per
    ``tensorrt`` module, so a test double installed later gets a Logger of its own."""
    global _logger
    import tensorrt as trt
    with _logger_lock:
        if _logger is None or _logger[0] is not trt:
            _logger = (trt, trt.Logger(trt.Logger.WARNING))
        return _logger[1]


def _major(distributions: tuple[str, ...]) -> int | None:
    """Major version of the first of these installed distributions, None if none is."""
    for name in distributions:
        try:
            return int(importlib.metadata.version(name).split(".")[0])
        except (importlib.metadata.PackageNotFoundError, ValueError):
            continue
    return None


def _bindings_major() -> int | None:
    """Major version of the cuda-python bindings this process imports (``cuda.bindings.__version__``),
    else of the installed cuda-bindings or cuda-python distribution."""
    try:
        import cuda.bindings
        return int(str(cuda.bindings.__version__).split(".")[0])
    except (ImportError, AttributeError, ValueError):
        return _major(("cuda-bindings", "cuda-python"))


def needed_cuda_major() -> int | None:
    """The CUDA major version the installed cuda-python and TensorRT wheels are built for."""
    bindings = _bindings_major()
    if _major(("tensorrt-cu13", "tensorrt-cu13-libs")) is not None:
        return 13
    if bindings is not None and bindings >= 13:
        return 13
    if _major(("tensorrt-cu12", "tensorrt-cu12-libs")) is not None or bindings == 12:
        return 12
    return None


def driver_mismatch_reason(driver: int) -> str | None:
    """One line when the driver (CUDA version code, e.g. 12080) is older than the wheels need."""
    from .cuda_memory import cuda_version
    needed = needed_cuda_major()
    if needed is None or driver == 0 or driver // 1000 >= needed:
        return None
    fits = "gpu-cu12" if driver // 1000 == 12 else None
    advice = (f"pip install 'sentiment-stream[{fits}]' (TensorRT for CUDA 12, cuda-python >= 12.9.1, < 13)"
              if fits else "update the NVIDIA driver (R580+ for CUDA 13)")
    return (f"the NVIDIA driver supports CUDA {cuda_version(driver)}, the installed TensorRT/cuda-python "
            f"need CUDA {needed}: {advice}")


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA GPU are usable here, else one line saying what is missing."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"TensorRT is not installed: {INSTALL_HINT}"
    if importlib.util.find_spec("cuda") is None:
        return f"cuda-python is not installed: {INSTALL_HINT}"
    from .cuda_memory import check, cudart, driver_cuda_version
    try:
        driver = driver_cuda_version()
        mismatch = driver_mismatch_reason(driver)
        if mismatch:
            return mismatch
        if driver == 0:
            return "no NVIDIA driver found (cudaDriverGetVersion reports none)"
        count = check(cudart().cudaGetDeviceCount(), "cudaGetDeviceCount")
    except (SentimentError, ImportError, OSError, RuntimeError) as exc:  # broken install, no device
        return f"no usable CUDA GPU ({exc})"
    return None if count > 0 else "no CUDA GPU found"
