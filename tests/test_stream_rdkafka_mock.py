"""The librdkafka sink, and the source's commits, against librdkafka's own mock cluster
(tests/rdkafka_mock.py): a broker that takes librdkafka's epoch bump as Kafka does, answers late, goes down,
and answers with errors a test pushes.
tansu can do none of these. The mock checks idempotent sequence numbers only for transactional producers,
so where a Kafka broker would refuse a batch sent behind a refused one out of sequence, the test pushes
that answer too."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

confluent_kafka = pytest.importorskip("confluent_kafka")

from stream import rdkafka_sink  # noqa: E402
from stream.errors import KafkaPermanent, librdkafka_code  # noqa: E402
from stream.records import Outgoing  # noqa: E402

from .rdkafka_mock import (  # noqa: E402
    ADD_PARTITIONS_TO_TXN,
    INIT_PRODUCER_ID,
    OFFSET_COMMIT,
    PRODUCE,
    MockCluster,
    mock_cluster,
)
from .waiting import wait_until  # noqa: E402

KafkaError = confluent_kafka.KafkaError


class Handed:
    """Records handed to a sink, each acknowledged or refused at most once; waited for by count."""

    def __init__(self, sink: rdkafka_sink.RdKafkaSink) -> None:
        self.sink, self.acked, self.refused = sink, [], []
        self._settled = threading.Semaphore(0)

    def publish(self, value: bytes, key: bytes | None = b"k", on_ack: Callable[[], None] | None = None) -> None:
        def ack() -> None:
            if on_ack is not None:
                on_ack()
            self.acked.append(value)
            self._settled.release()

        def refuse(_exc: BaseException) -> None:
            self.refused.append(value)
            self._settled.release()
        self.sink.publish(Outgoing("out", key, value, []), ack, refuse)

    def settle(self, count: int, timeout_s: float = 30.0) -> bool:
        """Whether ``count`` more records were acknowledged or refused, each within ``timeout_s``."""
        return all(self._settled.acquire(timeout=timeout_s) for _ in range(count))


class _CountingAlone(rdkafka_sink.RdKafkaSink):
    """Counts the records it sends alone (one round trip each), and those handed to a producer already fatal
    (produce() raised _FATAL) before its refusal's first delivery report was served: such a record is sent
    alone too, and every later one queues behind it, so there is at most one per refusal."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.alone: list[bytes | None] = []
        self.handed_to_fatal: list[bytes | None] = []
        super().__init__(*args, **kwargs)   # type: ignore[arg-type]

    def _send_alone(self, record: Outgoing) -> BaseException | None:
        self.alone.append(record.value)
        return super()._send_alone(record)

    def _requeue(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: object,
                 error: object, producer: object) -> None:
        if librdkafka_code(error) == "_FATAL":
            self.handed_to_fatal.append(record.value)
        super()._requeue(order, record, on_ack, on_refused, error, producer)   # type: ignore[arg-type]


def _ready(cluster: MockCluster, **settings: object) -> tuple[_CountingAlone, Handed]:
    """A sink on ``cluster``'s topic ``out`` whose producer has its id (a first record, -1, acknowledged)."""
    cluster.create_topic("out")
    sink = _CountingAlone(cluster.bootstrap, dict(settings))
    handed = Handed(sink)
    handed.publish(b"-1")
    assert handed.settle(1), "the producer is ready"
    return sink, handed




def test_records_behind_a_refused_batch_are_not_published_ahead_of_its_innocent_ones(caplog):
    """librdkafka's default bumps its epoch after a refused batch and sends the batch behind it again, which
    the broker acknowledges before the refused batch's innocent records are resent alone: the log read
    [-1, 3, ..., 9, 0, 1, 2]. With gapless, and the replaced producer's retry queue purged, it stays in order."""
    caplog.set_level(logging.WARNING, logger="stream")   # whatever level an earlier test left on the root
    with mock_cluster() as cluster:
        sink, handed = _ready(cluster)
        try:
            cluster.set_rtt(200)   # the two batches below are in flight together
            cluster.fail_next(PRODUCE, KafkaError.INVALID_RECORD, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER)
            for batch in ([0, 1, 2], [3, 4, 5, 6, 7, 8, 9]):
                for i in batch:
                    handed.publish(str(i).encode())
                time.sleep(0.05)   # past linger.ms: a batch, a request, of its own
            assert handed.settle(10) and handed.refused == [], "each accepted alone"
            assert "unable to satisfy gap-less guarantee" in caplog.text, "the refusal turned the producer fatal"
        finally:
            sink.close()
        cluster.set_rtt(0)
        values = cluster.values("out", 11)
    assert [int(v) for v in values] == list(range(-1, 10)), "in hand-over order, once each"


def test_a_record_handed_to_a_producer_a_refusal_left_fatal_is_resent_and_flush_does_not_raise(caplog):
    """Between a refused batch and the producer's replacement, produce() on it raises _FATAL (which does not
    say fatal() itself): the record used to be refused as the operator's to fix, stopping the member. And
    whichever thread serves the fatal error's event gets it raised: flush() on the pipeline's thread (its
    shutdown drain) used to raise it. Here the poll thread is busy in an acknowledgement meanwhile."""
    caplog.set_level(logging.WARNING, logger="stream")   # whatever level an earlier test left on the root
    with mock_cluster() as cluster:
        sink, handed = _ready(cluster)
        try:
            cluster.set_rtt(200)
            cluster.fail_next(PRODUCE, KafkaError.NO_ERROR, KafkaError.INVALID_RECORD)
            handed.publish(b"a", on_ack=lambda: time.sleep(1.0))   # the pipeline's work on the poll thread
            time.sleep(0.05)
            handed.publish(b"b")   # its batch is refused: the producer turns fatal
            time.sleep(0.5)        # the refusal is back; the poll thread is still in a's acknowledgement
            handed.publish(b"c")   # handed to the fatal producer
            assert sink.flush(30), "everything settled"
            assert handed.settle(3)
            assert sink.failure is None, sink.failure
            assert sorted(handed.acked[1:]) == [b"a", b"b", b"c"] and handed.refused == []
            assert "code=_FATAL" in caplog.text, "c was handed to the fatal producer"
        finally:
            sink.close()


def test_a_producer_no_new_one_would_cure_stops_the_member_instead_of_being_replaced_for_ever():
    """Without the IdempotentWrite ACL every producer is fatal at once: one line naming what to grant, not a
    new producer every few milliseconds (15 in 5 s, each with its threads, before)."""
    made = []

    class Sink(rdkafka_sink.RdKafkaSink):
        def _new_producer(self) -> object:
            made.append(1)
            return super()._new_producer()
    with mock_cluster() as cluster:
        cluster.create_topic("out")
        cluster.fail_next(INIT_PRODUCER_ID, *[KafkaError.CLUSTER_AUTHORIZATION_FAILED] * 1000)
        sink = Sink(cluster.bootstrap, {})
        try:
            Handed(sink).publish(b"0")
            wait_until(lambda: sink.failure is not None, "the member stopped", timeout=10)
            assert isinstance(sink.failure, KafkaPermanent)
            assert "CLUSTER_AUTHORIZATION_FAILED" in str(sink.failure) and "IDEMPOTENT_WRITE" in str(sink.failure)
            assert len(made) == 1, f"{len(made)} producers made"
        finally:
            sink._closed = True   # close() would wait for the records the member leaves uncommitted
            sink._isolation.close()


def test_records_purged_unsent_behind_a_refusal_go_back_to_a_producer_not_one_at_a_time():
    """A refusal purges everything the fatal producer still queued, on every partition; those records were
    never refused, but each used to be resent alone, a round trip each (16.7 s for 3,000 at a 5 ms round
    trip against 0.5 s). Counted here: how many records are sent alone."""
    with mock_cluster() as cluster:
        sink, handed = _ready(cluster, **{"max.in.flight.requests.per.connection": 1})
        try:
            cluster.set_rtt(300)
            # librdkafka can send one more batch after the refusal turned it fatal: Kafka refuses it out of sequence
            cluster.fail_next(PRODUCE, KafkaError.INVALID_RECORD, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER)
            for i in range(3):
                handed.publish(f"a{i}".encode())
            time.sleep(0.05)   # past linger.ms: the refused batch is out, the rest queue behind it
            for i in range(300):
                handed.publish(f"m{i}".encode())
            cluster.set_rtt(0)
            assert handed.settle(303)
            assert handed.refused == []
        finally:
            sink.close()
        values = cluster.values("out", 304)
    # the refused batch's records (a0 twice where it met the second answer; a2 where it made a batch of its own),
    # and under load one m the pipeline handed to the fatal producer before the poll thread served the refusal
    assert len(sink.handed_to_fatal) <= 1, sink.handed_to_fatal
    assert sink.alone and set(sink.alone) <= {b"a0", b"a1", b"a2", *sink.handed_to_fatal}, \
        f"{len(sink.alone)} sent alone: {sink.alone[:10]}"
    assert values == [b"-1", b"a0", b"a1", b"a2", *[f"m{i}".encode() for i in range(300)]]


def test_producers_a_refusal_left_fatal_are_let_go_once_they_hold_nothing():
    """A stream the broker refuses record by record (keyless records to a compacted topic) turns a producer
    fatal with each refused batch; each was kept, with its threads, for message.timeout.ms and more (133
    of them, 415 threads, within 12 s). Nothing can be handed to a fatal producer: it goes once empty."""
    with mock_cluster() as cluster:
        sink, handed = _ready(cluster)
        try:
            cluster.fail_next(PRODUCE, *[KafkaError.INVALID_RECORD] * 10_000)
            for i in range(100):
                handed.publish(f"m{i}".encode(), key=None)
                if i % 10 == 9:
                    time.sleep(0.01)   # several batches, several refusals
            assert handed.settle(100)
            assert len(handed.refused) == 100 and sink.failure is None
            wait_until(lambda: not sink._retired, "no replaced producer kept", timeout=10)
        finally:
            cluster.clear_errors(PRODUCE)
            sink.close()


def test_records_queued_behind_ones_librdkafka_gave_up_on_do_not_overtake_them():
    """The broker away: records time out in librdkafka's queue (message.timeout.ms) while later ones still
    wait there. librdkafka sent the later ones once the broker was back, before the sink resent the given-up
    ones: the log read w m3 m4 m5 m0 m1 m2. The queue behind a given-up record is purged into the ordered
    resend."""
    with mock_cluster() as cluster:
        sink, handed = _ready(cluster, **{"message.timeout.ms": 4000})
        try:
            cluster.set_down(True)
            time.sleep(0.5)   # the producer has seen its connection go
            for i in range(3):
                handed.publish(f"m{i}".encode())
            time.sleep(2.5)
            for i in range(3, 6):
                handed.publish(f"m{i}".encode())
            # m0-m2 are given up on at about 4.5 s, m3-m5 not before 7 s: 6 waiting by 6 s means the purge
            wait_until(lambda: sink.pending_retries() >= 6, "the first three given up on, the three behind them purged",
                       timeout=3)
            cluster.set_down(False)
            assert handed.settle(6, timeout_s=60) and handed.refused == []
        finally:
            sink.close()
        values = cluster.values("out", 7)
    assert values == [b"-1", *[f"m{i}".encode() for i in range(6)]]


def test_a_fenced_transactional_producer_is_said_at_the_commit_not_as_a_refused_record():
    """Exactly once, produce() on a fenced (fatal) transactional producer raises _FATAL: the record was
    refused as the operator's to fix ("cannot publish even a dead letter"); the open transaction is doomed
    instead, and the commit point ends the member naming the fencing."""
    with mock_cluster() as cluster:
        for topic in ("out", "other", "in"):
            cluster.create_topic(topic)
        sink = rdkafka_sink.RdKafkaSink(cluster.bootstrap, {}, transactional_id="fenced-tx")
        acked = threading.Semaphore(0)
        consumer = confluent_kafka.Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": "g"})
        try:
            sink.publish(Outgoing("out", b"k", b"0", []), acked.release)
            assert acked.acquire(timeout=30)
            cluster.fail_next(ADD_PARTITIONS_TO_TXN, KafkaError.PRODUCER_FENCED)   # as Kafka answers a fenced one
            sink.publish(Outgoing("other", b"k", b"1", []), acked.release)   # a new partition in the transaction
            assert acked.acquire(timeout=30)
            sink.publish(Outgoing("out", b"k", b"2", []), acked.release)
            assert acked.acquire(timeout=30)
            assert sink.failure is None, sink.failure
            with pytest.raises(KafkaPermanent, match="fenced"):
                sink.commit_transaction({("in", 0): 1}, consumer.consumer_group_metadata())
        finally:
            consumer.close()
            sink.close()


def test_innocent_records_of_a_batch_the_broker_refused_record_by_record_are_resent_not_a_stop():
    """Kafka >= 2.4 names the record it refuses; librdkafka reports it INVALID_RECORD and every other record of
    the batch _INVALID_DIFFERENT_RECORD, which read as the operator's to fix and stopped the member (a crash
    loop, since the same inputs tend to form the same batch again). The mock sends no record errors, so the
    reports of two records are rewritten to what librdkafka gives them."""
    class Producer:
        def __init__(self, real: object) -> None:
            self._real = real

        def produce(self, topic: str, value: bytes, on_delivery: Callable[..., None], **kwargs: object) -> None:
            if value.startswith(b"innocent"):
                report = on_delivery
                on_delivery = lambda _error, message: report(KafkaError(KafkaError._INVALID_DIFFERENT_RECORD), message)  # noqa: E731
            self._real.produce(topic, value=value, on_delivery=on_delivery, **kwargs)

        def __len__(self) -> int:
            return len(self._real)

        def __getattr__(self, name: str) -> object:
            return getattr(self._real, name)

    class Sink(rdkafka_sink.RdKafkaSink):
        def _new_producer(self) -> object:
            return Producer(super()._new_producer())
    with mock_cluster() as cluster:
        cluster.create_topic("out")
        sink = Sink(cluster.bootstrap, {})
        handed = Handed(sink)
        try:
            for value in (b"innocent1", b"innocent2", b"after"):
                handed.publish(value)
            assert handed.settle(3)
            assert sink.failure is None, sink.failure
            assert sorted(handed.acked) == [b"after", b"innocent1", b"innocent2"] and handed.refused == []
        finally:
            sink.close()


@pytest.mark.parametrize("answers", [["OUT_OF_ORDER_SEQUENCE_NUMBER"],
                                     ["NOT_LEADER_FOR_PARTITION", "UNKNOWN_PRODUCER_ID"]])
def test_a_producer_a_broker_lost_the_state_of_is_replaced_not_a_stop(answers):
    """librdkafka turns these fatal: a batch answered out of sequence at the head of the line (a broker that
    lost the producer's state, an unclean leader election), UNKNOWN_PRODUCER_ID on a retried batch. A new
    producer (a new id, sequences from 0) cures both; the member was stopped.

    A batch sent behind the failing one (the fifth record, where it missed the first batch) is refused out of
    sequence by a Kafka broker; the mock does not check sequences (tests/rdkafka_mock.py), so that answer is
    pushed too: without it the mock published the fifth record first, once in a fresh-clone run. Where no
    batch is behind, the new producer's first batch meets it and is replaced once more."""
    with mock_cluster() as cluster:
        sink, handed = _ready(cluster)
        try:
            cluster.fail_next(PRODUCE, *[getattr(KafkaError, answer) for answer in answers],
                              KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER)
            for i in range(5):
                handed.publish(str(i).encode())
            assert handed.settle(5) and handed.refused == []
            assert sink.failure is None, sink.failure
        finally:
            sink.close()
        values = cluster.values("out", 6)
    assert list(dict.fromkeys(values)) == [b"-1", *[str(i).encode() for i in range(5)]], values


def test_records_librdkafkas_full_queue_turned_away_go_back_to_a_producer_not_one_at_a_time():
    """A record produce() turns away with a full local queue (BufferError) was never sent; it was resent alone,
    a round trip each, and counted as publishing failing."""
    with mock_cluster() as cluster:
        sink, handed = _ready(cluster, **{"queue.buffering.max.messages": 50})
        try:
            cluster.set_rtt(5)
            for i in range(500):
                handed.publish(f"m{i}".encode())
            assert handed.settle(500) and handed.refused == []
        finally:
            sink.close()
        cluster.set_rtt(0)
        values = cluster.values("out", 501)
    assert sink.alone == [], f"{len(sink.alone)} sent alone"
    assert values == [b"-1", *[f"m{i}".encode() for i in range(500)]]


def test_a_record_larger_than_librdkafkas_whole_local_queue_is_refused_not_offered_for_ever():
    """produce() turns away a record larger than queue.buffering.max.kbytes even with the queue empty: it was
    handed back as a record that only waited, at once and for ever (a core at 100 %, 250,000 tries in 5 s),
    and every later record waited behind it. It is refused as too large, with each guarantee."""
    for transactional_id in (None, "too-big-tx"):
        with mock_cluster() as cluster:
            cluster.create_topic("out")
            sink = rdkafka_sink.RdKafkaSink(cluster.bootstrap, {"queue.buffering.max.kbytes": 1},
                                            transactional_id=transactional_id)
            handed = Handed(sink)
            try:
                handed.publish(b"x" * 4000)
                handed.publish(b"after")
                assert handed.settle(2, timeout_s=10), f"{transactional_id}: acknowledged {handed.acked}"
                assert handed.refused == [b"x" * 4000] and handed.acked == [b"after"]
            finally:
                sink.close()


def test_in_a_transaction_a_record_librdkafkas_full_queue_turned_away_keeps_its_place():
    """Exactly once, a record turned away by a full local queue was produced again 50 ms later, on its own,
    and records handed over meanwhile went ahead of it in the transaction: the log read w m0 ... m5 m12 m13.
    It waits for room in its place now."""
    with mock_cluster() as cluster:
        for topic in ("out", "in"):
            cluster.create_topic(topic)
        sink = rdkafka_sink.RdKafkaSink(cluster.bootstrap, {"queue.buffering.max.messages": 5},
                                        transactional_id="full-queue-tx")
        consumer = confluent_kafka.Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": "g"})
        handed = Handed(sink)
        try:
            handed.publish(b"w")
            assert handed.settle(1)
            cluster.set_rtt(20)
            for i in range(300):
                handed.publish(f"m{i}".encode())
                time.sleep(0.002)   # the queue frees and fills while records keep coming, as from a pipeline
            assert handed.settle(300) and handed.refused == []
            sink.commit_transaction({("in", 0): 1}, consumer.consumer_group_metadata())
        finally:
            consumer.close()
            sink.close()
        cluster.set_rtt(0)
        values = cluster.values("out", 301)
    assert values == [b"w", *[f"m{i}".encode() for i in range(300)]]


def test_producers_that_fail_alike_before_any_acknowledgement_are_replaced_after_a_doubling_wait():
    """A fatal error a new producer cures replaced it at once, every time: against a broker that fails each new
    producer alike, about 18 producers a second for ever. Only the first replacement since an acknowledgement
    is at once now."""
    with mock_cluster() as cluster:
        sink, handed = _ready(cluster)
        waits = []
        later = sink._delayed.later
        sink._delayed.later = lambda delay, action: (waits.append(delay), later(delay, action))   # type: ignore[method-assign]
        fatal = confluent_kafka.KafkaException(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "from the test",
                                                          fatal=True))
        try:
            for _ in range(4):
                before = sink._producer
                assert sink._fatal(before, fatal)
                wait_until(lambda before=before: sink._producer is not before, "replaced", timeout=10)
            handed.publish(b"acknowledged")
            assert handed.settle(1)
            before = sink._producer
            sink._fatal(before, fatal)
            wait_until(lambda: sink._producer is not before, "replaced", timeout=10)
        finally:
            sink.close()
    assert waits == [0.0, 0.1, 0.2, 0.4, 0.0]


def test_a_commit_sent_without_waiting_reports_what_the_broker_accepted_and_raises_what_it_refused(tmp_path, caplog):
    """With cooperative rebalancing the periodic commit does not wait for its answer (a synchronous one waits
    behind a pending rejoin and holds the intake of the partitions the member keeps). What the broker accepts
    is reported to the service when the answer comes (before that the offsets stay committable, and go
    again); a refusal is raised at the next commit, as a synchronous commit would have raised it."""
    from stream import rdkafka_io
    from stream.config import StreamConfig
    from stream.errors import KafkaTransient

    from .test_stream_rdkafka import Handler
    with mock_cluster() as cluster:
        cluster.create_topic("in", 2)
        producer = confluent_kafka.Producer({"bootstrap.servers": cluster.bootstrap})
        for i in range(20):
            producer.produce("in", value=b"x", partition=i % 2)
        producer.flush(10)
        cfg = StreamConfig(cluster.bootstrap, ("in",), "out", "dlq", tmp_path, group_id="g", kafka_client="librdkafka",
                           session_timeout_ms=6000, assignment_strategy="cooperative-sticky")
        handler = Handler(drain_timeout_s=0.5)
        source = rdkafka_io.RdKafkaSource(cfg, handler)
        try:
            got: list = []
            wait_until(lambda: len(got) >= 20 or bool(got.extend(source.poll(0.1, 100))), "every record consumed")
            cluster.fail_next(OFFSET_COMMIT, KafkaError.OFFSET_METADATA_TOO_LARGE)
            with caplog.at_level(logging.DEBUG, logger="stream.rdkafka_io"):
                assert source.commit({("in", 0): 5}, wait=False) == {}, "nothing is known accepted yet"
                wait_until(lambda: source.poll(0.05, 10) == [] and "a commit failed" in caplog.text,
                           "the refusal answered")
            assert not [e for e in handler.events if e[0] == "committed"], "a refused commit is not reported made"
            with pytest.raises(KafkaTransient, match="OFFSET_METADATA_TOO_LARGE"):
                source.commit({("in", 0): 5, ("in", 1): 3}, wait=False)
            assert source.commit({("in", 0): 5, ("in", 1): 3}, wait=False) == {}   # the service's next commit
            wait_until(lambda: source.poll(0.05, 10) == [] and ("committed", {("in", 0): 5, ("in", 1): 3})
                       in handler.events, "the accepted commit reported")
            assert source.commit({("in", 1): 4}, wait=True) == {("in", 1): 4}
        finally:
            source.close()
        reader = confluent_kafka.Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": "g"})
        try:
            marks = reader.committed([confluent_kafka.TopicPartition("in", p) for p in (0, 1)], timeout=10)
        finally:
            reader.close()
        assert [(tp.partition, tp.offset) for tp in marks] == [(0, 5), (1, 4)]


def test_exactly_once_a_cooperative_revocation_commits_the_transaction_only_once_every_partitions_work_is_in(
        tmp_path):
    """The open transaction holds the work of every partition, kept ones too: committing it once only the
    revoked partitions had drained would make a kept partition's results visible without its input offsets
    (a kill before the next commit answers those inputs twice). Under eager rebalancing every partition is
    revoked, so this only shows with cooperative-sticky, where the member keeps some."""
    from stream import rdkafka_io
    from stream.config import StreamConfig

    from .test_stream_rdkafka import Handler

    class Transactions:
        def __init__(self) -> None:
            self.ended: list[bool] = []

        def end_for_revocation(self, drained: bool) -> dict:
            self.ended.append(drained)
            return {}

    class KeptPartitionBusy(Handler):
        def drained(self, partitions):   # partition 1, which the member keeps, has work in flight
            return ("in", 1) not in partitions

    with mock_cluster() as cluster:
        cluster.create_topic("in", 2)
        cfg = StreamConfig(cluster.bootstrap, ("in",), "out", "dlq", tmp_path, group_id="g", kafka_client="librdkafka",
                           session_timeout_ms=6000, assignment_strategy="cooperative-sticky",
                           processing_guarantee="exactly-once")
        handler = KeptPartitionBusy(drain_timeout_s=0.2)
        handler.transactions = Transactions()
        source = rdkafka_io.RdKafkaSource(cfg, handler)
        try:
            wait_until(lambda: len(source.assigned()) == 2 or bool(source.poll(0.1, 10)), "both partitions assigned")
            source._revoke(source._consumer, [confluent_kafka.TopicPartition("in", 0)])   # as librdkafka would
        finally:
            handler.drain_timeout_s = 0.0
            source.close()
        assert handler.transactions.ended[0] is False, "not committed while the kept partition's work was out"
