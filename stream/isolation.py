"""Records resent one at a time, in the order they were handed over: after a broker refusal, to tell
the record refused for good from those that merely shared its fate, and after the client gave up on
a send (an outage), so that no later record overtakes it. Pure logic over a "send one record and
wait" function; no Kafka.

kafka-python's idempotent producer turns a refusal (InvalidRecord, MessageSizeTooLarge, ...) fatal
and fails every batch in flight with the same error, so a failed record does not say whether it
was refused itself. Sent alone, it does: acknowledged, it was innocent; refused, it is the one.

Order: every record carries the number it was handed over with, and is counted against the producer
it is handed to, under the same lock that decides whether it may go there, until it comes back
(acknowledged or failed). While records wait here, every new record queues behind them; and once a
producer has failed a record, nothing is sent (alone or on a producer) until every other record it
holds has come back: its batches fail one after another, in no promised order, and a record of a
later batch that came back first must not be resent ahead of an earlier one still out. The queue is
kept in hand-over order.

Records that only waited (handed over while others were queued, never failed) need no test of their
own: once nothing failed is ahead of them, they go back to the producer one after another without
waiting for the broker (``release``), each checked again first, so a stream under load leaves the
one-at-a-time mode once the failed records are through instead of staying in it for as long as
records keep arriving. So do records a client dropped unsent (librdkafka purges a failed producer's
queue): they were never refused. A record to send alone waits until every record handed back ahead of
it has come back.
"""
from __future__ import annotations

import bisect
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .failures import doubling
from .ports import Refused
from .records import Outgoing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """A record waiting here."""
    order: int                       # its hand-over number
    record: Outgoing
    on_ack: Callable[[], None]
    on_refused: Refused | None
    failed: bool                     # it failed (resent alone) or only waited (handed back to a producer)


Outcome = Callable[[Outgoing, Callable[[], None], "Refused | None", "BaseException | None"], "Outgoing | None"]
"""Told what a record sent alone came to (None: acknowledged); may return a record to send in its place."""
Release = Callable[[Entry, object], None]
"""Hands a record that only waited to the given producer (already counted against it), not waiting for it."""


class Isolation:
    """The ordered queue of a sink's failed records and those waiting behind them, and the count of
    records each producer holds (see the module docstring)."""

    def __init__(self, send_alone: Callable[[Outgoing], BaseException | None], final: Callable[[BaseException], bool],
                 outcome: Outcome, release: Release, producer: Callable[[], object],
                 max_backoff_s: float = 5.0) -> None:
        """``producer``: the producer records go to now (may replace a fatal one first: called unlocked)."""
        self._send_alone, self._final, self._outcome, self._release = send_alone, final, outcome, release
        self._producer = producer
        self._max_backoff_s = max_backoff_s
        self._queue: list[Entry] = []
        self._out: Counter[object] = Counter()   # per producer: records handed to it, not yet come back
        self._failing: set[object] = set()  # producers that failed a record and still hold others
        self._sending = False               # the first record in the queue is out alone: it stays first
        self._releasing = False             # a record that waited is being handed back: new ones queue
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def take(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
             producer: object) -> bool:
        """Queue ``record`` (handed over as number ``order``) if records wait here or a failing producer still
        holds some: True. Else count it against ``producer``, where the caller then sends it: False."""
        with self._cond:
            if self._retire_others(producer) or self._queue or self._held() or self._releasing:
                self._insert(Entry(order, record, on_ack, on_refused, False))
                return True
            self._out[producer] += 1
            return False

    def answered(self, producer: object) -> None:
        """A record ``producer`` held came back without joining the queue (acknowledged, or refused outright)."""
        with self._cond:
            self._back(producer)

    def add(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
            producer: object = None, failed: bool = True) -> None:
        """A record that failed: send it alone, in its hand-over place. ``producer``: the one it was counted
        against (None: none), whose other records are then waited for before anything is sent. ``failed``
        False: the client dropped it unsent (purged from a failed producer's queue), so it goes back to a
        producer in its place, as a record that only waited, not alone."""
        with self._cond:
            self._insert(Entry(order, record, on_ack, on_refused, failed))
            if producer is not None:
                self._failing.add(producer)
                self._back(producer)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="publish-isolated", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def waiting(self) -> int:
        """Records not yet handed to a producer or acknowledged alone."""
        with self._cond:
            return len(self._queue) + self._releasing

    def close(self) -> None:
        """Stop the resending thread; what still waits stays unacknowledged (redelivered after a restart)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _insert(self, entry: Entry) -> None:
        bisect.insort(self._queue, entry, lo=1 if self._sending else 0, key=lambda queued: queued.order)

    def _back(self, producer: object) -> None:
        self._out[producer] -= 1
        if self._out[producer] > 0:
            return
        del self._out[producer]
        self._failing.discard(producer)
        self._cond.notify_all()   # a record to send alone may be waiting for this one

    def _held(self) -> bool:
        return any(self._out[producer] > 0 for producer in self._failing)

    def _retire_others(self, producer: object) -> bool:
        """Records now go to ``producer``: another one that still holds records (replaced, its failures not
        all back yet) is waited for as a failing one, since an earlier record it holds may still fail and
        must not be resent behind a later one ``producer`` took. True when there is one."""
        others = {other for other, held in self._out.items() if held > 0 and other is not producer}
        self._failing |= others
        return bool(others)

    def _ready(self) -> bool:
        """The first record may go: nothing a failing producer holds can still fail ahead of it, and a record
        to send alone also waits for every record handed back ahead of it (they go without waiting for the
        broker, and one sent alone must not be acknowledged before them)."""
        return bool(self._queue) and not self._held() and (not self._queue[0].failed or not any(self._out.values()))

    def _run(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._ready())
                if self._closed:
                    return
                head = self._queue[0]
                self._sending = head.failed   # a record out alone stays first until done: nothing overtakes it
            if not head.failed:
                try:
                    self._hand_back(head)
                except Exception:   # a bug past this point (making a producer): said; the record keeps its place
                    log.exception("handing a record back to the producer failed; trying again")
                    self._pause(self._max_backoff_s)
                continue
            try:
                error = self._send_alone(head.record)
            except Exception:   # a bug past this point: said; the record keeps its place and is tried again
                log.exception("resending a record to %s failed; trying again", head.record.topic)
                self._pause(self._max_backoff_s)
                continue
            if error is not None and not self._final(error):   # an outage: the same record again, later
                self._pause(doubling(attempt, cap=self._max_backoff_s))
                attempt += 1
                continue
            attempt = 0
            try:
                instead = self._outcome(head.record, head.on_ack, head.on_refused, error)
            except Exception:   # sent, but what follows failed: not sent again (it would repeat)
                log.exception("after resending a record to %s: it stays unacknowledged (redelivered after a "
                              "restart)", head.record.topic)
                instead = None
            with self._cond:
                if instead is not None:
                    self._queue[0] = Entry(head.order, instead, head.on_ack, head.on_refused, True)
                else:
                    self._queue.pop(0)
                self._sending = False

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` before trying again, or until closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed, seconds)

    def _hand_back(self, head: Entry) -> None:
        """Hand ``head``, a record that only waited, to the producer, if it is still first and nothing holds it."""
        producer = self._producer()
        with self._cond:
            if self._retire_others(producer) or self._closed or not self._queue or self._queue[0] is not head \
                    or self._held():
                return   # something failed or is still out meanwhile: the loop looks again
            self._queue.pop(0)
            self._out[producer] += 1
            self._releasing = True
        try:
            self._release(head, producer)
        finally:
            with self._cond:
                self._releasing = False
                self._cond.notify_all()
