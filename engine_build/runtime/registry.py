"""Backends by name: which runtimes are usable here, and opening a file on one of them.

Each entry names the module and class of a backend and a check that says why it is
not usable; modules are imported only when a backend of that kind is opened, so
``--help`` and CPU-only use never import TensorRT or CUDA.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendUnavailable, ConfigError
from .base import Backend


def _installed(module: str, what: str) -> Callable[[], str | None]:
    def reason() -> str | None:
        return None if importlib.util.find_spec(module) else f"{what} is not installed (pip install {module})"
    return reason


def _tensorrt_reason() -> str | None:
    from .tensorrt_support import tensorrt_unavailable_reason
    return tensorrt_unavailable_reason()


@dataclass(frozen=True)
class Entry:
    module: str                                # relative to this package
    cls: str
    unavailable: Callable[[], str | None]      # None when usable here, else why not
    options: tuple[str, ...] = ()               # open_backend keywords this backend takes


BACKENDS: dict[str, Entry] = {
    "tensorrt": Entry(".tensorrt_backend", "TensorRtBackend", _tensorrt_reason, ("streams",)),
    "openvino": Entry(".openvino_backend", "OpenVinoBackend", _installed("openvino", "OpenVINO"),
                      ("exact", "threads", "streams", "latency_lane")),
    "onnxruntime": Entry(".onnxruntime_backend", "OnnxRuntimeBackend", _installed("onnxruntime", "ONNX Runtime"),
                         ("threads", "streams")),
}


def available_backends() -> dict[str, str | None]:
    """Each backend name -> None when usable here, else the reason it is not."""
    return {name: entry.unavailable() for name, entry in BACKENDS.items()}


def open_backend(kind: str, path: Path, precision: str, max_batch: int = 32, exact: bool = False,
                 threads: int | None = None, streams: int = 1, latency_lane: bool = True) -> Backend:
    """Open ``path`` on runtime ``kind``.

    ``exact`` makes runtimes that would silently lower precision (OpenVINO's bf16 on
    CPUs that have it) compute in the file's own precision. ``streams`` is how many
    ``infer`` calls may run at once, each with its share of the CPU threads (``threads``
    in all, else every usable core; a CPU runtime runs at most one stream per thread, and says in
    ``streams_note`` why it runs fewer than asked) or its own TensorRT execution context: 1 (one call at
    a time, on every core) suits a single caller; 0 lets the runtime choose for this machine.
    ``latency_lane`` (OpenVINO, with several streams): a small batch that finds every stream idle runs on
    all the inference threads at once.
    """
    if streams < 0:
        raise ConfigError(f"streams must be 0 (the runtime chooses) or more, not {streams}")
    entry = BACKENDS.get(kind)
    if entry is None:
        raise BackendUnavailable(f"unknown backend '{kind}' (choose from {', '.join(BACKENDS)})")
    reason = entry.unavailable()
    if reason:
        raise BackendUnavailable(reason)
    if not Path(path).exists():
        raise ConfigError(f"{path} does not exist")
    cls = getattr(importlib.import_module(entry.module, __package__), entry.cls)
    options = {k: v for k, v in (("exact", exact), ("threads", threads), ("streams", streams),
                                 ("latency_lane", latency_lane)) if k in entry.options}
    return cls(path, precision, max_batch, **options)
