"""ONNX Runtime on CPU: the portable path and the FP32 reference.

Each of ``streams`` callers runs on its own session with its share of the threads
(the sessions of one process would otherwise share one intra-op pool); ``0`` means one
stream per core, at most four. There are never more streams than threads (``threads``,
else every usable core): the threads are the inference's in all, and each session needs
one. Every session holds its own copy of the weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import onnxruntime_errors
from .base import Backend, Outputs, Slots, cpu_streams, plural, split_threads
from .cpu import usable_cores


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: Path, precision: str, max_batch: int, threads: int | None = None,
                 streams: int = 1) -> None:
        import onnxruntime as ort

        super().__init__(path, precision, max_batch)
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4   # a failed run is said once, by the exception it raises
        cores = usable_cores()
        total = threads or cores
        self.concurrency = cpu_streams(streams, min(cores, 4), total)
        if streams > self.concurrency:
            self.streams_note = (f"asked {streams}; ONNX Runtime gives each stream a thread of its own, and "
                                 f"{plural(total, 'thread')} allow {self.concurrency}")
        shares = split_threads(total, self.concurrency)
        if not (threads or self.concurrency > 1):   # one session on ONNX Runtime's own count, which it does not say
            shares = [0]
        self.threads = sum(shares)
        self._sessions = Slots(self._session(path, share) for share in shares)

    @staticmethod
    def _session(path: Path, threads: int) -> Any:
        """A session on ``threads`` intra-op threads (0: ONNX Runtime's default, every core)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        with onnxruntime_errors(f"ONNX Runtime cannot load {path}"):
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _infer_impl(self, images: np.ndarray) -> Outputs:
        with self._sessions.use() as session, onnxruntime_errors(f"ONNX Runtime cannot run {self.path.name}"):
            probs, logits = session.run(["probs", "logits"], {"images": images}, self._run_options)
        return Outputs(probs, logits)

    def _close_impl(self) -> None:
        self._sessions.close()     # callers still waiting for a stream get BackendClosed
