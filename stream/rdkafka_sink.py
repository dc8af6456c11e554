"""The librdkafka sink (confluent-kafka's producer), :class:`RdKafkaSink`: the same as :mod:`.kafka_sink` over
the other client, with what both do alike in :mod:`.sink_base`. Made by :class:`.rdkafka_io.RdKafkaConnector`.

Delivery reports are served by a thread of the sink polling the producer, so acknowledgements reach the
service while its poll thread drains a revocation. librdkafka's errors are classified in :mod:`.errors`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from .errors import (
    LIBRDKAFKA_CURED_BY_A_NEW_PRODUCER,
    LIBRDKAFKA_UNSENT,
    PERMANENT,
    REFUSED,
    KafkaPermanent,
    fenced,
    kafka_errors,
    librdkafka_code,
    librdkafka_error,
    librdkafka_exception,
    librdkafka_kind,
    librdkafka_producers_fault,
    librdkafka_refused,
    librdkafka_retriable,
    librdkafka_timed_out,
)
from .failures import Refusals, doubling
from .kafka_common import CLIENT_TIMEOUT_S, TRANSACTION_CALLS_S, connecting, reachable
from .ports import Partition, Refused
from .rdkafka_common import QUIET, topic_partitions
from .records import Outgoing
from .sink_base import SinkBase
from .transactions import commit_unit

log = logging.getLogger(__name__)


class RdKafkaSink(SinkBase):
    """Idempotent acks=all producer with delivery reports. A refusal (:data:`REFUSED`) runs ``on_refused``
    (the pipeline dead-letters the input), and a refused record without one (a dead letter) sets
    :attr:`failure`. A fatal error a new producer cures replaces the producer (:meth:`_fatal`); any other
    stops the member.

    At least once, as the kafka-python sink (:mod:`.kafka_sink`): librdkafka keeps a partition's order
    while it retries on its own, but a record whose delivery fails (refused, or given up on after
    ``message.timeout.ms``) goes to one queue kept in hand-over order (:mod:`.isolation`), is resent
    alone on a producer of its own (not idempotent: a refusal fails that record only, where a batch's
    refusal fails every record in it), and every later record waits behind it. That needs every batch
    behind a refused one to fail too: with ``enable.gapless.guarantee`` the refusal turns the producer
    fatal, its queue is purged, and the broker refuses what was in flight behind it out of sequence (the
    replaced producer's queue is purged again as such batches come back for a retry). Exactly once a
    failed delivery dooms the open transaction instead."""

    def __init__(self, bootstrap: str, settings: dict[str, Any], on_retry: Callable[[], None] = lambda: None,
                 linger_ms: int = 5, max_request_size: int = 1 << 20, compression_type: str | None = None,
                 transactional_id: str | None = None, transaction_timeout_ms: int = 60_000) -> None:
        # At least once, a batch the broker refuses turns the producer fatal and fails every batch behind it
        # (gapless), as kafka-python's does: by default librdkafka would bump its epoch and send the later
        # batches on, acknowledged before the refused batch's innocent records are resent alone (out of order)
        extra = ({"transactional.id": transactional_id, "transaction.timeout.ms": transaction_timeout_ms}
                 if transactional_id else {"enable.gapless.guarantee": True})
        self._settings = {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                          "linger.ms": linger_ms, "message.max.bytes": max_request_size,
                          "compression.type": compression_type or "none", "message.timeout.ms": 30_000,
                          **QUIET, **extra, **settings}
        self._bootstrap = bootstrap
        with connecting(bootstrap):
            self._producer = self._new_producer()
            if transactional_id:   # aborts what a predecessor with this id left open
                self._producer.init_transactions(TRANSACTION_CALLS_S)
                self._producer.begin_transaction()
        super().__init__(on_retry, transactional_id)
        self._lock = threading.Lock()   # the producer's replacement, and the replaced ones still served
        # replaced producers, and until when they are kept once empty: their reports are still served
        self._retired: dict[Any, float] = {}
        self._renewals_unacked = 0   # producers made since the last acknowledgement
        self._poll_thread = threading.Thread(target=self._serve, name="producer-poll", daemon=True)
        self._poll_thread.start()

    def _new_producer(self) -> Any:
        from confluent_kafka import Producer
        return Producer(self._settings)

    def _serve(self) -> None:
        """Serve delivery reports (they call ``on_ack``) until closed: the producer's, and those of producers
        it replaced for as long as they hold records, and until their time is up (:meth:`_renew`)."""
        while not self._closed:
            with self._lock:
                retired = list(self._retired.items())
            for producer, kept_until in [(self._producer, None), *retired]:
                try:   # poll raises what a delivery callback raised: said, and the thread goes on serving
                    if kept_until is not None:   # it sends nothing more: what comes back to its queue (a batch
                        # behind a refused one, answered out of order and queued for a retry) fails now, to
                        # be resent in order, not after message.timeout.ms
                        producer.purge(in_queue=True, in_flight=False, blocking=False)
                    producer.poll(0.05 if kept_until is None else 0)
                except Exception as exc:
                    if self._fatal(producer, exc):
                        continue
                    log.exception("serving the producer's delivery reports")
                    time.sleep(0.05)   # never spin on an error that repeats
                if kept_until is not None and len(producer) == 0 and time.monotonic() > kept_until:
                    with self._lock:
                        self._retired.pop(producer, None)

    def _fatal(self, producer: Any, exc: BaseException) -> bool:
        """Whether ``exc``, raised by ``poll`` or ``flush``, is librdkafka's fatal error (raised once, by the call
        that serves its event). One a new producer cures (:data:`.errors.LIBRDKAFKA_CURED_BY_A_NEW_PRODUCER`)
        replaces it; at least once, any other (no IdempotentWrite ACL, a broker without idempotence: a new
        producer would fail alike) stops the member; in a transaction the commit point says it."""
        error = librdkafka_error(exc)
        if error is None or not error.fatal():
            return False
        if self.transactional:
            log.warning("the transactional producer is in a fatal state (%s)", error.str())
        elif producer is not self._producer:   # replaced already (a timeout while the broker answered)
            log.info("a replaced producer is in a fatal state (%s)", error.str())
        elif librdkafka_code(error) in LIBRDKAFKA_CURED_BY_A_NEW_PRODUCER:   # at once, unless the producers made
            # since the last acknowledgement fail alike: then after a doubling wait (a broker that fails every new one)
            self._delayed.later(doubling(self._renewals_unacked - 1) if self._renewals_unacked else 0.0,
                                partial(self._renew, producer, error))
        else:
            self._refusals.stop("the output topics", librdkafka_exception(error), closed=self._closed)
        return True

    def _send(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
              producer: Any) -> None:
        """Produce on ``producer``; at least once the record is already counted against it
        (:meth:`Isolation.take`), and every way it comes back settles that count."""
        counted = not self.transactional

        def delivered(error: Any, _message: Any) -> None:   # on the producer-poll thread
            if error is None:
                if counted:
                    self._isolation.answered(producer)
                self._renewals_unacked = 0
                self._acknowledged(on_ack, on_refused)
            elif counted:
                self._requeue(order, record, on_ack, on_refused, error, producer)
            else:
                self._delayed.later(0.0, lambda: self._failed(record, on_ack, on_refused, error, order, True))

        def produce() -> None:
            # a plugin's str is a bug: librdkafka would send its UTF-8, kafka-python refuses it; refuse it here too
            for name, part in (("key", record.key), ("value", record.value)):
                if part is not None and not isinstance(part, bytes):
                    raise TypeError(f"a record {name} must be bytes, not {type(part).__name__}")
            extra = {"headers": record.headers} if record.headers else {}
            producer.produce(record.topic, value=record.value, key=record.key, on_delivery=delivered, **extra)

        try:
            try:
                produce()
            except BufferError as full:   # the local queue is full
                log.debug("producer queue full (%s)", full)
                too_big = self._never_fits(record)
                if too_big is not None:
                    raise too_big from full
                if counted:   # waits in its place, behind nothing and before every later record
                    from confluent_kafka import KafkaError
                    self._requeue(order, record, on_ack, on_refused, KafkaError(KafkaError._QUEUE_FULL), producer)
                else:   # in a transaction: here, so that no later record goes ahead of it in the unit
                    self._wait_for_room(produce, record, on_ack, full)
        except Exception as exc:   # a KafkaException (too large, closed) or a bad value (TypeError)
            error = librdkafka_error(exc) or exc
            if counted and (librdkafka_retriable(exc) or librdkafka_producers_fault(error)):   # closed, fatal:
                # a new producer sends it
                self._requeue(order, record, on_ack, on_refused, error, producer)
                return
            if counted:
                self._isolation.answered(producer)
            self._failed(record, on_ack, on_refused, error, order)

    def _never_fits(self, record: Outgoing) -> BaseException | None:
        """A refusal as too large for a record larger than librdkafka's whole local queue (no wait makes room for
        it; it would be turned away for ever), else None."""
        from confluent_kafka import KafkaError, KafkaException
        size = len(record.value or b"") + len(record.key or b"") + sum(len(k) + len(v or b"")
                                                                       for k, v in record.headers)
        limit = int(self._settings.get("queue.buffering.max.kbytes", 1 << 20)) * 1024
        if size <= limit:
            return None
        return KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, f"a {size}-byte record is larger than the "
                                         f"producer's local queue (queue.buffering.max.kbytes {limit // 1024})"))

    def _wait_for_room(self, produce: Callable[[], None], record: Outgoing, on_ack: Callable[[], None],
                       full: BufferError) -> None:
        """In a transaction, produce again once the poll thread's delivery reports make room in the local queue;
        given up after ``message.timeout.ms``, the transaction is doomed (the unit is redone)."""
        deadline = time.monotonic() + self._settings["message.timeout.ms"] / 1000
        while not self._closed and time.monotonic() < deadline:
            time.sleep(0.01)
            try:
                produce()
                return
            except BufferError as again:
                full = again
        self._doom(record, on_ack, full, full, probe=False)

    def _requeue(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
                 error: Any, producer: Any) -> None:
        """At least once, a record ``producer`` failed: an error only the operator can fix stops the member;
        any other queues the record in its hand-over place, to be resent alone (never from the poll thread)."""
        exc = librdkafka_exception(error)
        if Refusals.stops(exc) and not librdkafka_producers_fault(error):
            self._isolation.answered(producer)
            self._delayed.later(0.0, lambda: self._refuse(record, on_refused, exc))
            return
        if librdkafka_code(error) in LIBRDKAFKA_UNSENT:   # never refused: back to a producer in its place, not alone
            self._isolation.add(order, record, on_ack, on_refused, producer, failed=False)
            return
        self._isolation.add(order, record, on_ack, on_refused, producer)
        if librdkafka_timed_out(error):   # given up on: what the producer still queues behind it must not go out first
            producer.purge(in_queue=True, in_flight=False, blocking=False)
        self._delayed.later(0.0, partial(self._after_failure, record, error, producer))

    def _after_failure(self, record: Outgoing, error: Any, producer: Any) -> None:
        """A failed delivery whose record is queued for its ordered resend: replace a producer it left unable
        to send, say it, count it."""
        exc = librdkafka_exception(error)
        # a refused batch left the producer fatal (gapless); so can a timeout while the broker answers: after a
        # broker restart that lost its state (a new in-memory broker) the idempotent producer can wait for ever
        # on its old producer id; a new producer starts afresh
        if fenced(exc) or librdkafka_refused(error) or (librdkafka_timed_out(error) and reachable(self._bootstrap)):
            self._renew(producer, error)
        self._count_failure(record, exc)

    def _deliver_alone(self, producer: Any, record: Outgoing) -> Any:
        """Produce ``record`` alone on a probe ``producer`` and wait for its delivery report (bounded): its error,
        None when delivered."""
        from confluent_kafka import KafkaError
        answers: list[Any] = []
        extra = {"headers": record.headers} if record.headers else {}
        producer.produce(record.topic, value=record.value, key=record.key,
                         on_delivery=lambda error, _message: answers.append(error), **extra)
        producer.flush(self._settings["message.timeout.ms"] / 1000 + CLIENT_TIMEOUT_S)
        return answers[0] if answers else KafkaError(KafkaError._MSG_TIMED_OUT)

    def _send_alone(self, record: Outgoing) -> BaseException | None:
        """Send one record on a producer of its own and wait for the broker (bounded); the error or None. Not
        idempotent, one request at a time: a refusal fails that record alone."""
        from confluent_kafka import KafkaException, Producer
        if self._closed:   # no new producer after close (nothing would close it)
            return KafkaPermanent("the sink is closed")
        try:
            if self._probe is None:
                self._probe = Producer({**self._settings, "enable.idempotence": False,
                                        "enable.gapless.guarantee": False,   # it needs idempotence
                                        "max.in.flight.requests.per.connection": 1, "linger.ms": 0})
            error = self._deliver_alone(self._probe, record)
        except (BufferError, KafkaException, TypeError) as exc:
            return exc
        if error is None:
            return None
        if librdkafka_retriable(error):
            self._failing(librdkafka_exception(error))
        return librdkafka_exception(error)

    def _retriable(self, exc: BaseException) -> bool:
        return librdkafka_retriable(exc)

    def _refused_for_good(self, exc: BaseException) -> bool:
        return librdkafka_refused(exc)

    def _failed(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None, error: Any,
                order: int, reported: bool = False) -> None:
        """A failed delivery in a transaction (``reported``: in its delivery report, the broker's answer), or a
        record ``produce`` refused at once (at least once no longer counted against its producer)."""
        from confluent_kafka import KafkaError
        exc = librdkafka_exception(error)
        refused = not isinstance(error, KafkaError) or librdkafka_kind(error) == REFUSED   # a bad value too
        if self.transactional and Refusals.stops(exc) and not librdkafka_producers_fault(error):
            self._refuse(record, on_refused, exc)   # the operator's to fix: each redone unit would fail alike
            return
        if self.transactional and (reported or not refused):
            # Any failed delivery makes librdkafka's open transaction abortable: it will be aborted and this
            # unit redone. A record produce() refused at once never entered it and is refused below.
            self._doom(record, on_ack, exc, error, probe=reported and refused)
            return
        instead = self._fallback(record, exc)
        if instead is not None:
            self.publish(instead, on_ack, on_refused, order)
            return
        self._refuse(record, on_refused, exc)

    def _transact_alone(self, record: Outgoing) -> BaseException | None:
        from confluent_kafka import KafkaException, Producer
        error: Any = None
        try:
            if self._probe is None:
                self._probe = Producer({**self._settings, "transactional.id": f"{self._transactional_id}-probe",
                                        "linger.ms": 0})
                self._probe.init_transactions(TRANSACTION_CALLS_S)   # aborts what an earlier probe left open
            self._probe.begin_transaction()
            error = self._deliver_alone(self._probe, record)
        except KafkaException as failure:
            error = librdkafka_error(failure) or failure
        try:
            self._probe.abort_transaction(TRANSACTION_CALLS_S)
        except Exception:   # left unusable by the refusal: the next probe starts afresh (and aborts this one)
            self._probe = None
        return None if error is None else librdkafka_exception(error)

    def _renew(self, producer: Any, error: Any) -> None:
        """Replace a producer in librdkafka's fatal state (every later send would fail); its records fail as
        its delivery reports are served and queue for their ordered resend (or, in a transaction, doom it)."""
        from confluent_kafka import KafkaException
        with self._lock:
            if self._producer is not producer or self._closed:
                return
            log.warning("the producer is in a fatal state (%s); replacing it with a new one", error.str())
            try:
                self._producer = self._new_producer()
            except KafkaException as exc:   # the retry will find the old one and try again
                log.warning("making a new producer failed (%s); will retry", exc)
                return
            # served by _serve while it holds records. A fatal one (a refusal is, gapless) is let go once empty:
            # produce() on it fails, so nothing more can enter it. Any other is kept message.timeout.ms and a
            # margin, since a record can still be handed to it just as it is replaced
            found = librdkafka_error(error)
            fatal = found is not None and (found.fatal() or librdkafka_refused(found))
            margin = 0.0 if fatal else self._settings["message.timeout.ms"] / 1000 + 5
            self._retired[producer] = time.monotonic() + margin
            self._renewals_unacked += 1

    def commit_transaction(self, offsets: dict[Partition, int], group_metadata: Any) -> None:
        """Add the consumed offsets to the open transaction, commit it and begin the next. On failure the
        transaction is aborted (raises KafkaTransient or BrokerUnavailable) or, fenced, KafkaPermanent."""
        from confluent_kafka import KafkaException

        def commit() -> None:
            limit = time.monotonic() + TRANSACTION_CALLS_S
            self._producer.send_offsets_to_transaction(topic_partitions(offsets), group_metadata, _left(limit))
            self._producer.commit_transaction(_left(limit))
        with kafka_errors("transaction commit failed"):
            commit_unit(self._doomed, commit, self._sends_ok, self.abort_transaction, KafkaException,
                        lambda exc: self._fatal_check(exc, "committing the transaction"))
        self._begin()

    def abort_transaction(self) -> None:
        from confluent_kafka import KafkaException
        try:
            self._producer.abort_transaction(TRANSACTION_CALLS_S)
        except KafkaException as exc:
            self._fatal_check(exc, "aborting a transaction")
            raise KafkaPermanent(f"aborting a transaction failed ({exc}); exiting so a restart makes a new "
                                 f"producer") from exc
        finally:
            self._doomed = None
        self._begin()

    def _begin(self) -> None:
        from confluent_kafka import KafkaException
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:
            raise KafkaPermanent(f"beginning a transaction failed ({exc}); exiting so a restart makes a new "
                                 f"producer") from exc

    @staticmethod
    def _fatal_check(exc: BaseException, what: str) -> None:
        """A fatal transaction error (fenced: another member took over the transactional id) ends the member."""
        error = librdkafka_error(exc)
        if error is not None and (error.fatal() or librdkafka_kind(error) == PERMANENT):
            raise KafkaPermanent(f"{what}: {error.name()}: {error.str()}: this member's producer can send no more "
                                 f"(fenced when another member took over its transactional id); stopping") from exc

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            producer = self._producer
            try:
                left = producer.flush(max(0.0, min(0.1, deadline - time.monotonic())))
            except Exception as exc:   # the fatal error's event, served here rather than on the poll thread
                if not self._fatal(producer, exc):
                    raise
                continue
            if not left and not self.pending_retries():
                return True
        return not self.pending_retries() and not len(self._producer)

    def close(self) -> None:
        self.flush(CLIENT_TIMEOUT_S)
        self._stop_resending(timeout_s=1.0)
        self._poll_thread.join(1.0)
        if self._probe is not None:
            self._probe.flush(0)
        try:
            left = self._producer.flush(0)
        except Exception as exc:   # its fatal error, left unserved until now: said, and what it holds counted
            log.warning("closing the producer: %s", exc)
            left = len(self._producer)
        if left:
            log.warning("the producer closed with %d records undelivered (their inputs stay uncommitted and are "
                        "redelivered)", left)


def _left(limit: float) -> float:
    """Seconds until ``limit`` (monotonic), at least a little: librdkafka's own bound on a transaction call."""
    return max(0.1, limit - time.monotonic())
