"""The guarantees at their edges, on the real broker: a rebalance that cannot drain in time
followed by a kill, records the broker refuses for good, memory on a backlog of large images."""
from __future__ import annotations

import signal
import time

import pytest

from .images import good_images
from .kafka_helpers import committed, names, positions, produce, read_all, start_service, stop

pytestmark = pytest.mark.kafka
# a group join waits about half the session timeout on tansu; 3 s keeps four heartbeats (750 ms apart) in it
SESSION_MS = 3000


def _wait(what: str, check, process, log, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what} not within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _stop_once_committed(broker, t: dict, count: int, process, log, timeout: float = 120) -> None:
    """Wait until the group has committed ``count`` inputs of partition 0 (the service still running), then stop
    the service, whatever the wait came to."""
    try:
        _wait(f"{count} inputs committed", lambda: (committed(broker.bootstrap, t["group"], t["input"]).get(0)
                                                    or 0) >= count, process, log, timeout)
    finally:
        stop(process, log)


def spans(positions: set[tuple[int, int]]) -> str:
    """``p0: 3-9, 12; p1: 4`` for an assertion message."""
    out: dict[int, list[list[int]]] = {}
    for partition, offset in sorted(positions):
        runs = out.setdefault(partition, [])
        if runs and runs[-1][1] == offset - 1:
            runs[-1][1] = offset
        else:
            runs.append([offset, offset])
    return "; ".join(f"p{p}: " + ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs) for p, runs in out.items())


def read_until(bootstrap: str, topic: str, wanted: set[tuple[int, int]], timeout: float = 10) -> list:
    """Every record of ``topic`` until each input in ``wanted`` has one or no more arrive (duplicates
    make a count an unsafe stopping point)."""
    expected = len(wanted)
    while True:
        records = read_all(bootstrap, topic, expected, timeout=timeout)
        if wanted <= set(positions(records)) or len(records) < expected:
            return records
        expected = len(records) + 1


def test_an_undrained_revocation_then_a_kill_loses_nothing(kafka_broker, small_artifact, tmp_path):
    """Member a drains a backlog; b joins, a's drain cannot finish in time (a short
    --drain-timeout-s), a keeps some partitions and goes on with input that arrives after the
    rebalance, and is killed soon after: every input still gets a result (a's commits never passed the
    work its revocation left in flight). The later input is what a goes on with: a fast machine had
    finished the whole backlog while the rebalance ran."""
    t = names(kafka_broker, partitions=4)
    total, later = 2000, 400
    image = good_images()["jpeg_cell"]
    produce(kafka_broker.bootstrap, t["input"], [(str(i).encode(), image) for i in range(total)])
    logs = {name: tmp_path / f"{name}.log" for name in "ab"}
    a = start_service(kafka_broker, t, small_artifact, logs["a"], drain_timeout_s=0.2, session_timeout_ms=SESSION_MS,
                      max_in_flight=1500)   # more queued than it finishes in a rebalance
    b = None
    try:
        _wait("a's first results", lambda: "batch 20:" in logs["a"].read_text(), a, logs["a"])
        b = start_service(kafka_broker, t, small_artifact, logs["b"], session_timeout_ms=SESSION_MS)
        _wait("a's undrained revocation", lambda: "work still in flight" in logs["a"].read_text(), a, logs["a"])
        _wait("a's new assignment", lambda: logs["a"].read_text().count("partitions assigned:") >= 2, a, logs["a"])
        after = len(logs["a"].read_text())
        produce(kafka_broker.bootstrap, t["input"], [(str(i).encode(), image) for i in range(total, total + later)])
        total += later
        _wait("a's progress after it", lambda: "batch" in logs["a"].read_text()[after:], a, logs["a"])
        a.send_signal(signal.SIGKILL)
        a.wait(30)
        _wait("b finishing the input", lambda: sum(
            v or 0 for v in committed(kafka_broker.bootstrap, t["group"], t["input"]).values()) >= total,
            b, logs["b"], timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
        if b is not None:
            stop(b, logs["b"])
    assert "work still in flight" in logs["a"].read_text(), "the staged revocation did not drain in time"
    inputs = {(r.partition, r.offset) for r in read_all(kafka_broker.bootstrap, t["input"], total)}
    missing = inputs - set(positions(read_until(kafka_broker.bootstrap, t["output"], inputs)))
    assert len(inputs) == total and not missing, f"{len(missing)} of {total} inputs without a result: {spans(missing)}"


@pytest.fixture(scope="module")
def schema_broker(tmp_path_factory):
    """A second broker that validates the keys of ``labels-checked-*`` and ``dead-checked-*`` against a JSON
    schema (tansu's schema registry): a record whose key is not a JSON string starting "ok" is refused
    for good (InvalidRecord), as a broker-side schema or policy check refuses it. tansu 0.6 enforces no
    size limit (neither max.message.bytes nor its own: 30 MB records were accepted), so a schema is
    how it refuses a record for good."""
    from stream.embedded_broker import EmbeddedBroker
    schemas = tmp_path_factory.mktemp("schemas")
    broker = EmbeddedBroker(log_path=schemas / "tansu.log", schema_registry=schemas).start()
    yield broker
    broker.kill()   # in memory, nothing to keep: its graceful shutdown took 5 s


def _refusal_topics(broker, dead_letters_checked: bool) -> dict:
    import uuid
    run = uuid.uuid4().hex[:8]
    t = {"input": f"images-{run}", "output": f"labels-checked-{run}", "group": f"g-{run}",
         "dlq": f"dead-checked-{run}" if dead_letters_checked else f"dead-{run}"}
    for topic in (t["output"], t["dlq"]):
        if "checked" in topic:   # read by the broker when the topic is first written
            (broker.schema_registry / f"{topic}.json").write_text(
                '{"type": "object", "properties": {"key": {"type": "string", "pattern": "^ok"}}}')
    broker.create_topics({t["input"]: 1, t["output"]: 1, t["dlq"]: 1})
    return t


def _inputs_some_refused(broker, topic: str, total: int) -> tuple[list[bytes], list[bytes], set[int]]:
    """``total`` photos on ``topic``, keyed so that every seventh result (offset 3, 10, ...) is one the
    checked topics refuse; returns the six photos (input i is photo i % 6), the keys and the refused offsets."""
    images = list(good_images().values())[:6]
    keys = [f'"{"bad" if i % 7 == 3 else "ok"}-{i}"'.encode() for i in range(total)]
    produce(broker.bootstrap, topic, [(keys[i], images[i % 6]) for i in range(total)])
    return images, keys, {i for i in range(total) if i % 7 == 3}


def test_a_record_the_broker_refuses_for_good_is_dead_lettered_and_the_partition_goes_on(
        schema_broker, small_artifact, tmp_path, kafka_client):
    t = _refusal_topics(schema_broker, dead_letters_checked=False)
    total = 60
    images, keys, bad = _inputs_some_refused(schema_broker, t["input"], total)
    log = tmp_path / "refused.log"
    process = start_service(schema_broker, t, small_artifact, log, session_timeout_ms=SESSION_MS,
                            kafka_client=kafka_client)
    _stop_once_committed(schema_broker, t, total, process, log, timeout=180)
    results = read_all(schema_broker.bootstrap, t["output"], total - 9)
    dead = read_all(schema_broker.bootstrap, t["dlq"], 9)
    got = [o for _, o in positions(results)]
    assert got == [i for i in range(total) if i not in bad], f"each innocent result once, in offset order: {got}"
    assert {int(dict(r.headers)["source.offset"]) for r in dead} == bad
    for r in dead:
        headers = dict(r.headers)
        offset = int(headers["source.offset"])
        assert headers["error.reason"] == b"publish_error"
        assert b"InvalidRecord" in headers["error.message"] or b"INVALID_RECORD" in headers["error.message"]
        assert r.value == images[offset % 6] and r.key == keys[offset], "the original bytes"
    text = log.read_text()
    assert text.count("the producer is in a fatal state") <= len(bad) + 1, "no endless replacement"


def test_a_dead_letter_the_broker_refuses_for_good_ends_the_member_with_one_line(
        schema_broker, small_artifact, tmp_path, kafka_client):
    t = _refusal_topics(schema_broker, dead_letters_checked=True)
    images = good_images()
    produce(schema_broker.bootstrap, t["input"], [(b'"ok-0"', images["png"]), (b'"bad-1"', images["png"]),
                                                  (b'"ok-2"', images["png"])])
    log = tmp_path / "refused-dead-letter.log"
    process = start_service(schema_broker, t, small_artifact, log, session_timeout_ms=SESSION_MS,
                            kafka_client=kafka_client)
    try:
        code = process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert text.count(f"ERROR stream.failures: cannot publish even a dead letter to {t['dlq']}") == 1, text[-3000:]
    assert "stream: error: cannot publish even a dead letter" in text, "the exit says why, in one line"
    assert (committed(schema_broker.bootstrap, t["group"], t["input"]).get(0) or 0) <= 1


def test_an_input_with_megabytes_of_headers_is_dead_lettered_without_them(kafka_broker, small_artifact, tmp_path):
    """Its result, and a dead letter with all its headers, are over the producer's limit: the dead
    letter drops the oversized headers and says so; the member goes on (no crash loop)."""
    from kafka import KafkaProducer
    t = names(kafka_broker, partitions=1)
    image = good_images()["jpeg_clock"]
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all", max_request_size=8 << 20)
    producer.send(t["input"], key=b"heavy", value=image, headers=[("blob", b"x" * 700_000), ("blob2", b"y" * 700_000)])
    producer.send(t["input"], key=b"after", value=image)
    producer.flush()
    producer.close()
    log = tmp_path / "headers.log"
    process = start_service(kafka_broker, t, small_artifact, log, max_message_bytes=1 << 20,
                            session_timeout_ms=SESSION_MS)
    _stop_once_committed(kafka_broker, t, 2, process, log)
    (dead,) = read_all(kafka_broker.bootstrap, t["dlq"], 1)
    headers = dict(dead.headers)
    assert dead.key == b"heavy" and dead.value == image and "blob" not in headers
    assert headers["error.headers_dropped"] == b"blob=700004, blob2=700005"
    assert [r.key for r in read_all(kafka_broker.bootstrap, t["output"], 1)] == [b"after"]


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def large_photo_backlog_rss(kafka_broker, artifact, tmp_path, count: int, environ: dict | None = None,
                            **options) -> tuple[float, float]:
    """(ready-state RSS, peak RSS) in MB of a service draining ``count`` 16 MB photos (noise JPEGs)."""
    import threading

    import cv2
    import numpy as np
    from confluent_kafka import Producer
    t = names(kafka_broker, partitions=4)
    photo = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (3500, 4000, 3), dtype=np.uint8),
                         [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    # librdkafka fills the backlog in a third of kafka-python's time (whose client is not under test here)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap, "acks": "all", "message.max.bytes": 32 << 20})
    deadline = time.monotonic() + 120
    for i in range(count):
        while True:
            try:
                producer.produce(t["input"], key=str(i).encode(), value=photo)
                break
            except BufferError:   # its queue (1 GB) is full: wait for deliveries
                assert time.monotonic() < deadline, f"{i} of {count} photos queued after 120 s"
                producer.poll(0.5)
    assert producer.flush(120) == 0, "every photo delivered"
    log = tmp_path / "large.log"
    process = start_service(kafka_broker, t, artifact, log, environ, **options)
    samples: list[float] = []
    ready: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set() and process.poll() is None:
            samples.append(_rss_mb(process.pid))
            if not ready and "connected to" in log.read_text():
                ready.append(samples[-1])
            done.wait(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _wait("the backlog drained", lambda: sum(v or 0 for v in committed(
            kafka_broker.bootstrap, t["group"], t["input"]).values()) >= count, process, log, timeout=300)
    finally:
        done.set()
        sampler.join(5)
        stop(process, log)
    print(f"{count} photos of {len(photo) / 1e6:.1f} MB: RSS {ready[0]:.0f} MB ready, peak {max(samples):.0f} MB "
          f"({max(samples) - ready[0]:+.0f} MB)")
    return ready[0], max(samples)


@pytest.mark.slow   # 96 full-size decodes of 16 MB photos on one thread
def test_memory_on_a_backlog_of_16_mb_photos_stays_within_1_gb_of_the_ready_state(kafka_broker, small_artifact,
                                                                                   tmp_path):
    """Decoding at full size on one thread is slower than fetching, so a backlog builds up in the
    service: bounded by --max-in-flight-bytes (its default), not by the message count (512 of 16 MB)."""
    ready, peak = large_photo_backlog_rss(kafka_broker, small_artifact, tmp_path, count=96, decode_workers=1,
                                          reduced_decode="false")
    assert peak - ready < 1024, f"peak RSS {peak - ready:.0f} MB above the ready state"


def test_exactly_once_a_record_the_broker_refuses_for_good_is_dead_lettered_and_the_rest_commit(
        schema_broker, small_artifact, tmp_path, kafka_client):
    """The refusal aborts the unit; the record is sent alone in a probe transaction (aborted), and when
    the unit is redone its input is dead-lettered: a read_committed reader sees each innocent result
    once and a dead letter for each refused one, and every offset commits."""
    import collections

    from .kafka_helpers import read_committed
    t = _refusal_topics(schema_broker, dead_letters_checked=False)
    total = 30
    images, _, bad = _inputs_some_refused(schema_broker, t["input"], total)
    log = tmp_path / "refused-eos.log"
    process = start_service(schema_broker, t, small_artifact, log, processing_guarantee="exactly-once",
                            transactional_id=f"eos-{t['group']}", session_timeout_ms=SESSION_MS,
                            kafka_client=kafka_client)
    _stop_once_committed(schema_broker, t, total, process, log, timeout=240)
    results = collections.Counter(o for _, o in positions(read_committed(schema_broker.bootstrap, t["output"])))
    assert results == collections.Counter(i for i in range(total) if i not in bad), "each innocent result once"
    dead = [r for r in read_committed(schema_broker.bootstrap, t["dlq"]) if r.key is not None]
    assert sorted(int(dict(r.headers)["source.offset"]) for r in dead) == sorted(bad)
    assert all(r.value == images[int(dict(r.headers)["source.offset"]) % 6] for r in dead), "the original bytes"


def test_a_null_header_value_goes_on_to_the_result_and_the_dead_letter(kafka_broker, small_artifact, tmp_path,
                                                                       kafka_client):
    """Kafka carries a null header value (a Java producer's ``headers.add(key, null)``); kafka-python's producer
    refuses one, so handing the input's headers on used to refuse the result and then its dead letter: the
    member stopped, and every restart stopped again on the same record. kafka-python sends it as empty bytes."""
    from confluent_kafka import Producer
    t = names(kafka_broker, partitions=1)
    image = good_images()["jpeg_clock"]
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    for key, value in ((b"null-header", image), (b"not-an-image", b"plain text"), (b"after", image)):
        producer.produce(t["input"], key=key, value=value, headers=[("trace", None), ("id", b"7")])
    assert producer.flush(30) == 0
    log = tmp_path / "null-header.log"
    process = start_service(kafka_broker, t, small_artifact, log, kafka_client=kafka_client)
    _stop_once_committed(kafka_broker, t, 3, process, log)
    null = None if kafka_client == "librdkafka" else b""
    results, (dead,) = read_all(kafka_broker.bootstrap, t["output"], 2), read_all(kafka_broker.bootstrap, t["dlq"], 1)
    assert [(r.key, r.headers) for r in results] == [(b"null-header", [("trace", null), ("id", b"7")]),
                                                     (b"after", [("trace", null), ("id", b"7")])]
    assert dead.key == b"not-an-image" and dead.headers[:2] == [("trace", null), ("id", b"7")]


class _RawKey(str):
    """A header key that kafka-python's producer writes as these bytes: not UTF-8, which Kafka's protocol says a
    header key is; a producer that does not check can send one."""

    raw: bytes

    def __new__(cls, raw: bytes) -> _RawKey:
        key = super().__new__(cls, "?")
        key.raw = raw
        return key

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


def test_a_record_whose_header_key_is_not_utf8(kafka_broker, small_artifact, tmp_path, kafka_client):
    """librdkafka cannot read such a record's headers (``headers()`` raised a SystemError out of the poll loop: a
    traceback, exit 1, every restart again): it is dead-lettered with its key and value, and the partition goes
    on. kafka-python cannot parse the record at all: the member stops with one line naming the partition, the
    offset and what to do."""
    t = names(kafka_broker, partitions=1)
    image = good_images()["jpeg_clock"]
    produce(kafka_broker.bootstrap, t["input"], [(b"before", image)])
    produce(kafka_broker.bootstrap, t["input"], [(b"bad-key", image)], headers=[(_RawKey(b"\xff\xfeid"), b"1")])
    produce(kafka_broker.bootstrap, t["input"], [(b"after", image)])
    log = tmp_path / "header-key.log"
    process = start_service(kafka_broker, t, small_artifact, log, kafka_client=kafka_client)
    if kafka_client == "kafka-python":
        assert process.wait(120) == 1, log.read_text()[-3000:]
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith(f"stream: error: consuming {t['input']}[0] at offset 1: ") and \
            "a header key that is not UTF-8" in last and "--kafka-client librdkafka" in last, last
        return
    _stop_once_committed(kafka_broker, t, 3, process, log)
    (dead,) = read_all(kafka_broker.bootstrap, t["dlq"], 1)
    assert dead.key == b"bad-key" and dead.value == image
    assert dict(dead.headers)["error.reason"] == b"bad_headers", dead.headers
    assert b"not UTF-8" in dict(dead.headers)["error.message"]
    assert [r.key for r in read_all(kafka_broker.bootstrap, t["output"], 2)] == [b"before", b"after"]
