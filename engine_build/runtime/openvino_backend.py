"""OpenVINO on CPU: reads the artifact's ONNX files directly.

On CPUs with bf16 support OpenVINO computes FP32 (and FP16) files in bf16 unless
told otherwise; ``compute_precision`` reports what it actually chose and
``exact=True`` pins it to FP32.

``streams=1`` runs one request on every core (OpenVINO's LATENCY hint: the fastest
single call); more streams (THROUGHPUT hint, ``0`` lets OpenVINO choose for this CPU:
on 2 cores two one-thread requests, on larger CPUs fewer streams of several threads)
split the cores between requests that callers run at once, each on fewer threads. Under
load that is cheaper per image: a one-thread request never waits for a sibling thread
that another thread of the process (a decoder) has pre-empted. OpenVINO grants at most one
stream per inference thread; fewer than asked are said in ``streams_note``.

With several streams, ``latency_lane`` may also compile the model with the LATENCY hint and run on
it a batch of at most a quarter of ``max_batch`` that finds every stream idle and no caller
waiting, on all the inference threads at once (:class:`.base.Slots`). Whether it does is measured
at open: a lone image's call on one stream must take at least ``lane_worth_ms`` (default
:data:`.base.LANE_WORTH_MS`, where the measurements behind it are). The second compile holds its own
copy of the weights in the runtime's layout; a lane that fails to compile is left out, with a warning.

Fewer threads than cores are left unpinned (see :func:`leave_unpinned`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFormatError
from .base import INPUT_SHAPE, LANE_WORTH_MS, Backend, Outputs, Slots, plural
from .cpu import usable_cores

log = logging.getLogger(__name__)


def leave_unpinned(threads: int | None, cores: int) -> bool:
    """Whether to turn OpenVINO's CPU pinning off for ``threads`` inference threads (None or 0: the
    runtime's default, every core) in a process that may use ``cores`` CPUs. OpenVINO would pin a
    partial set to the lowest-numbered cores, the same ones in every process on the host: two
    ``--processes`` children of one thread each shared one core of two and drained a backlog at
    242 img/s; unpinned, the OS placed them and they made 370, as one process does (pinning or
    not made no difference to one process that uses every core: 373 against 372 img/s)."""
    return threads is not None and 0 < threads < cores


def _first_call(request: Any, images: np.ndarray) -> None:
    """A request's first call, the way every later call runs (inputs shared, the output's data read)."""
    np.array(request.infer({"images": images}, share_inputs=True)["probs"])


def _timed_ms(request: Any, images: np.ndarray, calls: int = 5) -> float:
    """The shortest wall time of ``calls`` calls of ``request`` on ``images``, after an untimed first call:
    the least, not the median, so that other load on the machine while the model opens (a test suite's
    parallel workers made a 2-3 ms call read over 10 ms) does not pass for a slow model."""
    _first_call(request, images)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        request.infer({"images": images}, share_inputs=True)
        times.append(time.perf_counter() - started)
    return min(times) * 1000


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, path: Path, precision: str, max_batch: int, exact: bool = False,
                 threads: int | None = None, streams: int = 1, latency_lane: bool = True,
                 lane_worth_ms: float = LANE_WORTH_MS) -> None:
        super().__init__(path, precision, max_batch)
        import openvino as ov

        core = ov.Core()
        common: dict = {}
        if exact:
            common["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            common["INFERENCE_NUM_THREADS"] = threads
        if leave_unpinned(threads, usable_cores()):
            common["ENABLE_CPU_PINNING"] = False
        config = common | ({"PERFORMANCE_HINT": "LATENCY"} if streams == 1 else {"PERFORMANCE_HINT": "THROUGHPUT"})
        if streams > 1:
            config["NUM_STREAMS"] = streams
        try:
            model = core.read_model(str(path))
            self._compiled = core.compile_model(model, "CPU", config)
            for name in ("probs", "logits"):
                self._compiled.output(name)     # raises if the file lacks it
        except RuntimeError as exc:
            raise ModelFormatError(f"OpenVINO cannot load {path}: {str(exc).splitlines()[0]}") from exc
        self.concurrency = max(1, int(self._compiled.get_property("NUM_STREAMS")))
        self.threads = int(self._compiled.get_property("INFERENCE_NUM_THREADS"))   # what it runs, whatever asked
        if streams > self.concurrency:   # OpenVINO grants at most one stream per inference thread
            self.streams_note = (f"asked {streams}; OpenVINO allows {self.concurrency} with "
                                 f"{plural(self.threads, 'thread')}")
        self._small = max(1, max_batch // 4)   # the most a lone call may carry onto the latency lane
        requests = [self._compiled.create_infer_request() for _ in range(self.concurrency)]
        lone = None
        try:
            # Calls before any caller may run two at once: the first ``tensor.data`` of a process
            # initialises a C++ static that waits for the GIL inside its guard, and two threads making
            # that first call together deadlock (seen with openvino 2026.4: both infer threads stuck
            # at start-up, one in __cxa_guard_acquire, one waiting for the GIL).
            first = np.zeros((1, *INPUT_SHAPE), np.uint8)
            if self.concurrency > 1 and latency_lane:
                lone = self._open_lane(core, model, common | {"PERFORMANCE_HINT": "LATENCY"}, requests[0], first,
                                       lane_worth_ms)
            else:
                _first_call(requests[0], first)
                if self.concurrency > 1:
                    self.lane_choice = "no latency lane (--no-latency-lane)"
        except RuntimeError as exc:
            raise ModelFormatError(f"OpenVINO cannot run {path}: {str(exc).splitlines()[0]}") from exc
        hint = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        lowered = {"<Type: 'bfloat16'>": "bf16", "bf16": "bf16", "<Type: 'float16'>": "fp16", "f16": "fp16"}
        compute = lowered.get(hint, "fp32")
        if precision == "int8":   # quantized layers run in INT8, the rest in the hinted precision
            compute = "int8" if compute == "fp32" else f"int8+{compute}"
        self.compute_precision = compute
        self.pinned = bool(self._compiled.get_property("ENABLE_CPU_PINNING"))
        self._requests = Slots(requests, lone=lone)

    def _open_lane(self, core: Any, model: Any, config: dict, stream: Any, first: np.ndarray,
                   worth_ms: float) -> Any:
        """The latency lane's request where a lone image on ``stream`` takes ``worth_ms`` or more, else None;
        sets :attr:`lane_choice` to the choice and the time it rests on."""
        alone_ms = _timed_ms(stream, first)
        measured = f"a lone image: {alone_ms:.1f} ms on one stream"
        if alone_ms < worth_ms:
            self.lane_choice = f"no latency lane ({measured}, under {worth_ms:g} ms)"
            return None
        try:
            lone = core.compile_model(model, "CPU", config).create_infer_request()
            _first_call(lone, first)
        except RuntimeError as exc:   # the streams serve without it
            log.warning("the latency lane could not be compiled (%s); running without it", str(exc).splitlines()[0])
            self.lane_choice = f"no latency lane (it failed to compile; {measured})"
            return None
        self.lane_choice = f"lone batches of <= {self._small} on all inference threads ({measured})"
        return lone

    def describe(self) -> str:
        return super().describe() + (f", {self.lane_choice}" if self.lane_choice else "") + \
            ("" if self.pinned else ", threads unpinned")

    def _infer_impl(self, images: np.ndarray) -> Outputs:
        with self._requests.use(small=len(images) <= self._small) as request:
            # a synchronous call: reading the caller's array in place is safe and spares a copy
            result = request.infer({"images": images}, share_inputs=True)
            return Outputs(np.array(result["probs"], dtype=np.float32), np.array(result["logits"], dtype=np.float32))

    def _close_impl(self) -> None:
        self._requests.close()     # callers still waiting for a stream get BackendClosed
