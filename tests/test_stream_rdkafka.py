"""The librdkafka connector (``--kafka-client librdkafka``): its error table, its settings, and,
against the real broker, its source and sink behind the service's ports."""
from __future__ import annotations

import threading
import time

import pytest

confluent_kafka = pytest.importorskip("confluent_kafka")

from engine_build.errors import ConfigError  # noqa: E402
from stream import errors, rdkafka_common, rdkafka_io, rdkafka_sink  # noqa: E402
from stream.config import StreamConfig, build_parser, from_args  # noqa: E402
from stream.errors import BrokerUnavailable, KafkaPermanent, KafkaTransient  # noqa: E402
from stream.records import Outgoing  # noqa: E402

from .kafka_helpers import assert_stops_without_dead_letter, names, produce, read_all  # noqa: E402
from .rdkafka_mock import mock_cluster  # noqa: E402

KafkaError = confluent_kafka.KafkaError
# a group join waits about half the session timeout on tansu; librdkafka heartbeats on its own threads
SESSION_MS = 2000


@pytest.mark.parametrize("code, expected", [
    ("_TRANSPORT", BrokerUnavailable), ("_ALL_BROKERS_DOWN", BrokerUnavailable),
    ("_MSG_TIMED_OUT", BrokerUnavailable), ("COORDINATOR_NOT_AVAILABLE", BrokerUnavailable),
    ("NOT_COORDINATOR", BrokerUnavailable), ("REQUEST_TIMED_OUT", BrokerUnavailable),
    ("REBALANCE_IN_PROGRESS", KafkaTransient), ("UNKNOWN_MEMBER_ID", KafkaTransient),
    ("OFFSET_OUT_OF_RANGE", KafkaTransient),
    ("SASL_AUTHENTICATION_FAILED", KafkaPermanent), ("_SSL", KafkaPermanent),
    ("GROUP_AUTHORIZATION_FAILED", KafkaPermanent), ("TOPIC_AUTHORIZATION_FAILED", KafkaPermanent),
    ("_BAD_COMPRESSION", KafkaPermanent), ("_BAD_MSG", KafkaPermanent), ("PRODUCER_FENCED", KafkaPermanent),
    ("MSG_SIZE_TOO_LARGE", KafkaPermanent), ("INVALID_RECORD", KafkaPermanent),
])
def test_librdkafka_errors_map_into_the_project_tree(code, expected):
    error = KafkaError(getattr(KafkaError, code), "from the test")
    translated = errors.translate(confluent_kafka.KafkaException(error), "consuming", "g")
    assert type(translated) is expected
    assert code.lstrip("_") in str(translated) and "\n" not in str(translated)


@pytest.mark.parametrize("code", ["MSG_SIZE_TOO_LARGE", "INVALID_RECORD", "POLICY_VIOLATION", "RECORD_LIST_TOO_LARGE",
                                  "_INVALID_DIFFERENT_RECORD"])
def test_records_the_broker_can_never_take_are_refusals(code):
    assert errors.librdkafka_kind(KafkaError(getattr(KafkaError, code))) == errors.REFUSED


def test_a_topic_acl_is_the_operators_to_fix_not_one_records_refusal():
    """It refuses every record sent to the topic: publishing stops the member, nothing is dead-lettered."""
    assert errors.librdkafka_kind(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)) == errors.PERMANENT


def test_every_code_in_the_table_is_one_librdkafka_has():
    assert [n for n in errors.LIBRDKAFKA if not hasattr(KafkaError, n)] == []


def test_a_fatal_error_not_in_the_table_is_permanent():
    error = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "seq", fatal=True)
    assert errors.librdkafka_kind(error) == errors.PERMANENT
    assert errors.librdkafka_kind(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "seq")) == errors.TRANSIENT


def _cfg(tmp_path, **extra) -> StreamConfig:
    return StreamConfig("localhost:9092", ("in",), "out", "dlq", tmp_path, **extra)


def test_kafka_client_flag_env_twin_and_default(tmp_path):
    assert _cfg(tmp_path).kafka_client == "kafka-python"
    base = ["--bootstrap-servers", "h:1", "--input-topic", "i", "--output-topic", "o",
            "--dead-letter-topic", "d", "--artifact", str(tmp_path)]
    parser = build_parser("stream", "")
    assert from_args(parser.parse_args(base), {"STREAM_KAFKA_CLIENT": "librdkafka"}).kafka_client == "librdkafka"
    assert from_args(parser.parse_args(base + ["--kafka-client", "librdkafka"]), {}).kafka_client == "librdkafka"
    with pytest.raises(ConfigError, match="--kafka-client rdkafka: choose from kafka-python, librdkafka"):
        _cfg(tmp_path, kafka_client="rdkafka")


def test_tls_and_sasl_settings_keep_their_meaning(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    cfg = _cfg(tmp_path, security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u",
               sasl_password="p", ssl_cafile=str(ca))
    assert rdkafka_common.client_settings(cfg) == {
        "security.protocol": "sasl_ssl", "ssl.ca.location": str(ca), "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "u", "sasl.password": "p"}
    # librdkafka knows every name: it reads the CA file (not a certificate here) and says which setting failed
    with pytest.raises(KafkaPermanent, match="ssl.ca.location"):
        rdkafka_sink.RdKafkaSink("localhost:1", rdkafka_common.client_settings(cfg))
    plain = _cfg(tmp_path, security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u",
                 sasl_password="p")
    rdkafka_sink.RdKafkaSink("localhost:1", rdkafka_common.client_settings(plain)).close()


def test_a_full_prefetch_queue_is_looked_at_again_within_10_ms_not_a_second(tmp_path):
    """Each backpressure hold fills librdkafka's prefetch queue (bounded by the byte budget); once full, it
    puts off the next fetch by ``fetch.queue.backoff.ms``, 1 s by default, and after each hold the pipeline
    ran dry for up to that long: one process fed a GPU stand-in 25-30 % slower. Whatever the fetch wait
    (raised to cut empty fetches, or 0). The settings must also be ones librdkafka takes."""
    from confluent_kafka import Consumer
    for wait in (0, 10, 500):
        cfg = _cfg(tmp_path, fetch_max_wait_ms=wait)
        settings = rdkafka_io.consumer_settings(cfg)
        assert settings["fetch.queue.backoff.ms"] == 10 and settings["fetch.wait.max.ms"] == wait
    assert settings["queued.max.messages.kbytes"] * 1024 <= cfg.max_in_flight_bytes, "within the byte budget"
    assert settings["fetch.max.bytes"] <= cfg.max_in_flight_bytes // 8, "one fetch a small share of it too"
    Consumer(settings).close()


# ---- against the real broker ----

class Handler:
    """A RebalanceHandler recording what the source asked, with work in flight until ``done`` is set."""

    def __init__(self, drain_timeout_s: float = 10.0, offsets: dict | None = None) -> None:
        self.drain_timeout_s, self.transactions = drain_timeout_s, None
        self.done, self.offsets = threading.Event(), offsets or {}
        self.asked = threading.Event()   # set once a drain has asked whether the work is done
        self.events: list = []

    def drained(self, partitions):
        done = self.done.is_set()
        self.asked.set()
        return done

    def committable(self, partitions):
        return {p: o for p, o in self.offsets.items() if p in partitions}

    def committed(self, offsets):
        self.events.append(("committed", offsets))

    def released(self, partitions, lost):
        self.events.append(("released", list(partitions), lost))

    def assigned(self, partitions):
        self.events.append(("assigned", list(partitions)))

    def fail(self, failure):
        self.events.append(("fail", failure))


def _poll_until(source, predicate, timeout: float = 60.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while not predicate(got) and time.monotonic() < deadline:
        got += source.poll(0.2, 100)
    assert predicate(got), f"only {len(got)} records within {timeout} s"
    return got


@pytest.mark.kafka
def test_source_reads_in_partition_order_pauses_commits_what_it_is_given_and_knows_missing_topics(
        kafka_broker, tmp_path):
    t = names(kafka_broker, partitions=2)
    items = [(f"k{i % 4}".encode(), f"v{i}".encode()) for i in range(40)]
    produce(kafka_broker.bootstrap, t["input"], items)
    cfg = StreamConfig(kafka_broker.bootstrap, (t["input"], "never-made-" + t["group"]), t["output"], t["dlq"],
                       tmp_path, group_id=t["group"], session_timeout_ms=SESSION_MS, kafka_client="librdkafka")
    source = rdkafka_io.RdKafkaSource(cfg, Handler(drain_timeout_s=0.5))   # its close leaves the work uncommitted
    try:
        got = _poll_until(source, lambda got: len(got) >= 40)
        assert len(got) == 40, "each record once"
        for partition in (0, 1):
            offsets = [m.offset for m in got if m.partition == partition]
            assert offsets == sorted(offsets) == list(range(len(offsets)))
        assert source.missing_topics() == ["never-made-" + t["group"]]
        assert source.missing_topics() == ["never-made-" + t["group"]], "asking did not create it"
        ends = source.end_offsets()
        assert sum(ends.values()) == 40
        source.commit({(t["input"], 0): 1}, wait=True)   # only what it is handed: not the whole position
        produce(kafka_broker.bootstrap, t["input"], items[:4])
        source.pause_all()
        assert sum(len(source.poll(0.3, 100)) for _ in range(5)) == 0, "paused: nothing fetched"
        source.resume_all()
        _poll_until(source, lambda got: len(got) >= 4)
        assert source.reachable()
    finally:
        source.close()
    from .kafka_helpers import committed
    assert committed(kafka_broker.bootstrap, t["group"], t["input"]) in ({0: 1, 1: None}, {0: 1})


@pytest.mark.kafka
def test_a_delivery_callback_that_raises_does_not_stop_the_reports_after_it(kafka_broker):
    """confluent-kafka's poll raises what a delivery callback raised; the thread serving the reports said it
    and went on: before, it ended, and no later record was ever acknowledged."""
    t = names(kafka_broker, partitions=1)
    sink = rdkafka_sink.RdKafkaSink(kafka_broker.bootstrap, {})
    acked = threading.Semaphore(0)

    def boom() -> None:
        raise RuntimeError("a bug in what runs on an acknowledgement")
    try:
        sink.publish(Outgoing(t["output"], b"0", b"v", []), boom)
        for i in range(1, 4):
            sink.publish(Outgoing(t["output"], str(i).encode(), b"v", []), acked.release)
        for _ in range(3):
            assert acked.acquire(timeout=30), "every later record acknowledged"
    finally:
        sink.close()


@pytest.mark.kafka
def test_partitions_paused_before_a_rebalance_are_consumed_again_when_they_come_back(kafka_broker, tmp_path):
    """librdkafka keeps a partition's pause through an eager revocation and the next assignment. The service
    resumes once its in-flight work drains, which a revocation does: between the revocation and the next
    assignment the assignment is empty, the resume reached no partition, and the partitions came back
    paused for good (the member consumed nothing more, with nothing in flight to call it stuck)."""
    from confluent_kafka import Consumer

    from stream.rdkafka_io import HOLD_BEFORE_PAUSE_S
    t = names(kafka_broker, partitions=2)
    produce(kafka_broker.bootstrap, t["input"], [(str(i).encode(), b"v") for i in range(400)])
    cfg = StreamConfig(kafka_broker.bootstrap, (t["input"],), t["output"], t["dlq"], tmp_path, group_id=t["group"],
                       session_timeout_ms=SESSION_MS, kafka_client="librdkafka")
    handler = Handler()
    handler.done.set()   # nothing in flight: each revocation drains at once
    source = rdkafka_io.RdKafkaSource(cfg, handler)
    other = Consumer({**rdkafka_io.consumer_settings(cfg), "client.id": "other"})
    try:
        _poll_until(source, lambda got: len(got) >= 10)
        source.pause_all()
        source._held_since = time.monotonic() - HOLD_BEFORE_PAUSE_S   # held that long already: pause for real
        assert source.poll(0.1, 100) == []
        other.subscribe([t["input"]])   # a member joins: every partition is revoked, then shared out
        resumed, deadline = False, time.monotonic() + 60
        while time.monotonic() < deadline:
            other.poll(0.05)
            assert source.poll(0.05, 100) == [] or resumed, "paused: it serves the rebalance, takes nothing"
            if not resumed and any(e[0] == "released" for e in handler.events):
                source.resume_all()   # drained: the service resumes now, with nothing assigned
                resumed = True
            if resumed and handler.events[-1][0] == "assigned" and handler.events[-1][1]:
                break
        assert resumed and handler.events[-1][0] == "assigned", handler.events
        _poll_until(source, lambda got: len(got) >= 1, timeout=30)
    finally:
        other.close()
        source.close()


@pytest.mark.kafka
def test_missing_topics_answers_from_the_probe_thread_while_the_poll_thread_consumes(kafka_broker, tmp_path):
    """The service asks from its broker-probe thread; the consumer's own list_topics waits while another
    thread is inside consume(), which froze /readyz."""
    t = names(kafka_broker, partitions=1)
    cfg = StreamConfig(kafka_broker.bootstrap, (t["input"], "never-made-" + t["group"]), t["output"], t["dlq"],
                       tmp_path, group_id=t["group"], session_timeout_ms=SESSION_MS, kafka_client="librdkafka")
    handler = Handler()
    handler.done.set()
    source = rdkafka_io.RdKafkaSource(cfg, handler)
    stop, answers = threading.Event(), []
    polling = threading.Thread(target=lambda: [source.poll(0.5, 10) for _ in iter(stop.is_set, True)], daemon=True)
    try:
        polling.start()
        probe = threading.Thread(target=lambda: answers.append(source.missing_topics()), daemon=True)
        probe.start()
        probe.join(20)
        assert answers == [["never-made-" + t["group"]]], "the probe thread got no answer within 20 s"
    finally:
        stop.set()
        polling.join(10)
        source.close()


@pytest.mark.kafka
def test_revocation_drains_on_the_poll_thread_then_commits_before_another_member_takes_over(
        kafka_broker, tmp_path):
    """librdkafka revokes from consume(): the drain blocks there until the work is done (the handler
    says so from another thread) and the commit lands before the partition moves."""
    t = names(kafka_broker, partitions=1)
    produce(kafka_broker.bootstrap, t["input"], [(b"k", b"v")] * 5)
    cfg = StreamConfig(kafka_broker.bootstrap, (t["input"],), t["output"], t["dlq"], tmp_path, group_id=t["group"],
                       session_timeout_ms=SESSION_MS, kafka_client="librdkafka")
    partition = (t["input"], 0)
    first = Handler(drain_timeout_s=20, offsets={partition: 5})
    source = rdkafka_io.RdKafkaSource(cfg, first)
    second_source = None
    try:
        _poll_until(source, lambda got: len(got) >= 5)
        second = Handler()
        second.done.set()   # nothing in flight when it closes
        second_source = rdkafka_io.RdKafkaSource(cfg, second)
        # the work finishes while the revocation waits: once the drain has asked and been told no
        threading.Thread(target=lambda: first.asked.wait(60) and first.done.set(), daemon=True).start()
        stop = threading.Event()
        threading.Thread(target=lambda: [second_source.poll(0.2, 10) for _ in iter(stop.is_set, True)],
                         daemon=True).start()
        deadline = time.monotonic() + 60
        while not any(e[0] == "released" for e in first.events) and time.monotonic() < deadline:
            source.poll(0.2, 10)
        stop.set()
        assert first.events[-2:] == [("committed", {partition: 5}), ("released", [partition], False)]
    finally:
        source.close()
        if second_source is not None:
            second_source.close()


@pytest.mark.kafka
def test_sink_acknowledges_refuses_for_good_and_stops_on_a_refused_dead_letter(kafka_broker):
    t = names(kafka_broker, partitions=1)
    sink = rdkafka_sink.RdKafkaSink(kafka_broker.bootstrap, {}, max_request_size=1 << 20, compression_type="zstd")
    acked, refused = threading.Semaphore(0), []
    try:
        for i in range(20):
            sink.publish(Outgoing(t["output"], b"k", f"r{i}".encode(), [("h", b"1")]), acked.release,
                         refused.append)
        assert all(acked.acquire(timeout=30) for _ in range(20))
        big = b"x" * (2 << 20)
        sink.publish(Outgoing(t["output"], b"big", big, []), acked.release, refused.append)
        assert [errors.librdkafka_name(errors.librdkafka_error(e)) for e in refused] == ["MSG_SIZE_TOO_LARGE"]
        assert sink.failure is None and sink.pending_retries() == 0
        sink.publish(Outgoing(t["dlq"], b"big", big, []), acked.release)
        assert sink.failure is not None and "cannot publish even a dead letter" in str(sink.failure)
        assert sink.flush(10)
    finally:
        sink.close()
    records = read_all(kafka_broker.bootstrap, t["output"], 20)
    assert [r.value for r in records] == [f"r{i}".encode() for i in range(20)], "in order, once each"


class _RefusingProducer:
    """A librdkafka producer the broker answers with error ``code`` for every record, as librdkafka hands
    that answer back: in the record's delivery report, served by a later ``poll``. tansu checks neither
    acks nor ACLs, so the answer is made here; the rest (transactions included) is a real producer's."""

    def __init__(self, real: object, code: int, answers: list[int] | None = None) -> None:
        """``answers``: how many more records get the error, shared by the producers a sink makes (the
        rest go to the real producer); None: every record."""
        self._real, self._code, self._reports, self._answers = real, code, [], answers

    def produce(self, *args: object, on_delivery: object = None, **kwargs: object) -> None:
        if self._answers is not None:
            if not self._answers[0]:
                self._real.produce(*args, on_delivery=on_delivery, **kwargs)
                return
            self._answers[0] -= 1
        self._reports.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        reports, self._reports = self._reports, []
        for report in reports:
            report(KafkaError(self._code), None)
        return len(reports) or self._real.poll(timeout)

    def __len__(self) -> int:
        return len(self._reports) + len(self._real)   # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


@pytest.mark.kafka
def test_a_record_librdkafka_gave_up_on_is_not_overtaken_by_later_ones(kafka_broker):
    """A record whose delivery failed (timed out, as after an outage) is sent again before every record
    handed over after the failure: librdkafka keeps order only while it retries on its own. Before, the
    record was published again after a backoff of its own and the later ones went ahead of it."""
    from confluent_kafka import KafkaError

    class Sink(rdkafka_sink.RdKafkaSink):
        def _new_producer(self) -> object:
            return _RefusingProducer(super()._new_producer(), KafkaError._MSG_TIMED_OUT, answers)
    answers = [1]
    t = names(kafka_broker, partitions=1)
    failed = threading.Event()
    sink = Sink(kafka_broker.bootstrap, {}, on_retry=failed.set)
    acked = threading.Semaphore(0)
    try:
        sink.publish(Outgoing(t["output"], b"0", b"v", []), acked.release)
        assert failed.wait(30), "the first delivery failed"
        for i in range(1, 6):
            sink.publish(Outgoing(t["output"], str(i).encode(), b"v", []), acked.release)
        for _ in range(6):
            assert acked.acquire(timeout=60), f"every record acknowledged: {sink.failure}"
    finally:
        sink.close()
    keys = [r.key for r in read_all(kafka_broker.bootstrap, t["output"], 6)]
    assert keys == [str(i).encode() for i in range(6)], f"in hand-over order, once each: {keys}"


@pytest.mark.kafka
@pytest.mark.parametrize("transactional", [False, True], ids=["at-least-once", "exactly-once"])
@pytest.mark.parametrize("code, said", [
    ("INVALID_REQUIRED_ACKS", "INVALID_REQUIRED_ACKS"),
    ("TOPIC_AUTHORIZATION_FAILED", "grant this service's principal WRITE on"),
])
def test_a_publish_error_only_the_operator_can_fix_stops_the_member_and_dead_letters_nothing(
        kafka_broker, code, said, transactional):
    """An error about the settings, not the record, would come back for every record: the sink stops the
    member in one line naming it instead of dead-lettering the input (or, exactly once, aborting and
    redoing the unit for ever), and leaves the record unacknowledged."""
    class Sink(rdkafka_sink.RdKafkaSink):
        def _new_producer(self) -> object:
            return _RefusingProducer(super()._new_producer(), getattr(KafkaError, code))
    t = names(kafka_broker, partitions=1)
    sink = Sink(kafka_broker.bootstrap, {}, transactional_id=f"tx-{t['group']}" if transactional else None)
    assert_stops_without_dead_letter(sink, t["output"], said)


@pytest.mark.kafka
@pytest.mark.parametrize("transactional", [False, True], ids=["at-least-once", "exactly-once"])
def test_a_fenced_producer_in_a_delivery_report_is_no_reason_to_stop(kafka_broker, transactional):
    """A delivery report's error never says fatal(), even for INVALID_PRODUCER_EPOCH (the idempotent
    producer's epoch bump, or a successor with the transactional id): PERMANENT by its code, but not the
    operator's to fix. At least once a new producer sends the record again; exactly once the unit is
    doomed, to be aborted (the commit point says "fenced" where it is). The member is not stopped."""
    answers = [1]

    class Sink(rdkafka_sink.RdKafkaSink):
        def _new_producer(self) -> object:
            return _RefusingProducer(super()._new_producer(), KafkaError.INVALID_PRODUCER_EPOCH, answers)
    t = names(kafka_broker, partitions=1)
    sink = Sink(kafka_broker.bootstrap, {}, transactional_id=f"tx-{t['group']}" if transactional else None)
    acked, refused = threading.Event(), []
    try:
        sink.publish(Outgoing(t["output"], b"k", b"v", []), acked.set, refused.append)
        assert acked.wait(30), f"not acknowledged: {sink.failure}"
        assert sink.failure is None and refused == []
    finally:
        sink.close()


@pytest.mark.kafka
@pytest.mark.parametrize("code, raised, said", [
    ("PRODUCER_FENCED", KafkaPermanent, "fenced"),
    ("_MSG_TIMED_OUT", BrokerUnavailable, "a send in the transaction failed"),
], ids=["fenced", "timed-out-in-an-outage"])
def test_exactly_once_a_failed_delivery_dooms_the_unit_and_its_commit_says_why(kafka_broker, code, raised, said):
    """A failed delivery dooms the open transaction (acknowledged, to be aborted and redone). At its commit
    point a fencing (a successor took the transactional id) stops the member saying fenced, not that a
    restart fixes it (the abort would time out); a delivery that timed out while the brokers were away keeps
    the failure an outage (retried without a limit), not a transient error counted toward --fail-after-s."""
    class Sink(rdkafka_sink.RdKafkaSink):
        def _new_producer(self) -> object:
            return _RefusingProducer(super()._new_producer(), getattr(KafkaError, code))
    t = names(kafka_broker, partitions=1)
    sink = Sink(kafka_broker.bootstrap, {}, transactional_id=f"tx-{t['group']}")
    acked = threading.Event()
    try:
        sink.publish(Outgoing(t["output"], b"k", b"v", []), acked.set)
        assert acked.wait(30), "a failed delivery in the transaction dooms the unit"
        with pytest.raises(raised, match=said):
            sink.commit_transaction({(t["input"], 0): 1}, None)
        assert sink.failure is None
    finally:
        sink.close()


@pytest.mark.kafka
def test_transactional_sink_commits_offsets_with_its_records_aborts_and_is_fenced_by_a_successor(
        kafka_broker, tmp_path):
    from .kafka_helpers import committed, read_committed
    t = names(kafka_broker, partitions=1)
    produce(kafka_broker.bootstrap, t["input"], [(b"k", b"v")] * 3)
    cfg = StreamConfig(kafka_broker.bootstrap, (t["input"],), t["output"], t["dlq"], tmp_path, group_id=t["group"],
                       session_timeout_ms=SESSION_MS, kafka_client="librdkafka", processing_guarantee="exactly-once")
    handler = Handler()
    handler.done.set()   # nothing in flight when the source closes
    source = rdkafka_io.RdKafkaSource(cfg, handler)
    sink = rdkafka_sink.RdKafkaSink(kafka_broker.bootstrap, {}, transactional_id=f"tx-{t['group']}")
    successor = None
    acked = threading.Semaphore(0)
    try:
        _poll_until(source, lambda got: len(got) >= 3)
        assert source.in_group()
        for i in range(3):
            sink.publish(Outgoing(t["output"], b"k", f"kept-{i}".encode(), []), acked.release)
        assert all(acked.acquire(timeout=30) for _ in range(3))
        sink.commit_transaction({(t["input"], 0): 3}, source.group_metadata())
        sink.publish(Outgoing(t["output"], b"k", b"aborted", []), acked.release)
        assert acked.acquire(timeout=30)
        sink.abort_transaction()
        sink.publish(Outgoing(t["output"], b"k", b"fenced", []), acked.release)
        assert acked.acquire(timeout=30)
        successor = rdkafka_sink.RdKafkaSink(kafka_broker.bootstrap, {}, transactional_id=f"tx-{t['group']}")
        with pytest.raises(KafkaPermanent, match="fenced|FENCED|EPOCH"):
            sink.commit_transaction({(t["input"], 0): 3}, source.group_metadata())
    finally:
        source.close()
        sink.close()
        if successor is not None:
            successor.close()
    assert [r.value for r in read_committed(kafka_broker.bootstrap, t["output"])] == [b"kept-0", b"kept-1", b"kept-2"]
    assert committed(kafka_broker.bootstrap, t["group"], t["input"]) == {0: 3}


class _Record:
    """A consumed record as confluent-kafka gives it."""

    def __init__(self, offset: int) -> None:
        self._offset = offset

    def error(self):
        return None

    def topic(self):
        return "in"

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def key(self):
        return None

    def value(self):
        return b"v"

    def headers(self):
        return None

    def timestamp(self):
        return (1, 0)


class _BufferedConsumer:
    """librdkafka's consumer as far as waiting goes: consume(n, timeout) waits its whole timeout unless n
    records are buffered, poll(timeout) only until the first; the time each would wait is added up, not slept."""

    def __init__(self, buffered: int) -> None:
        self.buffered = [_Record(i) for i in range(buffered)]
        self.waited = 0.0
        self.paused = False

    def assignment(self) -> list:
        return ["in[0]"]

    def pause(self, partitions: list) -> None:
        self.paused, self.buffered = True, []     # librdkafka drops what it prefetched

    def resume(self, partitions: list) -> None:
        self.paused = False

    def consume(self, num_messages: int, timeout: float) -> list:
        if len(self.buffered) < num_messages:
            self.waited += timeout
        taken, self.buffered = self.buffered[:num_messages], self.buffered[num_messages:]
        return taken

    def poll(self, timeout: float):
        if not self.buffered:
            self.waited += timeout
            return None
        return self.buffered.pop(0)


def test_a_poll_at_a_low_rate_returns_what_came_without_waiting_for_a_full_batch():
    """Three records buffered, up to 256 asked for: they are handed on at once. consume(256, 0.1) alone
    waited out its 0.1 s on every poll that found fewer than 256, in every record's latency."""
    source = _source(_BufferedConsumer(3))
    assert [m.offset for m in source.poll(0.1, 256)] == [0, 1, 2]
    assert source._consumer.waited == 0.0
    assert source.poll(0.1, 256) == [] and source._consumer.waited == pytest.approx(0.1)   # nothing there: waits


def _source(consumer: _BufferedConsumer):
    from stream.rdkafka_io import RdKafkaSource
    source = RdKafkaSource.__new__(RdKafkaSource)   # no broker: only what poll, pause and resume read
    source._consumer, source._group, source._held_since, source._paused = consumer, "g", None, False
    return source


def test_backpressure_first_holds_records_in_the_client_and_pauses_only_if_the_hold_lasts():
    """A short hold (the usual backpressure cycle) keeps librdkafka's prefetched records: pausing drops
    them, and they were fetched again after every resume. A hold that lasts pauses for real, so a poll
    serves rebalance events without taking records."""
    import time

    from stream.rdkafka_io import HOLD_BEFORE_PAUSE_S
    consumer = _BufferedConsumer(3)
    source = _source(consumer)
    source.pause_all()
    assert source.poll(0.1, 256) == [] and not consumer.paused and len(consumer.buffered) == 3
    source.resume_all()
    assert [m.offset for m in source.poll(0.1, 256)] == [0, 1, 2]
    consumer.buffered = [_Record(3)]
    source.pause_all()
    source._held_since = time.monotonic() - HOLD_BEFORE_PAUSE_S      # held that long already
    assert source.poll(0.0, 256) == [] and consumer.paused
    source.resume_all()
    assert not consumer.paused and source._held_since is None


def test_the_output_topics_are_checked_with_librdkafka_not_kafka_python(tmp_path):
    """kafka-python cannot decode librdkafka's mock cluster's answers (ApiVersions), so with the output topics
    checked by kafka-python's admin client the librdkafka service never started there."""
    with mock_cluster() as cluster:
        for topic in ("in", "out", "dlq"):
            cluster.create_topic(topic)
        cfg = StreamConfig(cluster.bootstrap, ("in",), "out", "dlq", tmp_path, kafka_client="librdkafka")
        assert rdkafka_io.ensure_output_topics(cfg) == "output topic 'out' exists; dead-letter topic 'dlq' exists"


@pytest.mark.kafka
def test_missing_output_topics_are_made_with_as_many_partitions_as_the_input(kafka_broker, tmp_path):
    """(librdkafka's mock cluster has no controller to create topics.)"""
    from confluent_kafka.admin import AdminClient
    t = names(kafka_broker, partitions=3)
    cfg = StreamConfig(kafka_broker.bootstrap, (t["input"],), t["output"] + "-new", t["dlq"], tmp_path,
                       kafka_client="librdkafka")
    made = t["output"] + "-new"
    assert rdkafka_io.ensure_output_topics(cfg) == \
        f"output topic '{made}' created with 3 partitions; dead-letter topic '{t['dlq']}' exists"
    topics = AdminClient({"bootstrap.servers": kafka_broker.bootstrap}).list_topics(timeout=10).topics
    assert len(topics[made].partitions) == 3
