"""Decode, batch, infer, publish: the service's core, with no Kafka client in it.

Messages come in through :meth:`Processor.submit` (from the poll loop). A thread
pool decodes them while inference runs; each inference thread forms its own
dynamic batches; every message ends as exactly one published record, either its
prediction or a dead letter, and the offset tracker learns of it only when the
broker has acknowledged that record.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from engine_build.errors import DecodeError
from engine_build.imaging import DecodeLimits, decode

from .batching import Batcher
from .metrics import Metrics
from .offsets import OffsetTracker
from .ports import Sink
from .records import Message, Outgoing, Prediction, dead_letter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    output_topic: str
    dead_letter_topic: str
    max_batch: int = 32
    max_delay_ms: float = 20.0
    decode_workers: int = 2
    limits: DecodeLimits = DecodeLimits()


@dataclass
class _Decoded:
    message: Message
    image: np.ndarray
    metadata: dict
    decode_ms: float
    ready_at: float


class Processor:
    def __init__(self, backend, codec, encoder, sink: Sink, tracker: OffsetTracker, metrics: Metrics,
                 model_info: dict, cfg: PipelineConfig) -> None:
        self.backend, self.codec, self.encoder, self.sink = backend, codec, encoder, sink
        self.tracker, self.metrics, self.model_info, self.cfg = tracker, metrics, model_info, cfg
        self._pool = ThreadPoolExecutor(max_workers=cfg.decode_workers, thread_name_prefix="decode")
        self._decoded: queue.Queue[_Decoded | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._infer_loop, name=f"infer-{i}", daemon=True)
                         for i in range(max(1, backend.concurrency))]
        self.batches = 0

    def start(self) -> "Processor":
        for thread in self._threads:
            thread.start()
        return self

    # ---- input side (poll-loop thread) ----
    def submit(self, message: Message) -> None:
        self.tracker.add((message.topic, message.partition), message.offset)
        self.metrics.in_flight.inc()
        self._pool.submit(self._decode, message)

    def _decode(self, message: Message) -> None:
        started = time.perf_counter()
        try:
            data, metadata = self.codec.unpack(message.value, message.headers)
            image = decode(data, self.cfg.limits)
        except DecodeError as exc:
            self.metrics.decode_failures.labels(exc.reason).inc()
            self._reject(message, exc.reason, str(exc))
            return
        except Exception as exc:  # a codec plugin's bug must not sink the service
            log.exception("input codec failed on %s", message.position)
            self._reject(message, "codec_error", f"{type(exc).__name__}: {exc}")
            return
        self._decoded.put(_Decoded(message, image, metadata, (time.perf_counter() - started) * 1000,
                                   time.monotonic()))

    # ---- inference side (one thread per backend slot) ----
    def _infer_loop(self) -> None:
        batcher: Batcher[_Decoded] = Batcher(self.cfg.max_batch, self.cfg.max_delay_ms / 1000)
        while True:
            try:
                item = self._decoded.get(timeout=batcher.wait_time(time.monotonic()))
            except queue.Empty:
                item = None
            if item is None and self._stop.is_set() and self._decoded.empty():
                batch = batcher.flush()
                if batch:
                    self._run(batch)
                return
            batch = batcher.add(item, time.monotonic()) if item is not None else None
            batch = batch or batcher.due(time.monotonic())
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Decoded]) -> None:
        batch_start = time.monotonic()
        started = time.perf_counter()
        try:
            probs = self.backend.infer(np.stack([d.image for d in batch])).probs
            infer_ms = (time.perf_counter() - started) * 1000
            results = [(d, p, infer_ms) for d, p in zip(batch, probs)]
        except Exception:
            log.exception("batch of %d failed; retrying its images one by one", len(batch))
            results = self._one_by_one(batch)
        self.batches += 1
        self.metrics.batch_size.observe(len(batch))
        self.metrics.inference.observe(time.perf_counter() - started)
        labels = [int(np.argmax(p)) for _, p, _ in results if p is not None]
        log.info("batch %d: %d images, %.1f ms inference, %d positive, %d negative%s", self.batches, len(batch),
                 (time.perf_counter() - started) * 1000, sum(labels), len(labels) - sum(labels),
                 " [PLACEHOLDER MODEL]" if self.model_info.get("placeholder") else "")
        for decoded, p, infer_ms in results:
            if p is None:
                self._reject(decoded.message, "inference_error", "the model failed on this image")
                continue
            if not np.all(np.isfinite(p)):
                self._reject(decoded.message, "invalid_output", f"the model returned non-finite scores {p.tolist()}")
                continue
            timing = {"decode": decoded.decode_ms, "queue": (batch_start - decoded.ready_at) * 1000,
                      "inference": infer_ms, "total": (time.monotonic() - decoded.message.received) * 1000}
            prediction = Prediction(decoded.message, p, decoded.metadata, timing, self.model_info)
            try:
                key, value, headers = self.encoder.encode(prediction)
            except Exception as exc:
                log.exception("output encoder failed on %s", decoded.message.position)
                self._reject(decoded.message, "encoder_error", f"{type(exc).__name__}: {exc}")
                continue
            self._send(decoded.message, Outgoing(self.cfg.output_topic, key, value, headers), "published")

    def _one_by_one(self, batch: list[_Decoded]) -> list:
        results = []
        for d in batch:
            started = time.perf_counter()
            try:
                p = self.backend.infer(d.image[None]).probs[0]
            except Exception:
                log.exception("image %s failed inference", d.message.position)
                p = None
            results.append((d, p, (time.perf_counter() - started) * 1000))
        return results

    # ---- output side ----
    def _reject(self, message: Message, reason: str, text: str) -> None:
        self._send(message, dead_letter(message, self.cfg.dead_letter_topic, reason, text), "dead_letter")

    def _send(self, message: Message, record: Outgoing, outcome: str) -> None:
        def acknowledged() -> None:
            self.tracker.done((message.topic, message.partition), message.offset)
            self.metrics.in_flight.dec()
            self.metrics.record_finished(outcome, message.received)
            if outcome == "dead_letter":
                self.metrics.dead_letters.inc()

        def refused(exc: BaseException) -> None:   # a result the broker will never take: dead-letter the input
            self._reject(message, "publish_error", f"publishing the result failed for good: {type(exc).__name__}: {exc}")
        self.sink.publish(record, acknowledged, refused if outcome != "dead_letter" else None)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish everything submitted (decode, infer, publish), then stop the threads."""
        self._pool.shutdown(wait=True)
        self._stop.set()
        for _ in self._threads:
            self._decoded.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
