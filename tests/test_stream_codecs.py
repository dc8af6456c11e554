"""Compressed input from an independent client (librdkafka), and what happens when a codec is missing."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from .images import bad_images, good_images
from .kafka_helpers import names, start_service, stop

pytestmark = [pytest.mark.kafka, pytest.mark.slow]   # a service process each
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
SESSION_MS = 3000   # a group join waits about half of it on tansu


def librdkafka_produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]], codec: str) -> None:
    librdkafka_produce_each(bootstrap, topic, {codec: items})


def librdkafka_produce_each(bootstrap: str, topic: str, by_codec: dict[str, list[tuple[bytes, bytes]]]) -> None:
    """Each codec's items from an idempotent producer of its own; the producers start together (each
    takes about half a second to get its producer id)."""
    from confluent_kafka import Producer
    producers = {codec: Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 20,
                                  "enable.idempotence": True}) for codec in by_codec}
    for codec, items in by_codec.items():
        for key, value in items:
            producers[codec].produce(topic, key=key, value=value, headers=[("codec", codec.encode())])
    for codec, producer in producers.items():
        assert producer.flush(30) == 0, f"every {codec} record delivered"


def librdkafka_read(bootstrap: str, topic: str, expected: int, timeout: float = 120) -> list:
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{time.monotonic_ns()}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, 0, 0)])
    out = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                out.append(message)
    finally:
        consumer.close()
    return out


def test_every_codec_from_librdkafka_producers_comes_out(kafka_broker, small_artifact, tmp_path):
    t = names(kafka_broker, partitions=2)
    # bmp and text compress well, so librdkafka really sends each batch compressed (it sends a
    # batch uncompressed when compression would not shrink it)
    photos = [(name, good_images()[name]) for name in ("bmp", "jpeg_coffee", "png", "alpha_png")]
    bad_name = "text"
    bad_value, bad_reason = bad_images()[bad_name]
    librdkafka_produce_each(kafka_broker.bootstrap, t["input"], {
        codec: [(f"{codec}/{name}".encode(), value) for name, value in photos] + [(f"{codec}/{bad_name}".encode(),
                                                                                  bad_value)]
        for codec in CODECS})
    log = tmp_path / "service.log"
    service = start_service(kafka_broker, t, small_artifact, log, session_timeout_ms=SESSION_MS)
    try:
        results = librdkafka_read(kafka_broker.bootstrap, t["output"], len(CODECS) * len(photos))
        dead = librdkafka_read(kafka_broker.bootstrap, t["dlq"], len(CODECS))
    finally:
        stop(service, log)
    assert sorted(m.key().decode() for m in results) == sorted(f"{c}/{n}" for c in CODECS for n, _ in photos), \
        log.read_text()[-3000:]
    for message in results:
        headers = dict(message.headers())
        assert headers["codec"].decode() == message.key().decode().split("/")[0], "input headers pass through"
        assert json.loads(message.value())["label"] in ("negative", "positive")
    assert sorted(m.key().decode() for m in dead) == sorted(f"{c}/{bad_name}" for c in CODECS)
    for message in dead:
        headers = dict(message.headers())
        assert headers["error.reason"].decode() == bad_reason and message.value() == bad_value


def test_a_codec_this_install_cannot_decode_fails_loudly(kafka_broker, small_artifact, tmp_path):
    """With lz4 hidden from the service, lz4 input ends it with one line naming the partition and the fix."""
    t = names(kafka_broker, partitions=1)
    librdkafka_produce(kafka_broker.bootstrap, t["input"], [(b"k", good_images()["bmp"])], "lz4")
    shadow = tmp_path / "shadow"
    (shadow / "lz4").mkdir(parents=True)
    (shadow / "lz4" / "__init__.py").write_text("raise ImportError('lz4 hidden by the test')\n")
    log = tmp_path / "service.log"
    service = start_service(kafka_broker, t, small_artifact, log, environ={"PYTHONPATH": str(shadow)},
                            compression_type="gzip", session_timeout_ms=SESSION_MS)
    try:
        code = service.wait(120)
    except subprocess.TimeoutExpired:
        stop(service, log)
        raise AssertionError("the service kept running on input it cannot decode:\n"
                             + log.read_text()[-3000:]) from None
    text = log.read_text()
    assert code == 1, text[-3000:]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("stream: error:")]
    assert f"{t['input']}[0]" in line and "lz4" in line and "pip install" in line, line
    assert "Traceback" not in text
