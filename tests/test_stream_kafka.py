"""The service against a real Kafka-protocol broker: nothing lost, ever."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from stream.app import build
from stream.config import StreamConfig
from stream.errors import KafkaPermanent

from .images import bad_images, good_images
from .kafka_helpers import (
    FlakyProxy,
    assert_stops_without_dead_letter,
    committed,
    images,
    names,
    positions,
    produce,
    read_all,
    start_service,
    stop,
    wait_finished,
    wait_for_outputs,
)
from .standins import stand_in
from .waiting import wait_until

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[1]
# Joining a group on tansu waits about half the session timeout (3 s at the 6 s the helpers give):
# every service here joins at least once and none is killed (a stopped member leaves its group), so a
# short session costs nothing the tests check. Heartbeats go every quarter of it.
SESSION_MS = 2000


def test_every_image_one_record_bad_ones_dead_lettered_offsets_committed(kafka_broker, small_artifact,
                                                                         kafka_client):
    t = names(kafka_broker)
    good, bad = good_images(), bad_images()
    produce(kafka_broker.bootstrap, t["input"], [(k.encode(), v) for k, v in good.items()],
            headers=[("trace-id", b"abc")])
    produce(kafka_broker.bootstrap, t["input"], [(k.encode(), v) for k, (v, _) in bad.items()])
    cfg = StreamConfig(kafka_broker.bootstrap, (t["input"],), t["output"], t["dlq"], small_artifact,
                       group_id=t["group"], metrics_port=0, max_batch=8, commit_interval_ms=100,
                       session_timeout_ms=SESSION_MS, kafka_client=kafka_client)
    stats = build(cfg).run(count=len(good) + len(bad), timeout=120)
    assert stats.finished == len(good) + len(bad)

    out = read_all(kafka_broker.bootstrap, t["output"], len(good))
    assert sorted(r.key.decode() for r in out) == sorted(good)
    for r in out:
        record = json.loads(r.value)
        assert record["label"] in ("negative", "positive") and record["model"]["placeholder"] is True
        assert ("trace-id", b"abc") in r.headers
    for output_partition in {r.partition for r in out}:   # read in log order: each input partition's order kept
        sources = positions([r for r in out if r.partition == output_partition])
        for input_partition in {p for p, _ in sources}:
            offsets = [o for p, o in sources if p == input_partition]
            assert offsets == sorted(offsets), f"results of input partition {input_partition} out of order"
    dead = read_all(kafka_broker.bootstrap, t["dlq"], len(bad))
    assert {r.key.decode(): dict(r.headers)["error.reason"].decode() for r in dead} == \
        {k: reason for k, (_, reason) in bad.items()}
    assert all(r.value == bad[r.key.decode()][0] for r in dead), "original value kept"
    total = len(good) + len(bad)
    assert sum(committed(kafka_broker.bootstrap, t["group"], t["input"]).values()) == total


@pytest.mark.slow
def test_sigterm_mid_stream_loses_nothing(kafka_broker, small_artifact, tmp_path, kafka_client):
    from stream.embedded_broker import free_port
    t = names(kafka_broker, partitions=2)
    # Half the input before the first member starts, half after it stops. With at most 80 messages
    # in flight (64 + one poll of 16), SIGTERM after its first 40 results lands mid-stream: a half of
    # 600 leaves hundreds unfinished however late a loaded machine lets this test send the signal (a half
    # of 150 did not: a member finishes that many in well under a second, and one loaded run failed here).
    total, port = 1200, free_port()
    produce(kafka_broker.bootstrap, t["input"], images(0, total // 2))
    first = start_service(kafka_broker, t, small_artifact, tmp_path / "first.log", metrics_port=port,
                          max_in_flight=64, max_poll_records=16, kafka_client=kafka_client,
                          session_timeout_ms=SESSION_MS)
    wait_finished(first, port, 40, tmp_path / "first.log")
    stop(first, tmp_path / "first.log")
    log = (tmp_path / "first.log").read_text()
    assert "stopped:" in log
    assert f"Kafka client {kafka_client} " in log, "the start-up line names the client it runs"

    # Offsets committed by the stopped process are all backed by published records.
    after_first = read_all(kafka_broker.bootstrap, t["output"], 1, to_end=True)
    done = set(positions(after_first))
    marks = committed(kafka_broker.bootstrap, t["group"], t["input"])
    assert sum(v or 0 for v in marks.values()) < total // 2, "the first process was stopped mid-stream"
    for partition, mark in marks.items():
        assert all((partition, o) in done for o in range(mark or 0)), \
            f"committed past an unpublished offset on {partition}"

    # A restarted member picks up from the committed offsets; together nothing is missing.
    produce(kafka_broker.bootstrap, t["input"], images(total // 2, total - total // 2))
    second = start_service(kafka_broker, t, small_artifact, tmp_path / "second.log", kafka_client=kafka_client,
                           session_timeout_ms=SESSION_MS)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            marks = committed(kafka_broker.bootstrap, t["group"], t["input"])
            if sum(v or 0 for v in marks.values()) == total:
                break
            time.sleep(0.3)
    finally:
        stop(second, tmp_path / "second.log")
    records = read_all(kafka_broker.bootstrap, t["output"], total)
    assert set(positions(records)) == {(p, o) for p, mark in marks.items() for o in range(mark)}
    assert sum(marks.values()) == total


def readyz(port: int) -> tuple[int, str]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)




@pytest.mark.slow
def test_broker_unreachable_then_back_then_gone_then_back_never_crashes(small_artifact, tmp_path, kafka_client):
    """Not-ready while Kafka is away, works once it comes, survives it vanishing, resumes when it
    returns (a fresh in-memory broker: new producer ids, offsets out of range), stops cleanly."""
    from stream.embedded_broker import EmbeddedBroker, free_port
    port, metrics = free_port(), free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu.log")
    t = {"input": "images", "output": "labels", "dlq": "dead", "group": "outage"}
    log = tmp_path / "service.log"
    service = start_service(broker, t, small_artifact, log, metrics_port=metrics, kafka_client=kafka_client,
                            session_timeout_ms=SESSION_MS)
    try:
        wait_until(lambda: readyz(metrics)[0] == 503 and "cannot reach Kafka" in readyz(metrics)[1],
                   "/readyz to answer 503 'cannot reach Kafka' while Kafka is away", timeout=60, step=0.3)
        # it has failed to connect; results once the broker is up show it kept retrying (and
        # wait_finished fails at once if it exits instead)
        assert service.poll() is None, "the service must keep retrying, not exit"
        broker.start()
        broker.create_topics({"images": 1, "labels": 1, "dead": 1})
        image = good_images()["jpeg_rocket"]
        produce(broker.bootstrap, "images", [(str(i).encode(), image) for i in range(20)])
        wait_finished(service, metrics, 20, log)
        wait_for_outputs(broker, "labels", 20, timeout=120)
        wait_until(lambda: readyz(metrics)[0] == 200, "/readyz to answer 200 once connected", timeout=30, step=0.3)
        broker.kill()   # gone at once (a graceful stop answers for 3 more seconds first)
        wait_until(lambda: readyz(metrics)[0] == 503, "/readyz to answer 503 after the broker vanished",
                   timeout=30, step=0.3)
        assert service.poll() is None, "the service must survive the broker going away"
        broker.start()
        broker.create_topics({"images": 1, "labels": 1, "dead": 1})
        produce(broker.bootstrap, "images", [(f"again-{i}".encode(), image) for i in range(20)])
        wait_finished(service, metrics, 40, log)
        again = wait_for_outputs(broker, "labels", 20, timeout=120)
        assert {r.key for r in again} >= {f"again-{i}".encode() for i in range(20)}
        wait_until(lambda: readyz(metrics)[0] == 200, "/readyz to answer 200 once the broker is back",
                   timeout=30, step=0.3)
    finally:
        stop(service, log)
        broker.stop()
    assert "Traceback" not in log.read_text()


def test_a_sink_publishes_the_fallback_when_a_record_is_too_large(kafka_broker, kafka_client):
    import threading

    from stream.kafka_sink import KafkaSink
    from stream.rdkafka_sink import RdKafkaSink
    from stream.records import Message, dead_letter
    t = names(kafka_broker, partitions=1)
    sink = (RdKafkaSink if kafka_client == "librdkafka" else KafkaSink)(kafka_broker.bootstrap, {},
                                                                        max_request_size=100_000)
    acked = threading.Event()
    try:
        message = Message(t["input"], 0, 7, b"k", b"y" * 300_000)
        sink.publish(dead_letter(message, t["dlq"], "not_an_image", "text"), acked.set)
        assert acked.wait(30), "the fallback was acknowledged"
    finally:
        sink.close()
    (record,) = read_all(kafka_broker.bootstrap, t["dlq"], 1)
    assert record.value == b"" and dict(record.headers)["error.value_dropped"] == b"300000"


def test_a_tombstone_dead_letter_reaches_the_broker_with_a_null_value(kafka_broker):
    import threading

    from stream.kafka_sink import KafkaSink
    from stream.records import Message, dead_letter
    t = names(kafka_broker, partitions=1)
    sink = KafkaSink(kafka_broker.bootstrap, {})
    acked = threading.Event()
    try:
        sink.publish(dead_letter(Message(t["input"], 0, 3, b"deleted", None), t["dlq"], "empty", "no value"),
                     acked.set)
        assert acked.wait(30), "the dead letter was acknowledged"
    finally:
        sink.close()
    (record,) = read_all(kafka_broker.bootstrap, t["dlq"], 1)
    assert record.key == b"deleted" and record.value is None and dict(record.headers)["error.reason"] == b"empty"


@pytest.mark.slow
def test_sigterm_with_the_broker_gone_still_ends_within_the_drain_timeout(small_artifact, tmp_path, kafka_client):
    """The broker dies at the moment of SIGTERM: the process still ends in time and says what it left."""
    from stream.embedded_broker import EmbeddedBroker, free_port
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    t = {"input": "images", "output": "labels", "dlq": "dead", "group": "gone"}
    broker.create_topics({"images": 2, "labels": 1, "dead": 1})
    # a backlog far larger than the 30 results awaited: the broker dies with work in flight
    produce(broker.bootstrap, "images", images(0, 300, image="jpeg_chelsea"))
    log, port = tmp_path / "service.log", free_port()
    drain = 1   # the whole shutdown is bounded by drain + 5 s (closing the clients): what is checked
    service = start_service(broker, t, small_artifact, log, drain_timeout_s=drain, metrics_port=port,
                            kafka_client=kafka_client, session_timeout_ms=SESSION_MS)
    try:
        wait_finished(service, port, 30, log)
        # at once: a graceful stop took tansu 3.5 s, in which the service finished and committed all 1000
        broker.kill()
        service.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = service.wait(drain + 5 + 15)
        except subprocess.TimeoutExpired:
            service.kill()
            raise AssertionError("still running long after SIGTERM:\n" + log.read_text()[-3000:]) from None
        took = time.monotonic() - started
    finally:
        broker.stop()
    text = log.read_text()
    assert took <= drain + 5 + 5, f"took {took:.1f} s"
    # "shutdown did not finish" after the signal, or "closing did not finish" where the lost broker ended the
    # run first (the member evicted when its heartbeats went unanswered): the same deadline, the same account
    assert ("did not finish within" in text and "messages unfinished" in text) or \
        ("left for redelivery" in text and code == 0), text[-3000:]
    assert "Traceback" not in text


def test_results_the_broker_can_never_take_are_dead_lettered_not_retried_forever(kafka_broker, small_artifact, caplog,
                                                                                 kafka_client):
    from plugins.encoders import JsonEncoder

    from .test_stream_units import _StrEncoder
    t = names(kafka_broker, partitions=1)
    good = good_images()
    produce(kafka_broker.bootstrap, t["input"], [(k.encode(), v) for k, v in good.items()])
    cfg = StreamConfig(kafka_broker.bootstrap, (t["input"],), t["output"], t["dlq"], small_artifact,
                       group_id=t["group"], metrics_port=0, max_batch=4, commit_interval_ms=100,
                       session_timeout_ms=SESSION_MS, kafka_client=kafka_client)
    svc = build(cfg, model=stand_in(), encoder=_StrEncoder(JsonEncoder()))
    with caplog.at_level("WARNING"):
        stats = svc.run(count=len(good), timeout=120)
    assert stats.finished == len(good)
    dead = read_all(kafka_broker.bootstrap, t["dlq"], len(good))
    assert {r.key.decode(): r.value for r in dead} == good, "every input dead-lettered once, original bytes"
    assert {dict(r.headers)["error.reason"] for r in dead} == {b"publish_error"}
    assert sum(committed(kafka_broker.bootstrap, t["group"], t["input"]).values()) == len(good)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, "said once, not once per message"


def test_kafka_sink_stops_when_even_a_dead_letter_is_refused(kafka_broker):
    import threading

    from stream.kafka_sink import KafkaSink
    t = names(kafka_broker, partitions=1)
    sink = KafkaSink(kafka_broker.bootstrap, {})
    refused, acked = [], threading.Event()
    try:
        from stream.records import Outgoing
        sink.publish(Outgoing(t["output"], b"k", "text, not bytes", []), acked.set, refused.append)
        assert [type(e).__name__ for e in refused] == ["TypeError"] and sink.failure is None
        sink.publish(Outgoing(t["dlq"], b"k", "text, not bytes", []), acked.set)
        assert sink.failure is not None and "cannot publish even a dead letter" in str(sink.failure)
        sink.publish(Outgoing(t["output"], b"k", b"fine", []), acked.set)
        assert acked.wait(30) and sink.pending_retries() == 0
    finally:
        sink.close()


class _AnsweringProducer:
    """A kafka-python producer the broker answers with ``answers`` in turn, the last for every record after
    (an error, or None: accepted), as kafka-python hands an answer back: a future already done. tansu checks
    neither acks nor ACLs, nor bumps an idempotent producer's epoch, so the answers are made here."""

    def __init__(self, *answers: BaseException | None) -> None:
        self.answers = list(answers)

    def send(self, *_args: object, **_kwargs: object) -> object:
        from kafka.future import Future

        class Answered(Future):   # kafka-python's FutureRecordMetadata
            def get(self, timeout: float | None = None) -> object:
                if self.exception is not None:
                    raise self.exception
                return self.value
        error = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return Answered().failure(error) if error is not None else Answered().success(None)

    def init_transactions(self) -> None:
        pass

    def begin_transaction(self) -> None:
        pass

    def abort_transaction(self) -> None:
        pass

    def flush(self, *_args: object, **_kwargs: object) -> None:
        pass

    def close(self, *_args: object, **_kwargs: object) -> None:
        pass


@pytest.mark.parametrize("transactional", [False, True], ids=["at-least-once", "exactly-once"])
@pytest.mark.parametrize("error, said", [
    ("InvalidRequiredAcksError", "InvalidRequiredAcks"),
    ("TopicAuthorizationFailedError", "grant this service's principal WRITE on"),
    ("UnsupportedCompressionTypeError", "UnsupportedCompressionType"),
])
def test_a_publish_error_only_the_operator_can_fix_stops_the_member_and_dead_letters_nothing(
        kafka_broker, error, said, transactional):
    """An error about the settings, not the record, would come back for every record: dead-lettering each
    input would empty the stream into the dead-letter topic, and exactly once each redone unit would fail
    alike for ever. The sink stops the member instead, in one line naming the error (and for an ACL what
    to grant), and the record stays unacknowledged (its input uncommitted, redelivered after the fix)."""
    import kafka.errors

    from stream.kafka_sink import KafkaSink

    class Sink(KafkaSink):   # its producers, and the one it resends a failed record on alone
        def _new_producer(self) -> object:
            return _AnsweringProducer(getattr(kafka.errors, error)("the broker's answer"))

        def _new_probe(self) -> object:
            return self._new_producer()
    t = names(kafka_broker, partitions=1)
    sink = Sink(kafka_broker.bootstrap, {}, transactional_id=f"tx-{t['group']}" if transactional else None)
    assert_stops_without_dead_letter(sink, t["output"], said)


def test_exactly_once_sends_timed_out_in_an_outage_keep_the_commit_an_outage(kafka_broker):
    """Sends that time out while the brokers are away doom the open transaction; its commit then fails as
    an outage (retried for as long as the outage lasts, not counted toward --fail-after-s), not as a
    transient error that would end a member through a two-minute broker outage."""
    import threading

    from kafka.errors import KafkaTimeoutError

    from stream.errors import BrokerUnavailable
    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing

    class Sink(KafkaSink):
        def _new_producer(self) -> object:
            return _AnsweringProducer(KafkaTimeoutError("Batch for out-0 has expired"))
    t = names(kafka_broker, partitions=1)
    sink = Sink(kafka_broker.bootstrap, {}, transactional_id=f"tx-{t['group']}")
    acked = threading.Event()
    try:
        sink.publish(Outgoing(t["output"], b"k", b"v", []), acked.set)
        assert acked.wait(30), "a failed send in the transaction dooms the unit (acknowledged, to be redone)"
        with pytest.raises(BrokerUnavailable, match="a send in the transaction failed"):
            sink.commit_transaction({(t["input"], 0): 1}, None)
        assert sink.failure is None
    finally:
        sink.close()


def test_exactly_once_a_producer_fenced_during_a_unit_says_fenced(kafka_broker):
    """A send answered ProducerFenced (a successor took the transactional id) dooms the unit, and the commit
    point says the member was fenced rather than that a restart fixes it (the abort would fail too)."""
    import threading

    from kafka.errors import KafkaTimeoutError, ProducerFencedError

    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    class Sink(KafkaSink):
        def _new_producer(self) -> object:
            return _AnsweringProducer(KafkaTimeoutError("expired"), ProducerFencedError("a successor took the id"))
    t = names(kafka_broker, partitions=1)
    sink = Sink(kafka_broker.bootstrap, {}, transactional_id=f"tx-{t['group']}")
    acked = threading.Semaphore(0)
    try:
        for value in (b"first", b"second"):   # a timeout first: the fencing after it is still the one said
            sink.publish(Outgoing(t["output"], b"k", value, []), acked.release)
            assert acked.acquire(timeout=30)
        with pytest.raises(KafkaPermanent, match="fenced"):
            sink.commit_transaction({(t["input"], 0): 1}, None)
    finally:
        sink.close()


def test_an_idempotent_producers_epoch_bump_is_no_reason_to_stop(kafka_broker):
    """At least once the producer is idempotent: after an UnknownProducerId it bumps its epoch, and a batch
    the broker took under the old epoch fails with InvalidProducerEpoch (PERMANENT in the table, but
    nothing the operator must fix). The record is sent again alone and acknowledged; the member goes on."""
    import threading

    from kafka.errors import InvalidProducerEpochError

    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing

    class Sink(KafkaSink):
        def _new_producer(self) -> object:
            return _AnsweringProducer(InvalidProducerEpochError("sent under the old epoch"))

        def _new_probe(self) -> object:
            return _AnsweringProducer(None)
    sink = Sink(kafka_broker.bootstrap, {})
    acked, refused = threading.Event(), []
    try:
        sink.publish(Outgoing(names(kafka_broker, partitions=1)["output"], b"k", b"v", []), acked.set,
                     refused.append)
        assert acked.wait(30), f"not acknowledged: {sink.failure}"
        assert sink.failure is None and refused == []
    finally:
        sink.close()


def test_embedded_broker_deletes_topics_with_their_records(kafka_broker):
    """The benchmark drops every run's topics so the in-memory broker does not grow run by run: a
    deleted topic is gone, and one made again under its name starts empty."""
    from kafka.admin import KafkaAdminClient
    t = names(kafka_broker, partitions=1)
    produce(kafka_broker.bootstrap, t["input"], [(b"k", b"before")])
    assert len(read_all(kafka_broker.bootstrap, t["input"], 1)) == 1
    kafka_broker.delete_topics([t["input"], t["output"]])
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    try:
        left = set(admin.list_topics())
    finally:
        admin.close()
    assert t["input"] not in left and t["output"] not in left and t["dlq"] in left
    kafka_broker.create_topics({t["input"]: 1})
    produce(kafka_broker.bootstrap, t["input"], [(b"k", b"after")])
    assert [r.value for r in read_all(kafka_broker.bootstrap, t["input"], 1, timeout=10)] == [b"after"]


def test_a_typo_in_the_input_topic_is_not_created_and_stays_not_ready_until_it_exists(kafka_broker, small_artifact,
                                                                                      tmp_path):
    """tansu creates a topic that a metadata request names with auto-creation allowed, and kafka-python
    3.0.12 allowed it whatever the consumer said: a typo'd input topic came into being and looked healthy."""
    from kafka.admin import KafkaAdminClient

    from stream.embedded_broker import free_port
    t = names(kafka_broker)
    typo = t["input"] + "-typo"
    metrics, log = free_port(), tmp_path / "service.log"
    service = start_service(kafka_broker, {**t, "input": typo}, small_artifact, log, metrics_port=metrics,
                            log_level="DEBUG", session_timeout_ms=SESSION_MS)
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    try:
        # Consuming for a while (the old code had joined its group and made the topic within 3 s of it):
        # four looks, a second apart, span 3 s.
        wait_until(lambda: log.read_text().count("not joining group") >= 4 or typo in admin.list_topics(),
                   "the member to look four times", timeout=90, step=0.3)
        assert typo not in admin.list_topics(), "the typo'd topic was created"
        wait_until(lambda: "does not exist" in readyz(metrics)[1], "/readyz to name the missing topic",
                   timeout=30, step=0.3)
        assert readyz(metrics)[0] == 503
        kafka_broker.create_topics({typo: 1})
        produce(kafka_broker.bootstrap, typo, [(b"late", good_images()["jpeg_rocket"])])
        wait_for_outputs(kafka_broker, t["output"], 1)
        # the topics are looked at every 3 s for /readyz, every second for joining: ready may come later
        wait_until(lambda: readyz(metrics)[0] == 200, "/readyz to answer 200 once the topic exists",
                   timeout=30, step=0.3)
    finally:
        admin.close()
        stop(service, log)
    lines = [line.split(": ", 1)[-1] for line in log.read_text().splitlines()]
    assert "every input topic exists" in lines and "ready" in lines
    assert lines.index("ready") > lines.index("every input topic exists"), "ready only once the topic exists"


@pytest.mark.kafka
def test_kafka_python_without_the_idempotent_write_acl_stops_the_member_instead_of_a_producer_per_record(
        kafka_broker, monkeypatch):
    """kafka-python wraps the broker's ClusterAuthorizationFailed at InitProducerId (no IdempotentWrite ACL) in a
    plain KafkaError, which read as transient: every record made a new producer, fatal at once, and went out
    alone on the probe (400 producers for 400 records), and the member never stopped. The broker's answer is
    rewritten here (tansu checks no ACLs); the rest is real kafka-python against tansu."""
    from kafka.producer import transaction_manager

    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    answer = transaction_manager.InitProducerIdHandler.handle_response

    def refused(handler, response):
        response.error_code = 31   # CLUSTER_AUTHORIZATION_FAILED
        return answer(handler, response)
    monkeypatch.setattr(transaction_manager.InitProducerIdHandler, "handle_response", refused)
    t, made = names(kafka_broker, partitions=1), []

    class Sink(KafkaSink):
        def _new_producer(self):
            made.append(1)
            return super()._new_producer()
    sink = Sink(kafka_broker.bootstrap, {})
    try:
        for i in range(20):
            sink.publish(Outgoing(t["output"], b"k", b"%d" % i, []), lambda: None, lambda _exc: None)
            time.sleep(0.01)
        deadline = time.monotonic() + 30
        while sink.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.failure is not None, f"{len(made)} producers made, the member still going"
        assert "IDEMPOTENT_WRITE" in str(sink.failure) and len(made) == 1, (len(made), str(sink.failure))
    finally:
        sink.close()


@pytest.mark.kafka
def test_kafka_python_records_queued_behind_ones_it_gave_up_on_do_not_overtake_them(tmp_path):
    """kafka-python expires batches by age, one partition at a time, and sends the later ones once the broker
    is back, ahead of the expired ones' resend: the log read m-1 m3 m0 m1 m2 m4 m5. What the producer has not
    sent yet is taken back when a record is given up on, and goes back in its place."""
    from stream.embedded_broker import EmbeddedBroker, free_port
    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    port = free_port()
    proxy = FlakyProxy(port, delay_s=0.0)
    broker = EmbeddedBroker(port=port, advertised_port=proxy.port, log_path=tmp_path / "tansu.log").start()
    try:
        broker.create_topics({"out": 1})
        sink = KafkaSink(f"127.0.0.1:{proxy.port}", {"delivery_timeout_ms": 4000, "request_timeout_ms": 1000,
                                                     "batch_size": 100, "reconnect_backoff_max_ms": 200})
        acked = threading.Semaphore(0)
        try:
            sink.publish(Outgoing("out", b"k", b"m-1", []), acked.release)
            assert acked.acquire(timeout=30)
            proxy.down = True   # the broker away
            proxy.cut()
            for i in range(6):   # one a second: each in a batch of its own; m0 and m1 expire before m5 is in
                sink.publish(Outgoing("out", b"k", b"m%d" % i, []), acked.release)
                time.sleep(1.0)
            proxy.down = False
            assert all(acked.acquire(timeout=60) for _ in range(6))
        finally:
            sink.close()
        values = [r.value for r in read_all(broker.bootstrap, "out", 7, timeout=30)]
    finally:
        proxy.close()
        broker.kill()
    assert list(dict.fromkeys(values)) == [b"m-1", *[b"m%d" % i for i in range(6)]], values


def _close_while_a_producer_is_made(sink, entered: threading.Event, release: threading.Event) -> threading.Thread:
    """Once ``entered`` says a producer is being made (held until ``release``), start ``sink.close()`` on a thread
    of its own; let the making go on once close() has begun. The closing thread."""
    try:
        assert entered.wait(30), "a producer is being made"
        closing = threading.Thread(target=sink.close)
        closing.start()
        wait_until(lambda: sink._closed, "close() has begun")
    finally:
        release.set()
    return closing


def test_kafka_python_close_waits_for_a_producer_replacement_under_way_and_closes_the_new_producer(kafka_broker):
    """A fatal producer is replaced on the retry thread; close() during that replacement must close the new
    producer too, or it is left running (its IO thread, its connections) with nothing to close it."""
    from stream.kafka_sink import KafkaSink
    sink = KafkaSink(kafka_broker.bootstrap, {})
    made: list = []
    entered, release = threading.Event(), threading.Event()
    real_new = sink._new_producer

    def slow_new_producer():
        entered.set()
        release.wait(30)
        made.append(real_new())
        return made[-1]
    sink._new_producer = slow_new_producer
    replacing = threading.Thread(target=sink._replace, args=(sink._producer, "a test"))
    replacing.start()
    closing = _close_while_a_producer_is_made(sink, entered, release)
    replacing.join(30)
    closing.join(60)
    assert not closing.is_alive() and len(made) == 1
    assert made[0]._closed, "the producer made during close() was closed by it"


@pytest.mark.parametrize("transactional", [False, True])
def test_kafka_python_close_waits_for_a_probe_producer_under_way_and_closes_it(kafka_broker, monkeypatch,
                                                                              transactional):
    """A record sent alone makes its probe producer on the resending thread (exactly once, a transactional one
    whose init_transactions waits for the broker); close() during that must close the probe too, or it is left
    running with nothing to close it. The probe's send then meets it closed (held back here until close() is
    done, the order a loaded machine gave once in CI): exactly once, its abort_transaction on the closed producer
    waited for ever, and the resending thread with it."""
    import kafka

    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    t = names(kafka_broker, partitions=1)
    sink = KafkaSink(kafka_broker.bootstrap, {}, transactional_id=f"tx-probe-{t['group']}" if transactional else None,
                     transaction_calls_s=5)
    made: list = []
    entered, release, closed = threading.Event(), threading.Event(), threading.Event()
    real = kafka.KafkaProducer

    def slow_producer(**settings):
        entered.set()
        release.wait(30)
        made.append(real(**settings))
        send = made[-1].send

        def send_once_closed(*args, **kwargs):
            closed.wait(60)
            return send(*args, **kwargs)
        made[-1].send = send_once_closed
        return made[-1]
    monkeypatch.setattr(kafka, "KafkaProducer", slow_producer)
    alone = sink._transact_alone if transactional else sink._send_alone
    probing = threading.Thread(target=alone, args=(Outgoing(t["output"], b"k", b"v", []),))
    probing.start()
    try:
        closing = _close_while_a_producer_is_made(sink, entered, release)
        closing.join(60)
    finally:
        closed.set()
        probing.join(60)
    assert not closing.is_alive() and not probing.is_alive() and len(made) == 1
    assert made[0]._closed, "the probe made during close() was closed by it"


def test_kafka_python_a_probe_abort_the_coordinator_never_answers_stops_the_member(kafka_broker, monkeypatch):
    """kafka-python's abort_transaction waits on the coordinator without a bound; the sink's bound left its thread
    waiting for ever, one more for each record sent alone while the coordinator stayed silent. As with the main
    producer's unanswered transaction calls, the member now stops (a restart makes new producers)."""
    import kafka

    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    t = names(kafka_broker, partitions=1)
    sink = KafkaSink(kafka_broker.bootstrap, {}, transactional_id=f"tx-silent-{t['group']}", transaction_calls_s=0.3)
    real = kafka.KafkaProducer
    never = threading.Event()

    def silent_coordinator(**settings):
        probe = real(**settings)
        probe.abort_transaction = lambda: never.wait()
        return probe
    monkeypatch.setattr(kafka, "KafkaProducer", silent_coordinator)
    try:
        assert sink._transact_alone(Outgoing(t["output"], b"k", b"v", [])) is None, "the record itself was accepted"
        assert sink.failure is not None and "did not answer within 0.3 s" in str(sink.failure), sink.failure
    finally:
        never.set()
        sink.close()


@pytest.mark.parametrize("transactional", [False, True])
def test_kafka_python_a_record_larger_than_max_request_size_is_refused_at_once_not_probed_as_a_broker_refusal(
        kafka_broker, caplog, transactional):
    """send() itself refuses a record over max_request_size: no broker saw it and no resend can change it, so it
    is refused at once (its dead letter follows) without a probe producer or a doomed transaction."""
    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    t = names(kafka_broker, partitions=1)
    sink = KafkaSink(kafka_broker.bootstrap, {}, max_request_size=2_000,
                     transactional_id=f"tx-size-{t['group']}" if transactional else None)
    refused: list[BaseException] = []
    try:
        with caplog.at_level(logging.INFO, logger="stream"):
            sink.publish(Outgoing(t["output"], b"k", b"x" * 10_000, []), lambda: None, refused.append)
            wait_until(lambda: refused, "the record was refused")
        assert "MessageSizeTooLarge" in type(refused[0]).__name__ and sink.failure is None
        assert sink._probe is None, "no probe producer was made for a refusal send() made itself"
        assert "resending it alone" not in caplog.text, caplog.text
        assert "is larger than this producer's max_request_size: refused" in caplog.text, caplog.text
        if transactional:
            assert sink._doomed is None, "the open transaction is not doomed by a record that never entered it"
    finally:
        sink.close()
