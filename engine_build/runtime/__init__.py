"""Inference backends behind one interface (:mod:`.base`), found by name (:mod:`.registry`).

Heavy runtimes are imported only when a backend of that kind is opened, so
``--help`` and CPU-only use never need TensorRT or CUDA. :mod:`.identity` says which
GPU, TensorRT version and batch range an engine was built for, for the build and
the service alike.
"""
from .base import Backend, Outputs
from .registry import available_backends, open_backend

__all__ = ["Backend", "Outputs", "available_backends", "open_backend"]
