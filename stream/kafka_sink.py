"""The kafka-python sink: an acks=all producer, transactional for exactly once.

Everything here runs kafka-python. A send that fails is resent in hand-over order through
:mod:`.isolation`; a broker's refusal is found record by record and dead-lettered; a fatal producer
is replaced (at least once) or ends the member (exactly once). Client errors leave as the project's
own, through :func:`.errors.kafka_errors`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from .errors import (
    OUTAGE,
    REFUSED,
    KafkaPermanent,
    fenced,
    kafka_errors,
    kafka_python_cause,
    kafka_python_gave_up,
    kafka_python_kind,
    too_large,
)
from .failures import Refusals
from .kafka_common import CLIENT_TIMEOUT_S, TRANSACTION_CALLS_S, connecting, kafka_offsets
from .ports import Partition, Refused
from .records import Outgoing
from .sink_base import SinkBase
from .transactions import commit_unit

log = logging.getLogger(__name__)


def _async(exc: BaseException) -> bool:
    """An error from the broker (the future's errback), as opposed to one send() raised at once."""
    from kafka.errors import KafkaError
    return isinstance(exc, KafkaError)


def _fatal(producer: Any) -> bool:
    """Whether a kafka-python producer is in its fatal state (it fails everything it is handed)."""
    manager = getattr(producer, "_transaction_manager", None)   # kafka-python has no public fatal check
    return bool(getattr(manager, "has_fatal_error", lambda: False)())


def _fatal_cause(producer: Any) -> BaseException | None:
    """Why a kafka-python producer is fatal: its transaction manager's last error, unwrapped."""
    error = getattr(getattr(producer, "_transaction_manager", None), "last_error", None)
    return kafka_python_cause(error) if isinstance(error, BaseException) else None


class _Withdrawn(Exception):
    """A record taken back unsent from a producer's queue (:func:`_withdraw_unsent`)."""


def _withdraw_unsent(producer: Any) -> None:
    """Fail the batches ``producer`` has not sent yet with :class:`_Withdrawn` (in-flight ones get the broker's
    answer), as librdkafka's purge does: kafka-python expires batches by age, one partition at a time, and
    sends the later ones on, ahead of the expired ones' resend. Private API: kafka-python has no public one."""
    accumulator = getattr(producer, "_accumulator", None)
    if accumulator is not None:
        accumulator.abort_undrained_batches(_Withdrawn("taken back unsent, to be resent in order"))


def retriable(exc: BaseException) -> bool:
    """Whether sending again can succeed: a retriable Kafka error or an outage; never a bad record."""
    from kafka.errors import KafkaError
    return isinstance(exc, KafkaError) and (exc.retriable or kafka_python_kind(exc) == OUTAGE)


def refused_for_good(exc: BaseException) -> bool:
    """A broker refusal no resend can change (REFUSED in :data:`.errors.KAFKA_PYTHON`: InvalidRecord, a
    broker-side schema or policy check, MessageSizeTooLarge, ...). kafka-python's
    idempotent producer turns such an error fatal and fails every batch in flight with it, so the
    record that carries it may only have shared the refused one's fate. The one classification the
    at-least-once and the exactly-once publishing paths both use."""
    return kafka_python_kind(exc) == REFUSED and _async(exc)


class KafkaSink(SinkBase):
    """acks=all producer. A send that fails with a retriable Kafka error is retried with backoff until
    acknowledged or closed; any other error refuses the record: its ``on_refused`` runs (the pipeline
    dead-letters the input), and a refused record without one (a dead letter) sets :attr:`failure`.

    With a ``transactional_id`` (exactly-once) every send goes into the open transaction; a send the
    broker fails is not retried but dooms the transaction: the record counts as handled so the unit
    can finish, and :meth:`commit_transaction` then aborts it (the unit is redone after a rewind).

    Order (at least once): the client retries in order until its delivery timeout (120 s); a record it
    gives up on, or that a refusal failed, is resent through one queue kept in hand-over order
    (:mod:`.isolation`) that every later record then waits behind, and nothing leaves that queue while
    the producer that failed it still holds records of its own (they fail after it, batch by batch, and
    take their places in the queue)."""

    def __init__(self, bootstrap: str, client_options: dict[str, Any], on_retry: Callable[[], None] = lambda: None,
                 linger_ms: int = 5, max_request_size: int = 1 << 20, compression_type: str | None = None,
                 transactional_id: str | None = None, transaction_timeout_ms: int = 60_000,
                 transaction_calls_s: float = TRANSACTION_CALLS_S) -> None:
        # At least once the client retries a send without a count (kafka-python's default), in order, until
        # delivery_timeout_ms; a record it gives up on is resent through the ordered queue. In a transaction a
        # failed send dooms the unit, so there it gives up after 5.
        extra = ({"transactional_id": transactional_id, "transaction_timeout_ms": transaction_timeout_ms, "retries": 5}
                 if transactional_id else {})
        self._settings = dict(bootstrap_servers=bootstrap, acks="all", linger_ms=linger_ms, max_block_ms=10_000,
                              bootstrap_timeout_ms=5_000, max_request_size=max_request_size,
                              compression_type=compression_type, **extra, **client_options)
        with connecting(bootstrap):
            self._producer = self._new_producer()
            if transactional_id:
                self._producer.init_transactions()   # aborts what a predecessor with this id left open
                self._producer.begin_transaction()
        super().__init__(on_retry, transactional_id)
        self._renew_lock = threading.Lock()
        self._calls_s = transaction_calls_s   # each commit point's transaction calls together, and an abort

    def _new_producer(self) -> Any:
        from kafka import KafkaProducer
        return KafkaProducer(**self._settings)

    def _new_probe(self) -> Any:
        from kafka import KafkaProducer
        return KafkaProducer(**{**self._settings, "enable_idempotence": False, "retries": 0,
                                "max_in_flight_requests_per_connection": 1, "linger_ms": 0})

    def _send_alone(self, record: Outgoing) -> BaseException | None:
        """Send one record on a producer of its own and wait for the broker (bounded); the error or None.
        Not idempotent, one request at a time: a refusal fails that record alone, never the producer."""
        from kafka.errors import KafkaError
        try:
            probe = self._probe_unless_closed(self._new_probe)
            if probe is None:
                return KafkaError("the sink is closed")
            _send_on(probe, record).get(timeout=CLIENT_TIMEOUT_S * 6)
        except Exception as exc:
            if retriable(exc):
                self._failing(exc)
            return exc
        return None

    def _probe_unless_closed(self, make: Callable[[], Any]) -> Any:
        """The probe producer, made by ``make`` where there is none yet; None once the sink is closed (nothing
        would close a producer made after close())."""
        with self._renew_lock:
            if self._closed:
                return None
            if self._probe is None:
                self._probe = make()
            return self._probe

    def _retriable(self, exc: BaseException) -> bool:
        return retriable(exc)

    def _refused_for_good(self, exc: BaseException) -> bool:
        return refused_for_good(exc)

    def _renewed(self, exc: BaseException, producer: Any) -> bool:
        """After a broker restart kafka-python's idempotent producer can be left in a fatal state
        (InitProducerId failed) that fails every later send; at least once, a new producer fixes it.
        True when ``exc`` came from such a state of ``producer`` (the one that sent the record: a
        fatal error fails its whole buffer at once), so the record is worth sending again."""
        from kafka.errors import OutOfOrderSequenceNumberError, UnknownProducerIdError
        fatal = _fatal(producer)
        if self.transactional or not (fatal or isinstance(exc, (UnknownProducerIdError,
                                                                 OutOfOrderSequenceNumberError))):
            return False
        if fatal:
            self._replace(producer, exc)
        return True

    def _replace(self, producer: Any, why: object) -> None:
        """Replace ``producer``, fatal, with a new one (unless that was done already); the old one is closed
        on a thread of its own, failing what it still holds."""
        from kafka.errors import KafkaError
        cause = _fatal_cause(producer)
        if cause is not None and Refusals.stops(cause):
            # no new producer would do better (an ACL): the member stops; the record is not refused, its input
            # stays uncommitted and is redelivered
            self._refusals.stop("the output topics", cause, closed=self._closed)
            return
        with self._renew_lock:
            if self._producer is not producer or self._closed:
                return
            log.warning("the producer is in a fatal state (%s); replacing it with a new one", why)
            try:
                self._producer = self._new_producer()
            except KafkaError as again:   # the broker is away: the retry will try again
                log.warning("making a new producer failed (%s); will retry", again)
                return
        threading.Thread(target=close_producer, args=(producer, 30.0), name="old-producer-close",
                         daemon=True).start()

    def _current_producer(self) -> Any:
        """The producer records go to now: a new one where a failure left it fatal and the replacement has not
        happened yet (it would only fail them again)."""
        if _fatal(self._producer):
            self._replace(self._producer, "it failed the records waiting to be sent")
        return self._producer

    def _send(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
              producer: Any) -> None:
        """Send on ``producer``; at least once the record is already counted against it (:meth:`Isolation.take`),
        and every way it comes back settles that count: acknowledged, refused, or queued to be resent."""
        counted = not self.transactional

        def ok(_metadata: Any) -> None:
            if counted:
                self._isolation.answered(producer)
            self._acknowledged(on_ack, on_refused)

        def resend_in_place(exc: BaseException) -> None:
            """Queued at once, in its hand-over place, and nothing is sent until this producer's other records
            have come back: none overtakes it."""
            self._isolation.add(order, record, on_ack, on_refused, producer)
            self._delayed.later(0.0, partial(self._after_failure, record, exc, producer))

        def failed(exc: BaseException) -> None:   # on the producer's IO thread: never send from here
            if counted and isinstance(exc, _Withdrawn):   # never sent: back to a producer in its place
                self._isolation.add(order, record, on_ack, on_refused, producer, failed=False)
                return
            if counted and kafka_python_gave_up(exc):   # given up on (delivery_timeout_ms): what the
                self._delayed.later(0.0, partial(_withdraw_unsent, producer))   # producer still queues waits
            if counted and _async(exc) and not Refusals.stops(exc):
                resend_in_place(exc)
                return
            if counted and Refusals.stops(exc):   # the operator's to fix: no resend can help
                self._isolation.answered(producer)
                self._delayed.later(0.0, lambda: self._refuse(record, on_refused, exc))
                return
            self._delayed.later(0.0, lambda: self._failed(record, on_ack, on_refused, order, exc, producer))

        try:
            future = _send_on(producer, record)
        except Exception as exc:  # KafkaTimeoutError while the broker is away, a closed producer, a bad record
            if counted and retriable(exc):   # resent in its place, once the records the producer holds are back
                resend_in_place(exc)
                return
            self._failed(record, on_ack, on_refused, order, exc, producer, sent=False)
            return
        future.add_callback(ok)
        future.add_errback(failed)

    def _transact_alone(self, record: Outgoing) -> BaseException | None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError
        settings = {**self._settings, "transactional_id": f"{self._transactional_id}-probe", "linger_ms": 0}
        error: BaseException | None = None

        def transactional_probe() -> Any:
            probe = KafkaProducer(**settings)
            probe.init_transactions()   # aborts what an earlier probe left open
            return probe
        try:
            probe = self._probe_unless_closed(transactional_probe)
            if probe is None:
                return KafkaError("the sink is closed")
            probe.begin_transaction()
            _send_on(probe, record).get(timeout=CLIENT_TIMEOUT_S * 6)
        except Exception as failure:
            error = failure
        probe = self._probe
        if probe is None or self._closed:   # close() closed it: an abort on a closed producer waits for ever
            return error
        try:   # bounded, as kafka-python's abort waits on the coordinator without a bound of its own
            self._bounded("aborting the probe's transaction", time.monotonic() + self._calls_s, probe.abort_transaction)
        except Exception as exc:   # the next probe starts afresh (and aborts this one)
            if isinstance(exc, KafkaPermanent):   # unanswered: its call waits on for ever, a thread each time; as
                # with the main producer's unanswered transaction calls the member stops (a restart makes new ones)
                self._refusals.stop(record.topic, exc, closed=self._closed)
            else:   # left fatal by the refusal
                log.warning("aborting the probe producer's transaction failed (%s); the next record sent alone "
                            "makes a new one", exc)
            self._probe = None
            threading.Thread(target=close_producer, args=(probe, 5.0), daemon=True).start()
        return error

    def _after_failure(self, record: Outgoing, exc: BaseException, producer: Any) -> None:
        """A broker failure whose record is already queued for an ordered resend: replace a producer
        it left fatal, then :meth:`_count_failure`."""
        self._renewed(exc, producer)
        self._count_failure(record, exc)

    def _failed(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None, order: int,
                exc: BaseException, producer: Any, sent: bool = True) -> None:
        """A send that failed (at least once: counted against ``producer``, each branch settling it);
        ``sent=False``: send() itself raised ``exc``, and the record never entered the producer."""
        counted = not self.transactional
        instead = self._fallback(record, exc)
        if instead is not None:
            if counted:
                self._isolation.answered(producer)
            self.publish(instead, on_ack, on_refused, order)
            return
        if not sent and too_large(exc):   # measured by send() against max_request_size: no broker saw it, no
            if counted:                   # resend can change it, and no open transaction holds it
                self._isolation.answered(producer)
            log.warning("a record for %s is larger than this producer's max_request_size: refused", record.topic)
            self._refuse(record, on_refused, exc)
            return
        if counted and refused_for_good(exc):   # raised by send() itself: a record fault, not publishing failing
            self._renewed(exc, producer)
            log.warning("a record for %s was refused (%s): resending it alone, to find whether it is refused for "
                        "good", record.topic, exc)
            self._isolation.add(order, record, on_ack, on_refused, producer)
            return
        if not retriable(exc) and not (self.transactional and _async(exc)) and not self._renewed(exc, producer):
            if counted:
                self._isolation.answered(producer)
            self._refuse(record, on_refused, exc)
            return
        if self.transactional and Refusals.stops(exc):
            self._refuse(record, on_refused, exc)   # the operator's to fix: each redone unit would fail alike
            return
        if self.transactional:
            self._doom(record, on_ack, exc, exc, probe=refused_for_good(exc))
            return
        log.debug("publish to %s failed (%s); resending it in order", record.topic, exc)
        # in the ordered queue, not after a delay of its own: a later record sent meanwhile would overtake it
        self._isolation.add(order, record, on_ack, on_refused, producer)
        self._count_failure(record, exc)   # the producer was renewed above where it is fatal

    def commit_transaction(self, offsets: dict[Partition, int], group_metadata: Any) -> None:
        """Add the consumed offsets to the open transaction, commit it and begin the next.
        On failure the transaction is aborted (raises KafkaTransient) or, fenced, KafkaPermanent."""
        from kafka.errors import KafkaError

        def commit() -> None:
            limit = time.monotonic() + self._calls_s
            committed = kafka_offsets(offsets)
            self._bounded("adding the offsets to the transaction", limit,
                          lambda: self._producer.send_offsets_to_transaction(committed, group_metadata))
            self._bounded("committing the transaction", limit, self._producer.commit_transaction)
        with kafka_errors("transaction commit failed"):
            commit_unit(self._doomed, commit, self._sends_ok, self.abort_transaction, KafkaError,
                        self._fenced_check)
        self._begin()

    def _bounded(self, what: str, limit: float, call: Callable[[], Any]) -> None:
        """Run a transaction call that kafka-python lets wait on the coordinator without a bound on its
        own thread, until ``limit`` (monotonic): past it the member ends (KafkaPermanent); the call's own
        error is raised here."""
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                call()
                outcome.append(None)
            except BaseException as exc:   # handed to the caller's thread
                outcome.append(exc)
        worker = threading.Thread(target=run, name="transaction-call", daemon=True)
        worker.start()
        worker.join(max(0.0, limit - time.monotonic()))
        if not outcome:
            raise KafkaPermanent(f"{what}: the transaction coordinator did not answer within "
                                 f"{self._calls_s:g} s; exiting so a restart makes a new producer")
        if outcome[0] is not None:
            raise outcome[0]

    def _must(self, what: str, call: Callable[[], Any]) -> None:
        """A transaction call whose failure only a new producer can fix (or that says it was fenced)."""
        from kafka.errors import KafkaError
        try:
            call()
        except KafkaError as exc:
            self._fenced_check(exc)
            raise KafkaPermanent(f"{what} failed ({exc}); exiting so a restart makes a new producer") from exc

    def _begin(self) -> None:
        self._must("beginning a transaction", self._producer.begin_transaction)

    def abort_transaction(self) -> None:
        try:
            limit = time.monotonic() + self._calls_s
            self._must("aborting a transaction",
                       lambda: self._bounded("aborting a transaction", limit, self._producer.abort_transaction))
        finally:
            self._doomed = None
        self._begin()

    @staticmethod
    def _fenced_check(exc: BaseException) -> None:
        if fenced(exc):
            raise KafkaPermanent(f"this member's producer was fenced ({type(exc).__name__}): another member "
                                 f"took over its transactional id; stopping") from exc

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        self._flush_producer(timeout)
        while self.pending_retries() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._flush_producer(max(0.1, deadline - time.monotonic()))   # what the resends handed back to it
        return not self.pending_retries()

    def _flush_producer(self, timeout: float) -> None:
        try:
            self._producer.flush(timeout=max(0.1, timeout))
        except Exception as exc:
            log.warning("flush: %s", exc)

    def close(self) -> None:
        self._stop_resending()   # no producer is made after this (each is made under the lock, if not closed)
        with self._renew_lock:   # one being made now is made first, and closed here
            probe, producer = self._probe, self._producer
        if probe is not None:
            close_producer(probe, CLIENT_TIMEOUT_S)
        close_producer(producer, CLIENT_TIMEOUT_S)


def _send_on(producer: Any, record: Outgoing) -> Any:
    """``producer.send`` of ``record``, its future. kafka-python refuses a null header value, which Kafka carries
    (a Java producer's ``headers.add(key, null)``) and an input can hand on to its result and dead letter: it
    goes as empty bytes, the nearest kafka-python can send."""
    headers = [(key, b"" if value is None else value) for key, value in record.headers]
    return producer.send(record.topic, key=record.key, value=record.value, headers=headers)


def close_producer(producer: Any, timeout: float) -> bool:
    """Close a kafka-python producer within about ``timeout`` s; False when it still held records.

    kafka-python's ``close`` flushes first and raises on a flush timeout before stopping its
    thread, so a producer whose records are still failing (a fatal one being replaced, a
    broker gone) is closed by trying again until they have failed or the time is up.
    """
    from kafka.errors import KafkaError
    deadline = time.monotonic() + timeout
    while True:
        try:
            producer.close(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            return True
        except KafkaError as exc:
            if time.monotonic() >= deadline:
                log.warning("a Kafka producer did not close within %.0f s (%s): the records it still held are "
                            "given up (their inputs stay uncommitted and are redelivered)", timeout, exc)
                return False
            time.sleep(0.1)   # close may also fail at once: never spin
