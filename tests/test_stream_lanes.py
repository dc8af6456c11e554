"""Mixed sizes: a huge image decodes in a lane of its own, and every result says where its time went."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable

import numpy as np
import pytest

from engine_build.imaging import DecodeLimits, ImageInfo, decode
from engine_build.runtime.base import Outputs
from plugins.codecs import RawCodec
from plugins.encoders import JsonEncoder
from stream.metrics import Metrics
from stream.offsets import OffsetTracker
from stream.pipeline import PipelineConfig, Processor, stage_times
from stream.ports import Refused
from stream.records import Message, Outgoing

from .images import good_images, png_declaring
from .standins import PixelModel

HUGE = png_declaring(9000, 7000)      # 63 MP: accepted by the 64 MP default, about 0.9 s of decoding


class _Sink:
    """Acknowledges every record at once and keeps it."""

    def __init__(self) -> None:
        self.published: list[Outgoing] = []
        self.lock = threading.Lock()

    def publish(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None = None) -> None:
        with self.lock:
            self.published.append(record)
        on_ack()


def test_a_huge_decode_does_not_hold_up_the_small_images_behind_it():
    """One decode thread, a 63-megapixel PNG first (its decode held until the small ones are done),
    then small images: they are all published while the huge one is still decoding, in batches that
    close as soon as nothing else is on its way (the batching window is ten minutes: an image in the
    large lane is not one a batch waits for)."""
    release = threading.Event()

    def decoder(data: bytes, limits: DecodeLimits, info: ImageInfo | None) -> np.ndarray:
        if data == HUGE:
            assert release.wait(60), "the test never released the huge decode"
            return np.zeros((256, 256, 3), np.uint8)
        return decode(data, limits, info)

    tracker, sink = OffsetTracker(), _Sink()
    processor = Processor(PixelModel(), RawCodec(), JsonEncoder(), sink, tracker, Metrics(), {"name": "test"},
                          PipelineConfig("out", "dlq", max_delay_ms=600_000, decode_workers=1, keep_order=False),
                          decoder).start()
    try:
        processor.submit(Message("in", 0, 0, b"huge", HUGE))
        small = list(good_images().items())[:6]
        for offset, (name, data) in enumerate(small):
            processor.submit(Message("in", 1, offset, name.encode(), data))
        assert tracker.wait_at_most(1, 20), "the small images waited behind the huge decode"
        assert sorted(r.key for r in sink.published) == sorted(name.encode() for name, _ in small)
    finally:
        release.set()
        assert processor.stop(30)
    assert b"huge" in {r.key for r in sink.published}
    assert tracker.in_flight() == 0


def test_a_results_stages_account_for_its_whole_time():
    times = stage_times(received=10.0, decode_started=10.5, decoded=10.6, batch_started=10.62, inferred=10.7,
                        now=10.71)
    assert set(times) == {"wait", "decode", "queue", "inference", "output", "total"}
    assert abs(times["wait"] - 500) < 1e-6 and abs(times["inference"] - 80) < 1e-6
    assert abs(sum(v for k, v in times.items() if k != "total") - times["total"]) < 1e-6


def test_every_published_timing_adds_up_to_its_total():
    tracker, sink = OffsetTracker(), _Sink()
    processor = Processor(PixelModel(), RawCodec(), JsonEncoder(), sink, tracker, Metrics(), {"name": "test"},
                          PipelineConfig("out", "dlq", decode_workers=1)).start()
    for offset, (name, data) in enumerate(good_images().items()):
        processor.submit(Message("in", 0, offset, name.encode(), data))
    assert processor.stop(60)
    assert len(sink.published) == len(good_images())
    for record in sink.published:
        timing = json.loads(record.value)["timing_ms"]
        stages = sum(v for k, v in timing.items() if k != "total")
        assert abs(stages - timing["total"]) < 0.01, timing    # rounded to 3 decimals each
        assert min(timing.values()) >= 0, timing


class _BufferedModel(PixelModel):
    """Records the arrays it handed out and whether each batch it ran lay in one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.buffers: list[np.ndarray] = []
        self.in_buffer: list[bool] = []

    def input_buffer(self, rows: int) -> np.ndarray:
        self.buffers.append(super().input_buffer(rows))
        return self.buffers[-1]

    def _infer_impl(self, images: np.ndarray) -> Outputs:
        self.in_buffer.append(any(np.shares_memory(images, b) for b in self.buffers))
        return super()._infer_impl(images)


def test_each_batch_is_stacked_into_the_backends_own_input_buffer():
    """The one copy of each image goes from its decoder into the array the backend gave (page-locked
    memory with TensorRT), one per inference thread, reused batch after batch."""
    model, sink = _BufferedModel(), _Sink()
    processor = Processor(model, RawCodec(), JsonEncoder(), sink, OffsetTracker(), Metrics(), {"name": "test"},
                          PipelineConfig("out", "dlq", max_batch=4, decode_workers=1)).start()
    for offset, (name, data) in enumerate(good_images().items()):
        processor.submit(Message("in", 0, offset, name.encode(), data))
    assert processor.stop(60)
    assert len(sink.published) == len(good_images())
    assert len(model.buffers) == 1 and model.in_buffer and all(model.in_buffer)


def test_a_decoder_that_raises_dead_letters_its_input_and_the_partition_goes_on(caplog):
    """Not a DecodeError: a bug, or memory running out on one image. The input is dead-lettered
    (decode_error) like a codec's failure, so its partition keeps committing."""
    def decoder(data: bytes, limits: DecodeLimits, info: ImageInfo | None) -> np.ndarray:
        if data == b"poison":
            raise MemoryError("no room for this one")
        return decode(data, limits, info)

    tracker, sink = OffsetTracker(), _Sink()
    processor = Processor(PixelModel(), RawCodec(), JsonEncoder(), sink, tracker, Metrics(), {"name": "test"},
                          PipelineConfig("out", "dlq", decode_workers=1), decoder).start()
    processor.submit(Message("in", 0, 0, b"bad", b"poison"))
    processor.submit(Message("in", 0, 1, b"good", good_images()["png"]))
    assert processor.stop(30)
    assert [(r.topic, r.key) for r in sink.published] == [("dlq", b"bad"), ("out", b"good")]
    assert dict(sink.published[0].headers)["error.reason"] == b"decode_error"
    assert tracker.committable() == {("in", 0): 2}
    assert "decoding failed on ('in', 0, 0)" in caplog.text


class _Returns:
    """A codec whose unpack returns ``results[value]`` for the values it names and unpacks the rest as raw."""

    name = "returns"

    def __init__(self, results: dict[bytes, object]) -> None:
        self.results = results

    def unpack(self, value: bytes | None, headers: list[tuple[str, bytes]]) -> object:
        return self.results[value] if value in self.results else RawCodec().unpack(value, headers)


class _HeaderBomb(bytes):
    """Image bytes whose header read raises what no image reader should: not a DecodeError."""

    def rfind(self, *args: object) -> int:
        raise MemoryError("no room for this header")


@pytest.mark.parametrize(("result", "reason", "says"), [
    (("a decoded str", {}), "codec_error", "TypeError: unpack returned (str, dict), not (bytes, dict)"),
    ((42, {}), "codec_error", "TypeError: unpack returned (int, dict), not (bytes, dict)"),
    ((good_images()["png"], ["not", "a", "dict"]), "codec_error", "unpack returned (bytes, list)"),
    ((good_images()["png"], {}, "extra"), "codec_error", "unpack returned tuple, not a (bytes, dict) pair"),
    ((_HeaderBomb(good_images()["png"]), {}), "decode_error", "MemoryError: no room for this header"),
])
def test_a_codec_result_of_the_wrong_kind_is_a_dead_letter_and_the_partition_goes_on(result, reason, says):
    """Before: a codec returning (str, {}) raised a TypeError outside the codec's guard; the message
    stayed unacknowledged and its partition stopped committing until the stall timeout."""
    tracker, sink = OffsetTracker(), _Sink()
    processor = Processor(PixelModel(), _Returns({b"poison": result}), JsonEncoder(), sink, tracker, Metrics(),
                          {"name": "test"}, PipelineConfig("out", "dlq", decode_workers=1)).start()
    processor.submit(Message("in", 0, 0, b"bad", b"poison"))
    processor.submit(Message("in", 0, 1, b"good", good_images()["png"]))
    assert processor.stop(30)
    assert [(r.topic, r.key) for r in sink.published] == [("dlq", b"bad"), ("out", b"good")]
    headers = dict(sink.published[0].headers)
    assert headers["error.reason"] == reason.encode() and says in headers["error.message"].decode()
    assert tracker.committable() == {("in", 0): 2}


def test_a_codec_may_return_a_bytearray_or_memoryview():
    png = good_images()["png"]
    sink = _Sink()
    codec = _Returns({b"a": (bytearray(png), {}), b"b": (memoryview(png), {})})
    processor = Processor(PixelModel(), codec, JsonEncoder(), sink, OffsetTracker(), Metrics(), {"name": "test"},
                          PipelineConfig("out", "dlq", decode_workers=1)).start()
    processor.submit(Message("in", 0, 0, b"a", b"a"))
    processor.submit(Message("in", 0, 1, b"b", b"b"))
    assert processor.stop(30)
    assert [(r.topic, r.key) for r in sink.published] == [("out", b"a"), ("out", b"b")]


def test_each_image_header_is_read_once():
    """The pipeline reads a header to choose the lane and hands what it read to the decoder, which reads
    it again only when handed nothing (the header read costs about 5 % of a small JPEG's decode)."""
    handed: list[ImageInfo | None] = []

    def decoder(data: bytes, limits: DecodeLimits, info: ImageInfo | None) -> np.ndarray:
        handed.append(info)
        return decode(data, limits, info)

    sink = _Sink()
    processor = Processor(PixelModel(), RawCodec(), JsonEncoder(), sink, OffsetTracker(), Metrics(), {"name": "test"},
                          PipelineConfig("out", "dlq", decode_workers=1), decoder).start()
    for offset, (name, data) in enumerate(good_images().items()):
        processor.submit(Message("in", 0, offset, name.encode(), data))
    assert processor.stop(60)
    assert len(sink.published) == len(good_images()) and len(handed) == len(good_images())
    assert all(isinstance(info, ImageInfo) for info in handed)
