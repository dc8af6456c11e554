"""Decode, batch, infer, publish: the service's core, with no Kafka client in it.

Messages come in through :meth:`Processor.submit` (from the poll loop). Decode
threads decode them while inference runs; each inference thread forms its own
dynamic batches; every message ends as exactly one published record, either its
prediction or a dead letter, and the offset tracker learns of it only when the
broker has acknowledged that record.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from engine_build.errors import DecodeError
from engine_build.imaging import DecodeLimits, ImageInfo, decode, probe

from .batching import Batcher
from .metrics import Metrics
from .offsets import OffsetTracker
from .ordering import InOrder
from .ports import Sink

if TYPE_CHECKING:
    from engine_build.runtime.base import Backend
    from plugins.codecs import InputCodec
    from plugins.encoders import OutputEncoder
from .records import Message, Outgoing, Prediction, dead_letter

log = logging.getLogger(__name__)
# bytes to pixels, given the header the pipeline already read (None: read it): :func:`engine_build.imaging.decode`
Decoder = Callable[[bytes, DecodeLimits, ImageInfo | None], np.ndarray]


@dataclass(frozen=True)
class PipelineConfig:
    output_topic: str
    dead_letter_topic: str
    max_batch: int = 32
    max_delay_ms: float = 20.0
    decode_workers: int = 2
    adaptive_batching: bool = True
    limits: DecodeLimits = DecodeLimits()
    keep_order: bool = True
    # Images whose decode works on more pixels than this (after JPEG's reduced decode) go to a
    # decode thread of their own, so a 60-megapixel PNG (about 0.9 s) never holds up the small
    # images behind it. 8 MP: a full-size decode of a 12 MP phone JPEG stays in the main lane
    # (reduced decode makes it 0.75 MP); PNGs, WebPs and TIFFs above 8 MP take the large lane.
    large_pixels: int = 8_000_000


def stage_times(received: float, decode_started: float, decoded: float, batch_started: float, inferred: float,
                now: float) -> dict[str, float]:
    """A result's ``timing_ms`` from the moments its image passed each stage (one monotonic clock): the
    stages account for the whole total. wait: polled until a decode thread took it (behind other
    decodes); decode: unpacking and decoding; queue: decoded until its batch ran; inference: the
    batch's call (with stacking); output: from the call's end to this record (batch bookkeeping,
    the encodes of the images before it in the batch)."""
    marks = (received, decode_started, decoded, batch_started, inferred, now)
    stages = {name: (end - start) * 1000 for name, start, end in
              zip(("wait", "decode", "queue", "inference", "output"), marks, marks[1:], strict=False)}
    return {**stages, "total": (now - received) * 1000}


def codec_result(result: object) -> tuple[bytes, dict]:
    """A codec's ``unpack`` result checked against its contract, ``(image bytes, metadata dict)``
    (a bytearray or memoryview is taken as its bytes); a TypeError saying what came instead."""
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"unpack returned {type(result).__name__}, not a (bytes, dict) pair")
    data, metadata = result
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes) or not isinstance(metadata, dict):
        raise TypeError(f"unpack returned ({type(data).__name__}, {type(metadata).__name__}), not (bytes, dict)")
    return data, metadata


class _Stacker:
    """One inference thread's input array, filled batch after batch: each image is copied once, from
    its decoder into this array, which is what the runtime reads (the backend's
    :meth:`~engine_build.runtime.base.Backend.input_buffer`: page-locked memory with TensorRT, copied
    to the GPU as it is). A fresh array per batch (6 MB at 32 images) would cost page faults and an
    allocation each time; the runtimes read it during the call, so it is free again when the call
    returns. Images of another shape (a backend stand-in's) get an array of their own."""

    def __init__(self, rows: int, allocate: Callable[[int], np.ndarray]) -> None:
        self.rows, self.allocate = rows, allocate
        self._array: np.ndarray | None = None

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        first, array = images[0], self._array
        if array is None or array.shape[1:] != first.shape or array.dtype != first.dtype or len(images) > len(array):
            rows = max(self.rows, len(images))
            array = self.allocate(rows)
            if array.shape[1:] != first.shape or array.dtype != first.dtype:
                array = np.empty((rows, *first.shape), first.dtype)
            self._array = array
        return np.stack(images, out=array[:len(images)], casting="no")   # never a silent cast


@dataclass
class _Unpacked:
    """A message the codec has unpacked, waiting in the large lane for its decode."""
    message: Message
    data: bytes
    metadata: dict
    info: ImageInfo | None   # its header, read once (None: unreadable, the decoder says why)


@dataclass
class _Decoded:
    message: Message
    image: np.ndarray
    metadata: dict
    decode_started: float   # time.monotonic(), as Message.received
    ready_at: float


class _Inferred(NamedTuple):
    decoded: _Decoded
    scores: np.ndarray | None       # None: the model failed on this image
    finite: bool
    batch_start: float              # time.monotonic()
    inferred_at: float


class Processor:
    def __init__(self, backend: Backend, codec: InputCodec, encoder: OutputEncoder, sink: Sink,
                 tracker: OffsetTracker, metrics: Metrics, model_info: dict[str, Any], cfg: PipelineConfig,
                 decoder: Decoder = decode) -> None:
        """``decoder``: bytes to pixels (a benchmark's stand-in measures the rest without decoding)."""
        self.backend, self.codec, self.encoder, self.sink = backend, codec, encoder, sink
        self.decoder = decoder
        self.tracker, self.metrics, self.model_info, self.cfg = tracker, metrics, model_info, cfg
        # Decode workers take messages from a plain queue: an executor's Future per message (a lock, a
        # condition, a callback list) cost the poll loop about 8 us a message, a tenth of its own work.
        self._undecoded: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._decoders = [threading.Thread(target=self._decode_loop, name=f"decode-{i}", daemon=True)
                          for i in range(max(1, cfg.decode_workers))]
        # the large lane: one more thread, for images above cfg.large_pixels only
        self._large: queue.SimpleQueue[_Unpacked | None] = queue.SimpleQueue()
        self._large_decoder = threading.Thread(target=self._large_loop, name="decode-large", daemon=True)
        self._decoded: queue.Queue[_Decoded | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._infer_loop, name=f"infer-{i}", daemon=True)
                         for i in range(max(1, backend.concurrency))]
        self.batches = 0            # counted by every inference thread: under its lock
        self._batches_lock = threading.Lock()
        self._order: InOrder[tuple[Message, Outgoing, str]] = InOrder(cfg.keep_order)
        self._rejected: Counter[str] = Counter()
        self._rejected_lock = threading.Lock()
        self._decoding = 0          # submitted, not yet queued for inference (nor rejected)
        self._decoding_lock = threading.Lock()
        self._stopping = False
        self._bytes = 0             # input values submitted, not yet acknowledged
        self._bytes_changed = threading.Condition()

    def in_flight_bytes(self) -> int:
        with self._bytes_changed:
            return self._bytes

    def wait_bytes_at_most(self, limit: int, timeout: float) -> bool:
        """Block until at most ``limit`` bytes of input values are in flight; False on timeout."""
        with self._bytes_changed:
            return self._bytes_changed.wait_for(lambda: self._bytes <= limit, timeout)

    def _count_bytes(self, change: int) -> None:
        with self._bytes_changed:
            self._bytes += change
            self._bytes_changed.notify_all()

    def start(self) -> Processor:
        for thread in [*self._decoders, self._large_decoder, *self._threads]:
            thread.start()
        return self

    # ---- input side (poll-loop thread) ----
    def submit(self, message: Message) -> None:
        if self._stopping:   # it would wait in the queue, in flight, forever
            raise RuntimeError("submit after stop: the processor takes no more messages")
        self.tracker.add((message.topic, message.partition), message.offset)
        self._count_bytes(len(message.value or b""))
        self._order.expect((message.topic, message.partition), id(message))
        self.metrics.in_flight.inc()
        with self._decoding_lock:
            self._decoding += 1
        self._undecoded.put(message)

    def _decode_loop(self) -> None:
        while (message := self._undecoded.get()) is not None:
            try:
                self._guarded(message, self._decode, message, time.monotonic())
            finally:   # after the put (or the hand-over to the large lane): a batch never closes early for
                # an image about to be queued, nor waits for one in the large lane
                with self._decoding_lock:
                    self._decoding -= 1

    def _large_loop(self) -> None:
        while (item := self._large.get()) is not None:
            self._guarded(item.message, self._finish_decode, item, time.monotonic())

    @staticmethod
    def _guarded(message: Message, step: Callable[..., None], *args: Any) -> None:
        """Run one decode step. Bad inputs and failing codecs or decoders become dead letters inside it;
        what escapes is a bug past that point (a dead letter's publish raising): the message cannot be
        dead-lettered safely from here (its place in the partition's order may be spent), so it stays
        unacknowledged, said in the log; the worker goes on with the rest."""
        try:
            step(*args)
        except Exception:
            log.exception("decoding %s failed; it stays unacknowledged: its partition commits no further "
                          "until a restart redelivers it", message.position)

    def _arriving(self) -> int:
        """Images that could still join an open batch: queued for inference or being decoded."""
        return self._decoded.qsize() + self._decoding

    def _decode(self, message: Message, taken_at: float) -> None:
        """Unpack and decode one message, or hand it to the large lane."""
        if message.unreadable_headers is not None:   # its result could not carry the headers it came with
            self._rejected_input(message, DecodeError("bad_headers", message.unreadable_headers))
            return
        try:
            data, metadata = codec_result(self.codec.unpack(message.value, message.headers))
        except DecodeError as exc:
            self._rejected_input(message, exc)
            return
        except Exception as exc:  # a codec plugin's bug (or a result of the wrong type) must not sink the service
            log.exception("input codec failed on %s", message.position)
            self._reject(message, "codec_error", f"{type(exc).__name__}: {exc}")
            return
        try:
            info: ImageInfo | None = probe(data, self.cfg.limits)
        except DecodeError:
            info = None   # not large: the decoder rejects it at once, saying why
        except Exception as exc:  # reading the header failed some other way: as the decoder's failure
            self._decoder_failed(message, exc)
            return
        unpacked = _Unpacked(message, data, metadata, info)
        if info is not None and info.width * info.height // (info.scale * info.scale) > self.cfg.large_pixels:
            self._large.put(unpacked)   # its decode works on more than large_pixels
        else:
            self._finish_decode(unpacked, taken_at)

    def _finish_decode(self, item: _Unpacked, started: float) -> None:
        """Decode an unpacked message; ``started``: when its decode began (codec included in the main lane)."""
        try:
            image = self.decoder(item.data, self.cfg.limits, item.info)
        except DecodeError as exc:
            self._rejected_input(item.message, exc)
            return
        except Exception as exc:  # the decoder's bug (or out of memory) on this input must not stall its partition
            self._decoder_failed(item.message, exc)
            return
        self._decoded.put(_Decoded(item.message, image, item.metadata, started, time.monotonic()))

    def _decoder_failed(self, message: Message, exc: Exception) -> None:
        """Decoding raised something other than a DecodeError: the input is dead-lettered (decode_error)."""
        log.exception("decoding failed on %s", message.position)
        self.metrics.decode_failures.labels("decode_error").inc()
        self._reject(message, "decode_error", f"{type(exc).__name__}: {exc}")

    def _rejected_input(self, message: Message, exc: DecodeError) -> None:
        self.metrics.decode_failures.labels(exc.reason).inc()
        self._reject(message, exc.reason, str(exc))

    # ---- inference side (one thread per backend slot) ----
    def _infer_loop(self) -> None:
        batcher: Batcher[_Decoded] = Batcher(self.cfg.max_batch, self.cfg.max_delay_ms / 1000,
                                             self.cfg.adaptive_batching)
        stack = _Stacker(self.cfg.max_batch, self.backend.input_buffer)
        while True:
            try:
                item = self._decoded.get(timeout=batcher.wait_time(time.monotonic()))
            except queue.Empty:
                item = None
            if item is None and self._stop.is_set() and self._decoded.empty():
                batch = batcher.flush()
                if batch:
                    self._run(batch, stack)
                return
            batch = batcher.add(item, time.monotonic()) if item is not None else None
            batch = batch or batcher.ready(time.monotonic(), self._arriving())
            if batch:
                self._run(batch, stack)

    def _run(self, batch: list[_Decoded], stack: _Stacker) -> None:
        batch_start = time.monotonic()
        started = time.perf_counter()
        try:
            probs = self.backend.infer(stack([d.image for d in batch])).probs
            inferred_at = time.monotonic()
            # once per batch: numpy's per-call overhead on one image's two scores cost a tenth of this
            # thread's own work
            finite = np.isfinite(probs).all(axis=1).tolist()
            results = [_Inferred(d, p, ok, batch_start, inferred_at)
                       for d, p, ok in zip(batch, probs, finite, strict=True)]
        except Exception:
            log.exception("batch of %d failed; retrying its images one by one", len(batch))
            results = self._one_by_one(batch)
        with self._batches_lock:
            self.batches += 1
            number = self.batches
        self.metrics.batch_size.observe(len(batch))
        self.metrics.inference.observe(time.perf_counter() - started)
        answered = [r.scores for r in results if r.finite and r.scores is not None]
        positive = int(np.argmax(answered, axis=1).sum()) if answered else 0
        log.info("batch %d: %d images, %.1f ms inference, %d positive, %d negative%s%s", number, len(batch),
                 (time.perf_counter() - started) * 1000, positive, len(answered) - positive,
                 self._dead_letter_summary(), " [PLACEHOLDER MODEL]" if self.model_info.get("placeholder") else "")
        for result in results:
            self._emit(result)

    def _emit(self, result: _Inferred) -> None:
        """One image's outcome: its encoded prediction, or a dead letter saying why not."""
        decoded, scores = result.decoded, result.scores
        if scores is None:
            self._reject(decoded.message, "inference_error", "the model failed on this image")
            return
        if not result.finite:
            self._reject(decoded.message, "invalid_output", f"the model returned non-finite scores {scores.tolist()}")
            return
        timing = stage_times(decoded.message.received, decoded.decode_started, decoded.ready_at, result.batch_start,
                             result.inferred_at, time.monotonic())
        prediction = Prediction(decoded.message, scores, decoded.metadata, timing, self.model_info)
        try:
            key, value, headers = self.encoder.encode(prediction)
        except Exception as exc:
            log.exception("output encoder failed on %s", decoded.message.position)
            self._reject(decoded.message, "encoder_error", f"{type(exc).__name__}: {exc}")
            return
        self._send(decoded.message, Outgoing(self.cfg.output_topic, key, value, headers,
                                             source=decoded.message.position), "published")

    def _one_by_one(self, batch: list[_Decoded]) -> list[_Inferred]:
        results = []
        for d in batch:
            started = time.monotonic()
            try:
                scores = self.backend.infer(d.image[None]).probs[0]
                finite = bool(np.isfinite(scores).all())
            except Exception:
                log.exception("image %s failed inference", d.message.position)
                scores, finite = None, False
            results.append(_Inferred(d, scores, finite, started, time.monotonic()))
        return results

    # ---- output side ----
    def _reject(self, message: Message, reason: str, text: str) -> None:
        with self._rejected_lock:
            self._rejected[reason] += 1
        self._send(message, dead_letter(message, self.cfg.dead_letter_topic, reason, text), "dead_letter")

    def _dead_letter_summary(self) -> str:
        """``; dead letters since the last line: reason=n, ...`` (empty when there were none)."""
        with self._rejected_lock:
            counts, self._rejected = self._rejected, Counter()
        if not counts:
            return ""
        return "; dead letters since the last line: " + ", ".join(f"{r}={n}" for r, n in sorted(counts.items()))

    def report_dead_letters(self) -> None:
        """A line for dead letters no batch line has counted yet (a stream of only bad inputs has no batches)."""
        summary = self._dead_letter_summary()
        if summary:
            log.warning("no batch%s", summary)

    def _send(self, message: Message, record: Outgoing, outcome: str) -> None:
        """Publish in each partition's arrival order (unless ``keep_order`` is off)."""
        self._order.complete((message.topic, message.partition), id(message), (message, record, outcome),
                             self._publish)

    def _publish(self, item: tuple[Message, Outgoing, str]) -> None:
        message, record, outcome = item

        def acknowledged() -> None:
            self.tracker.done((message.topic, message.partition), message.offset)
            self._count_bytes(-len(message.value or b""))
            self.metrics.in_flight.dec()
            self.metrics.record_finished(outcome, message.received)
            if outcome == "dead_letter":
                self.metrics.dead_letters.inc()

        def refused(exc: BaseException) -> None:
            """A result the broker will never take: dead-letter the input, straight away (its place
            in the partition's order was its result's, already taken)."""
            with self._rejected_lock:
                self._rejected["publish_error"] += 1
            text = f"publishing the result failed for good: {type(exc).__name__}: {exc}"
            self._publish((message, dead_letter(message, self.cfg.dead_letter_topic, "publish_error", text),
                           "dead_letter"))
        self.sink.publish(record, acknowledged, refused if outcome != "dead_letter" else None)

    def stop(self, timeout: float = 30.0) -> bool:
        """Finish everything submitted (decode, infer, publish), then stop the threads, all within
        ``timeout``; False when an inference thread is still running after it (the backend must then
        stay open)."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        for _ in self._decoders:
            self._undecoded.put(None)
        for thread in self._decoders:   # a dead letter's publish can block: the drain has one deadline
            thread.join(max(0.0, deadline - time.monotonic()))
        self._large.put(None)           # after the decoders: they may still hand it images
        self._large_decoder.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        for _ in self._threads:
            self._decoded.put(None)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)
