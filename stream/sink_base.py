"""What both Kafka sinks (kafka-python's :mod:`.kafka_sink`, librdkafka's :mod:`.rdkafka_sink`) do alike
around a client: hand-over numbers and the ordered resend of failed records (:mod:`.isolation`), the
failure watch behind ``/readyz`` and ``failing_since``, refusals and dead letters (:class:`.Refusals`),
the value-less fallback of a record too large, and, exactly once, the open transaction a failed send
dooms and the probe that tells a refused record from those that shared its fate.

A subclass supplies the client: it makes the producer (``self._producer``), sends (:meth:`_send`), sends
one record alone (:meth:`_send_alone`) or alone in a transaction that is then aborted
(:meth:`_transact_alone`), and classifies its client's errors (:meth:`_retriable`,
:meth:`_refused_for_good`). No Kafka here.
"""
from __future__ import annotations

import itertools
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from .delayed import Delayed
from .errors import KafkaPermanent, fenced, too_large
from .failures import FailureWatch, Refusals
from .isolation import Entry, Isolation
from .ports import Refused
from .records import Outgoing, fingerprint

log = logging.getLogger(__name__)


class SinkBase(ABC):
    """The client-independent half of a sink (see the module docstring)."""

    _producer: Any

    def __init__(self, on_retry: Callable[[], None], transactional_id: str | None) -> None:
        self.transactional, self._transactional_id = bool(transactional_id), transactional_id
        self._on_retry = on_retry
        self._doomed: BaseException | Any = None   # a send failed inside the open transaction: why (the
        # client's error: an exception, or librdkafka's KafkaError)
        self._delayed = Delayed("publish-retry")   # retries, and failure handling off the client's threads
        self._closed = False
        self._watch_lock = threading.Lock()
        self._sending = FailureWatch("publishing to Kafka")
        self._refusals = Refusals()
        self.failing_since: float | None = None
        self._probe: Any = None   # made at the first failure that needs a record sent alone
        # exactly once: records a broker refused when sent alone (in a probe transaction, aborted), by
        # fingerprint; when the unit is redone they are refused at once and their inputs dead-lettered
        self._refused: dict[bytes, BaseException] = {}
        self._isolation = Isolation(self._send_alone, lambda exc: not self._retriable(exc), self._isolated_outcome,
                                    self._released, self._current_producer)
        self._handed = itertools.count()   # each record's hand-over number: the isolation's order
        self._delayed.start()

    # ---- the client's part ----
    @abstractmethod
    def _send(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
              producer: Any) -> None:
        """Send on ``producer``; at least once the record is already counted against it (:meth:`Isolation.take`),
        and every way it comes back must settle that count."""

    @abstractmethod
    def _send_alone(self, record: Outgoing) -> BaseException | None:
        """Send one record on a producer of its own (not idempotent, one request at a time, so that a refusal
        fails that record alone) and wait for the broker, bounded; the error or None."""

    @abstractmethod
    def _transact_alone(self, record: Outgoing) -> BaseException | None:
        """Exactly once: send one record alone in a transaction of its own on the probe producer, then abort
        it (a read_committed reader never sees it); the send's error or None."""

    @abstractmethod
    def _retriable(self, exc: BaseException) -> bool:
        """Sending again can succeed: an outage, a transient error; never a bad record."""

    @abstractmethod
    def _refused_for_good(self, exc: BaseException) -> bool:
        """The broker refused the record (or a batch it was in): no resend of the same bytes can change that."""

    def _current_producer(self) -> Any:
        """The producer records go to now."""
        return self._producer

    # ---- publishing ----
    def publish(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None = None,
                order: int | None = None) -> None:
        """``order``: the hand-over number of the record this one stands in for (a value-less fallback);
        None for a record handed over now."""
        if self._refused and fingerprint(record) in self._refused:   # exactly once: known to be refused
            self._refuse(record, on_refused, self._refused[fingerprint(record)])
            return
        order = next(self._handed) if order is None else order
        producer = self._producer
        if not self.transactional and self._isolation.take(order, record, on_ack, on_refused, producer):
            return   # records queued after a failure go first: this one waits its turn behind them
        self._send(order, record, on_ack, on_refused, producer)

    def _released(self, entry: Entry, producer: Any) -> None:
        """A record that waited behind failed ones, handed back to ``producer`` (counted against it)."""
        self._send(entry.order, entry.record, entry.on_ack, entry.on_refused, producer)

    def _acknowledged(self, on_ack: Callable[[], None], on_refused: Refused | None) -> None:
        """A record the broker took: publishing (and a record's refusals) no longer failing."""
        self._sends_ok()
        if on_refused is not None:
            self._refusals.ok()
        on_ack()

    def _fallback(self, record: Outgoing, exc: BaseException) -> Outgoing | None:
        """The value-less record to publish instead of one refused as too large, where it has one."""
        if record.fallback is None or not too_large(exc):
            return None
        log.warning("a %d-byte record for %s was refused as too large; publishing it without its value",
                    len(record.value or b""), record.topic)
        return record.fallback

    def _isolated_outcome(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
                          exc: BaseException | None) -> Outgoing | None:
        """What a record sent alone came to: acknowledged, or refused for good (its own fault). Once the sink is
        closing, a failure is only that: the record stays unacknowledged, its input redelivered after the
        restart, not dead-lettered."""
        if exc is not None and self._closed:
            return None
        if exc is None:
            self._acknowledged(on_ack, on_refused)
            return None
        instead = self._fallback(record, exc)
        if instead is not None:
            return instead
        if not Refusals.stops(exc):   # that one stops the member, saying so itself
            log.warning("broker refused a record for %s for good (%s)", record.topic, exc)
        self._refuse(record, on_refused, exc)
        return None

    def _count_failure(self, record: Outgoing, exc: BaseException) -> None:
        """Say a failure whose record is queued for its ordered resend, and count it."""
        self._failing(exc)
        if self._refused_for_good(exc):
            log.warning("broker refused a record for %s (%s): resending it and what failed with it one at a "
                        "time, to find the record refused for good", record.topic, exc)
        self._on_retry()

    def _failing(self, exc: BaseException) -> None:
        """Publishing failed with ``exc`` (``failing_since`` is set, the watch says it once)."""
        with self._watch_lock:
            self._sending.failed(exc)
            self.failing_since = self._sending.since

    def _sends_ok(self) -> None:
        """A record delivered or a transaction committed: publishing is not failing (any more)."""
        with self._watch_lock:
            self._sending.ok()
            self.failing_since = None

    # ---- exactly once ----
    def _doom(self, record: Outgoing, on_ack: Callable[[], None], exc: BaseException, why: Any,
              probe: bool) -> None:
        """A send failed in the open transaction: it cannot commit now, and will be aborted and the unit
        redone. The record counts as handled so the unit can finish; ``why`` is what the commit says (a
        fencing wins); ``probe``: find out, off this transaction, whether this record is a refused one."""
        if probe:
            self._delayed.later(0.0, lambda: self._probe_in_transaction(record, exc))
        with self._watch_lock:
            self._sending.failed(exc)
            self._doomed = why if fenced(exc) else self._doomed or why
        on_ack()

    def _probe_in_transaction(self, record: Outgoing, exc: BaseException) -> None:
        """Exactly once: send a record that failed with a refusal alone, in a transaction of its own that is
        then aborted. Refused alone, it is remembered; the records that merely shared its fate (a refusal
        fails its whole batch) are redone with the unit."""
        if fingerprint(record) in self._refused or self._closed:
            return
        error = self._transact_alone(record)
        if error is not None and self._refused_for_good(error):
            log.warning("broker refuses a record for %s for good (%s); its input will be dead-lettered when "
                        "the unit is redone", record.topic, error)
            self._refused[fingerprint(record)] = error
        else:
            log.info("a record for %s that failed with %s is accepted alone; it is redone with its unit",
                     record.topic, exc)

    def _stop_resending(self, timeout_s: float = 0.0) -> None:
        """Closing: no more retries or resends (waiting up to ``timeout_s`` for the one running); what still
        waits stays unacknowledged, its input redelivered after the restart."""
        self._closed = True
        self._delayed.close(timeout=timeout_s)
        self._isolation.close()

    # ---- state ----
    @property
    def failure(self) -> KafkaPermanent | None:
        """Set when a refusal only the operator can fix, or a refused dead letter, stops the member."""
        return self._refusals.failure

    def _refuse(self, record: Outgoing, on_refused: Refused | None, exc: BaseException) -> None:
        self._refusals.refuse(record.topic, on_refused, exc, self._closed)

    def pending_retries(self) -> int:
        """Records still to be resent or handed back to the producer, and failures still being handled."""
        return self._delayed.pending() + self._isolation.waiting()
