"""The backend interface shared by validation, evaluation, the service and benchmarks.

A backend runs one artifact file (``model.onnx``, ``model.fp16.onnx``,
``model.int8.onnx`` or ``engine.plan``): uint8 BGR [N,256,256,3] in, ``probs`` and
``logits`` float32 [N,2] out. :meth:`Backend.infer` checks the input and splits
batches above ``max_batch``; subclasses implement :meth:`Backend._infer_impl` (and
:meth:`Backend._close_impl` when they hold resources). ``concurrency`` says how many
threads may call ``infer`` at once with benefit: the number of streams resolved at open; on CPU at
most one per inference thread, and where that is fewer than asked, ``streams_note`` says why.
After :meth:`Backend.close`, ``infer`` raises :class:`~engine_build.errors.BackendClosed`.

The concrete backends live in their own modules and are found by name through
:mod:`.registry`; this module imports none of them.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from ..errors import BackendClosed
from ..preprocess import IMAGE_SIZE

INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
# The least time a lone image's call on one stream must take for a latency lane (see :class:`Slots`) to
# pay, as measured when the model opens. On a 2-core Xeon, in the service at 0.2 of its budget: FP32
# computed exactly (25.1-26.6 ms measured at open; 24.6 on a stream against 12.6 on the lane in a
# steady loop) answered sooner with a lane, the INT8 file (6.4-7.2 ms at open; 4.7 against 2.1) later,
# its lane's threads waking for every short call and taking the cores from decoding
# (docs/performance.md, "fifth to eighth runs").
LANE_WORTH_MS = 10.0
H = TypeVar("H")


class Slots(Generic[H]):
    """One runtime handle per stream; each call borrows one, and callers beyond the streams wait.

    ``lone``: a handle whose calls use every inference thread (OpenVINO's LATENCY hint), lent to a
    call that says it is small when no stream is busy and no one is waiting; while it is out, other
    callers wait for it (it uses their threads), and a caller that had to wait takes a stream, so
    calls that overlap spread over the streams instead of queueing for the lone handle.
    ``lone_calls`` counts the calls it served and ``waiting`` the callers waiting now (both for tests).

    :meth:`close` frees idle handles at once and borrowed ones as they come back (``free``, for
    runtimes whose handles hold memory of their own); a caller still waiting then gets
    :class:`~engine_build.errors.BackendClosed`. Handles may come from a generator: if making one
    fails, those made before it are freed.
    """

    def __init__(self, handles: Iterable[H], free: Callable[[H], None] | None = None,
                 lone: H | None = None) -> None:
        self._free = free or (lambda handle: None)
        self._cond = threading.Condition()
        self._idle: list[H] = []
        self._lone = lone
        self._lone_out = False
        self._busy = 0
        self._waiting = 0
        self._closed = False
        self.lone_calls = 0
        try:
            for handle in handles:
                self._idle.append(handle)
        except BaseException:
            self._free_idle()
            raise

    @property
    def has_lone(self) -> bool:
        return self._lone is not None

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._waiting

    @contextmanager
    def use(self, small: bool = False) -> Iterator[H]:
        """Borrow a handle: the lone one when ``small`` and no one else is running or waiting, else a
        stream's."""
        with self._cond:
            waited = False
            self._waiting += 1
            try:
                while (self._lone_out or not self._idle) and not self._closed:
                    waited = True
                    self._cond.wait()
            finally:
                self._waiting -= 1
            if self._closed:
                raise BackendClosed("the backend was closed while this call waited for a stream")
            alone = small and not waited and self._busy == 0 and self._waiting == 0
            lone = self._lone if alone else None
            self._busy += 1
            if lone is not None:
                self._lone_out = True
                self.lone_calls += 1
                handle = lone
            else:
                handle = self._idle.pop()
        try:
            yield handle
        finally:
            with self._cond:
                self._busy -= 1
                try:
                    if lone is not None:
                        self._lone_out = False
                        if self._closed:
                            self._free_lone()
                    elif self._closed:
                        self._free(handle)      # closed while it ran: free it now that it is back
                    else:
                        self._idle.append(handle)
                finally:                        # a close waiting for this handle wakes even if freeing failed
                    self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> int:
        """Free every handle, waiting up to ``timeout`` s for borrowed ones; returns how many are
        still out (their memory is left to the process)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._free_idle()
            self._cond.wait_for(lambda: self._busy == 0, timeout)
            return self._busy

    def _free_lone(self) -> None:
        lone, self._lone = self._lone, None
        if lone is not None:
            self._free(lone)

    def _free_idle(self) -> None:
        """Free every idle handle (the lone one too when it is not out), even past one that fails to free;
        then raise the first failure."""
        handles, self._idle = self._idle, []
        if self._lone is not None and not self._lone_out:
            handles.append(self._lone)
            self._lone = None
        failures = []
        for handle in handles:
            try:
                self._free(handle)
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def cpu_streams(asked: int, chosen: int, threads: int) -> int:
    """How many streams a CPU runtime runs: those ``asked`` (0: its own choice, ``chosen``), at most one
    per inference thread (``threads`` in all): a stream with no thread of its own would add threads
    beyond those granted to inference."""
    return max(1, min(asked or chosen, threads))


def split_threads(total: int, streams: int) -> list[int]:
    """``total`` threads shared out between ``streams`` as evenly as can be, at least one each."""
    return [max(1, total // streams + (i < total % streams)) for i in range(streams)]


@dataclass
class Outputs:
    """``probs`` and ``logits``, float32 [N, 2] (index 0 negative, 1 positive)."""

    probs: np.ndarray
    logits: np.ndarray

    @staticmethod
    def joined(parts: list[Outputs]) -> Outputs:
        """The outputs of consecutive parts of one input, in order, as one."""
        if len(parts) == 1:
            return parts[0]
        return Outputs(np.concatenate([p.probs for p in parts]), np.concatenate([p.logits for p in parts]))


class Backend(ABC):
    name: str = "?"
    concurrency: int = 1
    on_cpu: bool = True      # inference competes with decoding for the CPU's cores
    lane_choice: str = ""    # whether a latency lane runs and what that rests on, where the runtime has one
    streams_note: str = ""   # where ``concurrency`` is fewer than the streams asked: what was asked and why
    threads: int = 0         # the CPU inference threads the runtime runs, as it says (0: not a CPU runtime)

    def __init__(self, path: Path, precision: str, max_batch: int) -> None:
        self.path = Path(path)
        self.precision = precision          # precision of the file: fp32/fp16/int8
        self.max_batch = max_batch
        self.compute_precision = precision  # what the runtime actually computes in
        self.closed = False

    def infer(self, images: np.ndarray) -> Outputs:
        """Run uint8 BGR [N,256,256,3]; batches above ``max_batch`` run in parts, in order.

        ``images`` is read only during the call and the outputs are the caller's own: the service
        refills one input array per thread, batch after batch."""
        if self.closed:
            raise BackendClosed(f"{self.name} backend for {self.path.name} is closed")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != INPUT_SHAPE:
            raise ValueError(f"expected uint8 [N,{IMAGE_SIZE},{IMAGE_SIZE},3], got {images.dtype} {images.shape}")
        if len(images) == 0:
            empty = np.zeros((0, 2), np.float32)
            return Outputs(empty, empty.copy())
        return Outputs.joined([self._infer_impl(np.ascontiguousarray(images[i:i + self.max_batch]))
                               for i in range(0, len(images), self.max_batch)])

    def input_buffer(self, rows: int) -> np.ndarray:
        """An array for ``rows`` images that a caller fills and hands to :meth:`infer` (a leading slice
        of it), batch after batch: the one copy of each image on its way from the decoder to the model.
        Plain memory here; runtimes that move the batch elsewhere give memory they move it from directly
        (TensorRT: page-locked memory, copied to the device as it is)."""
        return np.empty((rows, *INPUT_SHAPE), np.uint8)

    @abstractmethod
    def _infer_impl(self, images: np.ndarray) -> Outputs: ...

    def close(self) -> None:
        """Release the runtime's resources; later ``infer`` calls raise BackendClosed."""
        if not self.closed:
            self.closed = True
            self._close_impl()

    def _close_impl(self) -> None:  # noqa: B027 - optional hook: most runtimes hold nothing to free
        """Free what the runtime holds; called once, by :meth:`close`."""

    def describe(self) -> str:
        return f"{self.name} {self.precision} file, computing in {self.compute_precision}"

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

