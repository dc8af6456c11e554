"""Inference backends behind one interface (see :mod:`.base`).

Heavy runtimes are imported only when a backend of that kind is opened, so
``--help`` and CPU-only use never need TensorRT or CUDA.
"""
from .base import Backend, Outputs, available_backends, open_backend

__all__ = ["Backend", "Outputs", "available_backends", "open_backend"]
