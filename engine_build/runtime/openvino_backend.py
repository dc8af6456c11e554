"""OpenVINO on CPU: reads the artifact's ONNX files directly.

On CPUs with bf16 support OpenVINO computes FP32 (and FP16) files in bf16 unless
told otherwise; ``compute_precision`` reports what it actually chose and
``exact=True`` pins it to FP32.

``streams=1`` runs one request on every core (OpenVINO's LATENCY hint: the fastest
single call); more streams (THROUGHPUT hint, ``0`` lets OpenVINO choose for this CPU:
on 2 cores two one-thread requests, on larger CPUs fewer streams of several threads)
split the cores between requests that callers run at once, each on fewer threads. Under
load that is cheaper per image: a one-thread request never waits for a sibling thread
that another thread of the process (a decoder) has pre-empted.

Fewer threads than cores are left unpinned (see :func:`leave_unpinned`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from .base import INPUT_SHAPE, Backend, Outputs, Slots
from .cpu import usable_cores


def leave_unpinned(threads: int | None, cores: int) -> bool:
    """Whether to turn OpenVINO's CPU pinning off for ``threads`` inference threads (None or 0: the
    runtime's default, every core) in a process that may use ``cores`` CPUs. OpenVINO would pin a
    partial set to the lowest-numbered cores, the same ones in every process on the host: two
    ``--processes`` children of one thread each shared one core of two and drained a backlog at
    242 img/s; unpinned, the OS placed them and they made 370, as one process does (pinning or
    not made no difference to one process that uses every core: 373 against 372 img/s)."""
    return threads is not None and 0 < threads < cores


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, path: Path, precision: str, max_batch: int, exact: bool = False,
                 threads: int | None = None, streams: int = 1) -> None:
        super().__init__(path, precision, max_batch)
        import openvino as ov

        core = ov.Core()
        config: dict = {"PERFORMANCE_HINT": "LATENCY"} if streams == 1 else {"PERFORMANCE_HINT": "THROUGHPUT"}
        if streams > 1:
            config["NUM_STREAMS"] = streams
        if exact:
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if leave_unpinned(threads, usable_cores()):
            config["ENABLE_CPU_PINNING"] = False
        try:
            self._compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except RuntimeError as exc:
            raise ModelFormatError(f"OpenVINO cannot load {path}: {str(exc).splitlines()[0]}") from exc
        hint = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        lowered = {"<Type: 'bfloat16'>": "bf16", "bf16": "bf16", "<Type: 'float16'>": "fp16", "f16": "fp16"}
        compute = lowered.get(hint, "fp32")
        if precision == "int8":   # quantized layers run in INT8, the rest in the hinted precision
            compute = "int8" if compute == "fp32" else f"int8+{compute}"
        self.compute_precision = compute
        self.pinned = bool(self._compiled.get_property("ENABLE_CPU_PINNING"))
        self.concurrency = max(1, int(self._compiled.get_property("NUM_STREAMS")))
        self._requests = Slots(self._compiled.create_infer_request() for _ in range(self.concurrency))
        try:
            self._outputs = [self._compiled.output("probs"), self._compiled.output("logits")]
            # One call before any caller may run two at once: the first ``tensor.data`` of a process
            # initialises a C++ static that waits for the GIL inside its guard, and two threads making
            # that first call together deadlock (seen with openvino 2026.4: both infer threads stuck
            # at start-up, one in __cxa_guard_acquire, one waiting for the GIL).
            self._infer_impl(np.zeros((1, *INPUT_SHAPE), np.uint8))
        except RuntimeError as exc:
            raise ModelFormatError(f"OpenVINO cannot run {path}: {str(exc).splitlines()[0]}") from exc

    def describe(self) -> str:
        return super().describe() + ("" if self.pinned else ", threads unpinned")

    def _infer_impl(self, images: np.ndarray) -> Outputs:
        with self._requests.use() as request:
            # a synchronous call: reading the caller's array in place is safe and spares a copy
            result = request.infer({"images": images}, share_inputs=True)
            return Outputs(np.array(result[self._outputs[0]], dtype=np.float32),
                           np.array(result[self._outputs[1]], dtype=np.float32))

    def _close_impl(self) -> None:
        self._requests.close()     # callers still waiting for a stream get BackendClosed
