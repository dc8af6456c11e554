"""At least once at its edges, against the fake broker: rebalances that do not drain in time,
records the broker refuses for good, order through outages, memory bounded by bytes."""
from __future__ import annotations

import threading
import time

from stream.app import build
from stream.fake import FakeBroker, FakeConnector, FakeSource
from stream.metrics import Metrics
from stream.offsets import OffsetTracker
from stream.ports import Partition, RebalanceHandler
from stream.rebalance import Rebalance

from .images import good_images
from .standins import ARTIFACT, PixelModel, stand_in
from .test_stream_units import PeakTracker, config, sources


class _Audited(FakeSource):
    """A member whose every commit is checked: nothing below a committed offset may lack its
    acknowledged record (a result or a dead letter)."""

    violations: list[str]

    def commit(self, offsets: dict[Partition, int], *, wait: bool) -> dict[Partition, int]:
        with self.broker.lock:
            done = set(sources(self.broker.records("out")))
            for (topic, partition), offset in offsets.items():
                missing = [o for o in range(offset) if (partition, o) not in done]
                if missing:
                    self.violations.append(f"{topic}[{partition}] committed at {offset} while {len(missing)} "
                                           f"below it had no record (first {missing[0]})")
            return super().commit(offsets, wait=wait)


class _AuditedConnector(FakeConnector):
    def __init__(self, broker: FakeBroker, topics: list[str], group_id: str) -> None:
        super().__init__(broker, topics, group_id)
        self.violations: list[str] = []

    def source(self, rebalance: RebalanceHandler) -> FakeSource:
        member = _Audited(self.broker, self.topics, self.group_id, rebalance)
        member.violations = self.violations
        return member


def test_a_revocation_that_does_not_drain_in_time_never_lets_a_commit_pass_unfinished_work():
    """A member under backlog revokes, cannot drain in time, and keeps one partition (its fetch
    position kept, as kafka-python keeps it): the work still in its queues must keep holding that
    partition's commits back until its records are acknowledged."""
    broker = FakeBroker()
    broker.create_topic("in", 2)
    total = 240
    for i in range(total):
        broker.produce("in", good_images()["png"], partition=i % 2, key=str(i).encode())
    cfg = config(ARTIFACT, max_batch=4, max_in_flight=64, max_poll_records=16, drain_timeout_s=0.05)
    connector = _AuditedConnector(broker, ["in"], cfg.group_id)
    first = build(cfg, connector=connector, model=stand_in(PixelModel(delay_s=0.02)))
    worker = threading.Thread(target=first.run, kwargs={"timeout": 90}, daemon=True)
    worker.start()
    while len(broker.records("out")) < 12:
        threading.Event().wait(0.005)

    handler = Rebalance(OffsetTracker(), Metrics(), drain_timeout_s=5)
    newcomer = broker.connector(["in"], cfg.group_id).source(handler)   # joins under backlog
    deadline = time.monotonic() + 30
    while not handler.owned() and time.monotonic() < deadline:
        newcomer.poll(0.01, 4)
    assert handler.owned(), "the newcomer was assigned a partition"
    (kept,) = first.rebalance.owned()
    before = broker.committed[cfg.group_id].get(kept, 0)
    while broker.committed[cfg.group_id].get(kept, 0) <= before + 16 and time.monotonic() < deadline:
        threading.Event().wait(0.01)   # the first member goes on with the partition it kept
    newcomer.close()   # the first member gets the other partition back
    while sum(broker.committed[cfg.group_id].values()) < total and time.monotonic() < deadline + 60:
        threading.Event().wait(0.02)
    first.stop()
    worker.join(60)
    assert not connector.violations, connector.violations[:3]
    assert set(sources(broker.records("out"))) == {(i % 2, i // 2) for i in range(total)}
    assert broker.committed[cfg.group_id] == {("in", 0): total // 2, ("in", 1): total // 2}


def test_an_input_with_megabytes_of_headers_ends_as_a_dead_letter_without_them():
    """Its result is too large for the broker, and so is a dead letter with all its headers: the
    dead letter drops the oversized headers (saying which) and keeps the original value."""
    broker = FakeBroker()
    broker.create_topic("in", 1)
    broker.max_record_bytes = 200_000
    image = good_images()["jpeg_clock"]
    huge = [("trace-id", b"t-1"), ("blob", b"x" * 300_000), ("blob2", b"y" * 300_000)]
    broker.produce("in", image, key=b"heavy", headers=huge)
    broker.produce("in", image, key=b"after", headers=[("trace-id", b"t-2")])
    svc = build(config(ARTIFACT), connector=broker.connector(["in"], "sentiment-stream"), model=stand_in())
    stats = svc.run(count=2, timeout=60)
    assert stats.finished == 2
    (dead,) = broker.records("dlq")
    key, value, headers = dead
    names = [n for n, _ in headers]
    assert key == b"heavy" and value == image, "the original key and value"
    assert "blob" not in names and "blob2" not in names and ("trace-id", b"t-1") in headers
    assert dict(headers)["error.headers_dropped"] == b"blob=300004, blob2=300005"
    assert dict(headers)["error.reason"] == b"publish_error"
    assert [k for k, _, _ in broker.records("out")] == [b"after"]
    assert broker.committed["sentiment-stream"] == {("in", 0): 2}


def test_backpressure_bounds_the_bytes_in_flight():
    """Far fewer messages than --max-in-flight, but their bytes pass --max-in-flight-bytes: paused."""
    broker = FakeBroker()
    broker.create_topic("in", 1)
    image = good_images()["png"]   # 439 kB
    for i in range(60):
        broker.produce("in", image, key=str(i).encode())
    budget = 8 * len(image)
    tracker = PeakTracker()
    svc = build(config(ARTIFACT, max_in_flight=512, max_in_flight_bytes=budget, max_batch=4,
                       max_poll_records=2), connector=broker.connector(["in"], "sentiment-stream"),
                model=stand_in(PixelModel(delay_s=0.02)), tracker=tracker)
    assert svc.run(count=60, timeout=60).finished == 60
    assert max(tracker.peaks) <= 8 + 2, "paused at the byte budget (one poll may overshoot by its size)"


class _StubFuture:
    """Resolved at once, like a kafka-python future whose batch already completed."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    def add_callback(self, callback) -> None:
        if self.error is None:
            callback(None)

    def add_errback(self, errback) -> None:
        if self.error is not None:
            errback(self.error)

    def get(self, timeout: float) -> None:
        if self.error is not None:
            raise self.error


class _StubProducer:
    """A producer on a log that can be down (every send fails as a lost connection)."""

    def __init__(self, log: list, state: dict) -> None:
        self.log, self.state = log, state

    def send(self, topic, key=None, value=None, headers=None) -> _StubFuture:
        from kafka.errors import KafkaConnectionError
        if self.state["down"]:
            return _StubFuture(KafkaConnectionError("broker down"))
        self.log.append(key)
        return _StubFuture(None)

    def flush(self, timeout=None) -> None:
        pass

    def close(self, timeout=None) -> None:
        pass


def test_a_record_resent_after_an_outage_is_not_overtaken_by_later_ones():
    """The client gave up on the first record while the broker was away; records handed over after
    the broker came back wait behind its resend, so the partition's output stays in offset order."""
    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    log: list = []
    state = {"down": True}

    class Sink(KafkaSink):
        def _new_producer(self):
            return _StubProducer(log, state)

        def _new_probe(self):
            return _StubProducer(log, state)

    sink = Sink("stub:9092", {})
    acked = threading.Semaphore(0)
    try:
        sink.publish(Outgoing("out", b"0", b"v", []), acked.release)
        deadline = time.monotonic() + 10
        while not sink.pending_retries() and time.monotonic() < deadline:
            threading.Event().wait(0.005)
        assert sink.pending_retries() >= 1, "the failed record waits to be resent"
        state["down"] = False
        for i in range(1, 5):
            sink.publish(Outgoing("out", str(i).encode(), b"v", []), acked.release)
        for _ in range(5):
            assert acked.acquire(timeout=10), "every record acknowledged"
    finally:
        sink.close()
    assert log == [b"0", b"1", b"2", b"3", b"4"]


class _HeldFuture:
    """A kafka-python future that stays out until the test answers it (its callbacks then run on the
    answering thread, as kafka-python's run on its IO thread)."""

    def __init__(self) -> None:
        self.callbacks: list = []
        self.errbacks: list = []
        self.outcome: tuple[bool, BaseException | None] | None = None

    def add_callback(self, callback) -> None:
        if self.outcome is None:
            self.callbacks.append(callback)
        elif self.outcome[0]:
            callback(None)

    def add_errback(self, errback) -> None:
        if self.outcome is None:
            self.errbacks.append(errback)
        elif not self.outcome[0]:
            errback(self.outcome[1])

    def fail(self, error: BaseException | None) -> None:
        assert error is not None
        self.outcome = (False, error)
        for errback in self.errbacks:
            errback(error)


class _FatalAfterRefusal:
    """kafka-python's idempotent producer: what it is handed stays out; a refusal turns it fatal, and it
    then fails every batch it holds, in no promised order (here the test fails them)."""

    def __init__(self) -> None:
        self.out: dict[bytes, _HeldFuture] = {}
        self.fatal = False
        self.error: BaseException | None = None   # what made it fatal
        self.fail_new_sends = True   # False: what it takes once fatal stays out until the test fails it
        self._transaction_manager = self   # what KafkaSink reads to tell a fatal producer

    def has_fatal_error(self) -> bool:
        return self.fatal

    def turn_fatal(self, error: BaseException) -> None:
        self.fatal, self.error = True, error

    def send(self, topic, key=None, value=None, headers=None) -> _HeldFuture:
        self.out[key] = _HeldFuture()
        if self.fatal and self.fail_new_sends:   # its sender aborts what it is handed now with the fatal error
            self.out[key].fail(self.error)
        return self.out[key]

    def flush(self, timeout=None) -> None:
        pass

    def close(self, timeout=None) -> None:
        pass


class _Alone:
    """The producer that sends a record alone: refuses the one the broker refuses, logs the rest."""

    def __init__(self, log: list, refused_key: bytes) -> None:
        self.log, self.refused_key = log, refused_key

    def send(self, topic, key=None, value=None, headers=None) -> _StubFuture:
        from kafka.errors import InvalidRecordError
        if key == self.refused_key:
            return _StubFuture(InvalidRecordError("refused by the broker's policy"))
        self.log.append(key)
        return _StubFuture(None)

    def close(self, timeout=None) -> None:
        pass


def test_records_a_refusal_failed_batch_by_batch_keep_their_order_behind_the_refused_one():
    """A refusal leaves kafka-python's producer fatal, and it fails the batches it still holds one after
    another, in any order. A record handed over meanwhile must not overtake them, nor may a later batch's
    records overtake an earlier one's: the partition's output stays in hand-over order."""
    from kafka.errors import InvalidRecordError

    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    log: list = []
    first = _FatalAfterRefusal()
    made: list = []

    class Sink(KafkaSink):
        def _new_producer(self):
            made.append(first if not made else _StubProducer(log, {"down": False}))
            return made[-1]

        def _new_probe(self):
            return _Alone(log, refused_key=b"0")

    sink = Sink("stub:9092", {})
    acked, refused = threading.Semaphore(0), []
    try:
        for i in range(4):
            sink.publish(Outgoing("out", str(i).encode(), b"v", []), acked.release, refused.append)
        first.turn_fatal(InvalidRecordError("refused by the broker's policy"))
        first.out[b"0"].fail(InvalidRecordError("refused by the broker's policy"))
        deadline = time.monotonic() + 10
        while len(made) < 2 and time.monotonic() < deadline:   # the fatal producer replaced
            threading.Event().wait(0.005)
        assert len(made) == 2, "the fatal producer is replaced"
        sink.publish(Outgoing("out", b"4", b"v", []), acked.release, refused.append)
        for key in (b"3", b"1", b"2"):   # the later batch's failure first
            first.out[key].fail(InvalidRecordError("refused by the broker's policy"))
        for _ in range(4):
            assert acked.acquire(timeout=10), "every innocent record acknowledged"
    finally:
        sink.close()
    assert len(refused) == 1, "the refused record alone is refused"
    assert log == [b"1", b"2", b"3", b"4"], "in the order they were handed over"


def _sink_on(main, log: list, made: list | None = None, alone: list | None = None):
    """A KafkaSink whose first producer is ``main`` (then acknowledging stand-ins) and whose records sent
    alone are logged (and listed in ``alone``)."""
    from stream.kafka_sink import KafkaSink

    class Sink(KafkaSink):
        def _new_producer(self):
            producer = main if made is None or not made else _StubProducer(log, {"down": False})
            if made is not None:
                made.append(producer)
            return producer

        def _new_probe(self):
            return _Alone(log, refused_key=b"never") if alone is None else _CountingAlone(log, alone)
    return Sink("stub:9092", {})


def _nothing_resent_while_out(sink, producer, log: list, still_out: bytes, error: BaseException) -> None:
    """Publish records 0 and 1 on ``sink``, whose first producer is ``producer``: one of them fails at once,
    and nothing may be acknowledged while ``still_out`` is out on ``producer``; once that one fails with
    ``error`` both are resent, in order."""
    from stream.records import Outgoing
    acked = threading.Semaphore(0)
    try:
        sink.publish(Outgoing("out", b"0", b"v", []), acked.release)
        sink.publish(Outgoing("out", b"1", b"v", []), acked.release)
        # a check that something does not happen has to give it a while: half a second
        assert not acked.acquire(timeout=0.5), f"a record was resent while record {still_out!r} was still out"
        producer.out[still_out].fail(error)
        for _ in range(2):
            assert acked.acquire(timeout=10), "both records acknowledged"
    finally:
        sink.close()
    assert log == [b"0", b"1"]


def test_a_record_send_refuses_at_once_waits_for_the_records_its_producer_still_holds():
    """send() raises at once (a metadata wait past max_block_ms) while an earlier record is still out on
    the producer, being retried: the failed record is not resent alone ahead of it."""
    from kafka.errors import KafkaTimeoutError


    class Main(_FatalAfterRefusal):
        def send(self, topic, key=None, value=None, headers=None):
            if key == b"1":
                raise KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
            return super().send(topic, key, value, headers)
    main, log = Main(), []
    _nothing_resent_while_out(_sink_on(main, log), main, log, b"0",
                              KafkaTimeoutError("Expiring 1 record(s): 120000 ms has passed"))


def test_a_record_the_producer_fails_while_a_later_send_is_returning_waits_for_that_one():
    """The fatal producer's IO thread fails an earlier record while send() of a later one has not yet
    returned: the earlier one is not resent alone while the later one is still out (it would otherwise be
    resent, the later one failed after it, and a record handed over in between overtake that)."""
    from kafka.errors import InvalidRecordError


    class Racy(_FatalAfterRefusal):
        def send(self, topic, key=None, value=None, headers=None):
            future = super().send(topic, key, value, headers)   # in the accumulator
            if key == b"1":   # the IO thread's sweep fails record 0 before this send returns
                self.turn_fatal(InvalidRecordError("shared fate"))
                sweep = threading.Thread(target=self.out[b"0"].fail, args=(InvalidRecordError("shared fate"),))
                sweep.start()
                sweep.join()
            return future
    racy, log = Racy(), []
    _nothing_resent_while_out(_sink_on(racy, log, []), racy, log, b"1", InvalidRecordError("shared fate"))


def _refusal_with_records_waiting(sink, first, log: list, total: int) -> None:
    """On ``sink``, whose first producer is ``first``: records 0 and 1 out; a refusal of 0 turns ``first``
    fatal; records 2 .. total-1 are handed over while 1 is still out; then 1 fails too. Every record ends
    acknowledged, logged in hand-over order. Closes the sink."""
    from kafka.errors import InvalidRecordError

    from stream.records import Outgoing
    acked = threading.Semaphore(0)
    try:
        for i in range(2):
            sink.publish(Outgoing("out", str(i).encode(), b"v", []), acked.release)
        first.turn_fatal(InvalidRecordError("refused by the broker's policy"))
        first.out[b"0"].fail(InvalidRecordError("refused by the broker's policy"))
        for i in range(2, total):   # handed over while record 1 is still out on the fatal producer
            sink.publish(Outgoing("out", str(i).encode(), b"v", []), acked.release)
        first.out[b"1"].fail(InvalidRecordError("refused by the broker's policy"))
        for _ in range(total):
            assert acked.acquire(timeout=10), "every record acknowledged"
    finally:
        sink.close()
    assert log == [str(i).encode() for i in range(total)], "in hand-over order"


def test_records_that_only_waited_behind_a_refusal_go_back_to_the_producer_not_one_at_a_time():
    """After a refusal, the records handed over while the failed ones were being resent alone did not fail:
    once nothing failed is ahead of them they go to the producer together, in order; only the failed ones
    pay a round trip each (else a stream under load would stay in the one-at-a-time mode)."""
    first, log, made, alone = _FatalAfterRefusal(), [], [], []
    sink = _sink_on(first, log, made, alone)
    _refusal_with_records_waiting(sink, first, log, 40)
    assert alone == [b"0", b"1"], "only the two that failed were sent alone"


class _CountingAlone(_Alone):
    def __init__(self, log: list, alone: list) -> None:
        super().__init__(log, refused_key=b"never")
        self.alone = alone

    def send(self, topic, key=None, value=None, headers=None) -> _StubFuture:
        self.alone.append(key)
        return super().send(topic, key, value, headers)


class _TimesOutOnce(_StubProducer):
    """A producer whose send() of one record gives up waiting for metadata once (KafkaTimeoutError)."""

    def __init__(self, log: list, key: bytes) -> None:
        super().__init__(log, {"down": False})
        self.key, self.tries = key, 0

    def send(self, topic, key=None, value=None, headers=None) -> _StubFuture:
        if key == self.key:
            self.tries += 1
            if self.tries == 1:
                from kafka.errors import KafkaTimeoutError
                raise KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
        return super().send(topic, key, value, headers)


def test_a_record_handed_back_after_a_refusal_that_fails_at_once_keeps_its_place():
    """Records that waited behind a refusal go back to the new producer one by one; when one of them fails
    at once (send() gives up waiting for metadata), those after it wait behind its resend."""

    from stream.kafka_sink import KafkaSink
    first, log, made = _FatalAfterRefusal(), [], []

    class Sink(KafkaSink):
        def _new_producer(self):
            made.append(first if not made else _TimesOutOnce(log, b"2"))
            return made[-1]

        def _new_probe(self):
            return _Alone(log, refused_key=b"never")
    sink = Sink("stub:9092", {})
    _refusal_with_records_waiting(sink, first, log, 6)


def test_a_record_handed_back_to_a_fatal_producer_is_not_overtaken_once_a_new_one_works():
    """A broker restart: replacing the fatal producer fails while no broker answers, so a record that waited
    goes back to the fatal one; once a replacement works, the next record must wait for that one to come back
    (it fails there and is resent alone) instead of going to the new producer ahead of it."""
    from kafka.errors import InvalidRecordError, KafkaConnectionError

    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    refused = InvalidRecordError("refused by the broker's policy")
    first, log, acked, made, gate = _FatalAfterRefusal(), [], threading.Semaphore(0), [], threading.Event()
    first.fail_new_sends = False   # kafka-python's sender fails what a fatal producer takes later, not at once

    class Gated(_Alone):   # the first record sent alone waits at the gate, so the others queue behind it
        def send(self, topic, key=None, value=None, headers=None) -> _StubFuture:
            gate.wait(10)
            return super().send(topic, key, value, headers)

    class Sink(KafkaSink):
        def _new_producer(self):
            made.append(None)
            if len(made) == 1:
                return first
            if len(made) in (2, 3):
                raise KafkaConnectionError("no broker answers yet")
            return _StubProducer(log, {"down": False})

        def _new_probe(self):
            return Gated(log, refused_key=b"never")
    sink = Sink("stub:9092", {})

    def until(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert condition()
    try:
        sink.publish(Outgoing("out", b"0", b"v", []), acked.release)
        first.turn_fatal(refused)
        first.out[b"0"].fail(refused)
        for key in (b"1", b"2"):
            sink.publish(Outgoing("out", key, b"v", []), acked.release)
        until(lambda: len(made) == 2)          # the first replacement failed: no broker yet
        gate.set()
        until(lambda: b"1" in first.out)       # record 1 handed back to the fatal producer
        until(lambda: len(made) >= 4)          # a replacement worked
        # a check that something does not happen has to give it a while: record 2 must not be sent now
        time.sleep(0.3)
        first.out[b"1"].fail(refused)          # the fatal producer's sweep
        for _ in range(3):
            assert acked.acquire(timeout=10), "every record acknowledged"
    finally:
        sink.close()
    assert log == [b"0", b"1", b"2"], "in hand-over order"


def test_an_outage_longer_than_a_thousand_resends_keeps_the_queued_records():
    """Each resend alone that an outage fails doubles the wait, up to its cap, for as long as the outage lasts:
    past 1,024 tries the doubling overflowed a float and every queued record was dropped, unacknowledged."""
    from kafka.errors import KafkaConnectionError

    from stream.isolation import Isolation
    from stream.kafka_sink import retriable
    from stream.records import Outgoing
    tries, acked, refused, done = [0], [], [], threading.Event()

    def send_alone(_record):
        tries[0] += 1
        return KafkaConnectionError("broker down") if tries[0] <= 1100 else None

    def outcome(_record, on_ack, _on_refused, exc):
        assert exc is None
        on_ack()
        return None
    isolation = Isolation(send_alone, lambda exc: not retriable(exc), outcome, lambda entry, producer: None,
                          lambda: "producer", max_backoff_s=0.0)   # no waiting: the count is what matters
    for i in range(3):
        isolation.add(i, Outgoing("out", str(i).encode(), b"v", []),
                      lambda i=i: (acked.append(i), len(acked) == 3 and done.set()), refused.append)
    assert done.wait(60), f"after {tries[0]} tries: acknowledged {acked}, waiting {isolation.waiting()}"
    isolation.close()
    assert acked == [0, 1, 2] and not refused


class _ClosedWhileOut:
    """A probe whose record is out when the sink closes: kafka-python's close fails it ('Producer is closed
    forcefully', not retriable)."""

    def __init__(self) -> None:
        self.closing = threading.Event()

    def send(self, topic, key=None, value=None, headers=None) -> _ClosedWhileOut:
        return self

    def get(self, timeout: float) -> None:
        from kafka.errors import IllegalStateError
        self.closing.wait(timeout)
        raise IllegalStateError("Producer is closed forcefully.")

    def close(self, timeout=None) -> None:
        self.closing.set()


def test_closing_while_a_record_is_out_alone_dead_letters_nothing():
    """A record the closing sink's probe failed was not refused by the broker: it stays unacknowledged (its
    input redelivered after the restart) instead of being dead-lettered as refused for good."""
    from kafka.errors import InvalidRecordError

    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    first, probe, refused, sent_alone = _FatalAfterRefusal(), _ClosedWhileOut(), [], threading.Event()

    class Sink(KafkaSink):
        def _new_producer(self):
            return first

        def _new_probe(self):
            sent_alone.set()
            return probe
    sink = Sink("stub:9092", {})
    try:
        sink.publish(Outgoing("out", b"0", b"v", []), lambda: None, refused.append)
        first.out[b"0"].fail(InvalidRecordError("shared fate"))
        assert sent_alone.wait(10), "the record is being sent alone"
    finally:
        sink.close()
    deadline = time.monotonic() + 10
    while sink.pending_retries() and time.monotonic() < deadline:   # the resend's outcome, after the close
        time.sleep(0.01)
    assert not sink.pending_retries() and not refused, f"an innocent record refused at close: {refused}"


def test_a_record_send_refuses_as_too_large_is_not_publishing_failing():
    """kafka-python's send() checks a record's size itself: that refusal is the record's fault, resent alone to
    be refused for good (dead-lettered), not Kafka failing: /readyz stays ready and no retry is counted."""
    from kafka.errors import MessageSizeTooLargeError

    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    log: list = []
    retries: list = []

    class TooLarge(_StubProducer):
        def send(self, topic, key=None, value=None, headers=None) -> _StubFuture:
            if key == b"huge":
                raise MessageSizeTooLargeError("the record is larger than max_request_size")
            return super().send(topic, key, value, headers)

    class Sink(KafkaSink):
        def _new_producer(self):
            return TooLarge(log, {"down": False})

        def _new_probe(self):
            return TooLarge(log, {"down": False})

    sink = Sink("stub:9092", {}, on_retry=lambda: retries.append(1))
    refused = threading.Event()
    try:
        sink.publish(Outgoing("out", b"huge", b"v" * 10, []), lambda: None, lambda exc: refused.set())
        assert refused.wait(10), "refused for good when sent alone"
        assert sink.failing_since is None and retries == [], "a record's fault, not publishing failing"
    finally:
        sink.close()
