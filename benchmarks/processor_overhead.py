"""The processor's own CPU per message: no Kafka, no model, no JPEG decoding.

    python benchmarks/processor_overhead.py [--messages 20000] [--runs 5]

Runs :class:`stream.pipeline.Processor` with the service's offset tracker, metrics, order keeping
and JSON encoder; the decoder returns one still image, the backend constant scores, and the sink
acknowledges each record on its own thread as a producer's IO thread would. Input is held to the
service's default backpressure (pause at ``--max-in-flight``, resume at half). What is left is the
work the service adds per message around Kafka and the model: hand-offs between threads, batching,
stacking 256x256 images into a batch, order keeping, encoding, acknowledgement bookkeeping. The
whole-service benchmark (``throughput.py``) cannot resolve changes this small; this can.
"""
from __future__ import annotations

import argparse
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.arguments import COUNT, run  # noqa: E402
from engine_build.imaging import DecodeLimits, ImageInfo  # noqa: E402
from engine_build.runtime.base import Backend, Outputs  # noqa: E402
from plugins.codecs import RawCodec  # noqa: E402
from plugins.encoders import JsonEncoder  # noqa: E402
from stream.config import StreamConfig  # noqa: E402
from stream.metrics import Metrics  # noqa: E402
from stream.offsets import OffsetTracker  # noqa: E402
from stream.pipeline import PipelineConfig, Processor  # noqa: E402
from stream.ports import Refused  # noqa: E402
from stream.records import Message, Outgoing  # noqa: E402

PAUSE_AT = StreamConfig.max_in_flight   # the service's default backpressure ...
RESUME_AT = PAUSE_AT // 2                 # ... and its resume mark (Service._resume_at)
MODEL = {"name": "placeholder", "sha256": "0" * 64, "precision": "int8", "placeholder": True, "runtime": "none"}


class ConstantModel(Backend):
    """The backend interface with no model: even scores for every image, ``concurrency`` callers at once.
    Also the stand-in of the whole-service benchmark's client-only runs (``service_bench``)."""
    name = "none"
    on_cpu = False     # nothing competes with decoding, as with a GPU

    def __init__(self, concurrency: int = 2) -> None:
        super().__init__(Path("none"), "none", max_batch=1 << 16)
        self.concurrency = concurrency

    def _infer_impl(self, images: np.ndarray) -> Outputs:
        probs = np.full((len(images), 2), 0.5, np.float32)
        return Outputs(probs, probs)

    def describe(self) -> str:
        return "no model"


class AckingSink:
    """Acknowledges every record on its own thread, in order."""

    def __init__(self) -> None:
        self._acks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="acks", daemon=True)
        self._thread.start()

    def publish(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None = None) -> None:
        self._acks.put(on_ack)

    def _run(self) -> None:
        while (ack := self._acks.get()) is not None:
            ack()

    def close(self) -> None:
        self._acks.put(None)
        self._thread.join()


STILL = np.zeros((256, 256, 3), np.uint8)


def still_image(data: bytes, limits: DecodeLimits | None = None, info: ImageInfo | None = None) -> np.ndarray:
    """The decoder of the runs that leave decoding out: one still image, whatever the bytes."""
    return STILL


def one_run(messages: int) -> float:
    """Process CPU microseconds per message over one run."""
    tracker, sink = OffsetTracker(), AckingSink()
    processor = Processor(ConstantModel(), RawCodec(), JsonEncoder(), sink, tracker, Metrics(),  # type: ignore[arg-type]
                          MODEL, PipelineConfig("out", "dlq"), decoder=still_image).start()
    inputs = [Message("in", i % 4, i // 4, f"{i}:0".encode(), b"x" * 100, [], 0) for i in range(messages)]
    try:
        started = time.process_time()
        for message in inputs:
            processor.submit(message)
            if tracker.in_flight() >= PAUSE_AT:
                tracker.wait_at_most(RESUME_AT, 30)
        if not tracker.wait_idle(60):
            raise RuntimeError(f"{tracker.in_flight()} messages never acknowledged")
        return (time.process_time() - started) / messages * 1e6
    finally:
        if not processor.stop(10):
            raise RuntimeError("the processor's threads did not stop")
        sink.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=COUNT, default=20_000, help="messages per run (default 20,000)")
    parser.add_argument("--runs", type=COUNT, default=5, help="runs after a warm-up; the median is reported "
                                                              "(default 5)")
    args = parser.parse_args(argv)
    one_run(min(args.messages, 2_000))    # warm-up: first allocations, imports, thread start-up
    runs = [one_run(args.messages) for _ in range(args.runs)]
    print(f"processor overhead: {statistics.median(runs):.1f} us of CPU a message "
          f"(median of {[round(r, 1) for r in runs]}; {args.messages} messages a run)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "processor_overhead.py"))
