"""Records resent one at a time, in the order they were handed over: after a broker refusal, to tell
the record refused for good from those that merely shared its fate, and after the client gave up on
a send (an outage), so that no later record overtakes it. Pure logic over a "send one record and
wait" function; no Kafka.

kafka-python's idempotent producer turns a refusal (InvalidRecord, MessageSizeTooLarge, ...) fatal
and fails every batch in flight with the same error, so a failed record does not say whether it
was refused itself. Sent alone, it does: acknowledged, it was innocent; refused, it is the one.

Order: every record carries the number it was handed over with. While records wait here, every new
record queues behind them; and once a producer has failed a record, nothing is sent (alone or on a
producer) until every other record it still holds has come back, acknowledged or failed: its batches
fail one after another, in no promised order, and a record of a later batch that came back first
must not be resent ahead of an earlier one still out. The queue is kept in hand-over order.

Records that only waited (handed over while others were queued, never failed) need no test of their
own: once nothing failed is ahead of them, they go back to the producer together, as one run
(``release``), so a stream under load leaves the one-at-a-time mode once the failed records are
through, instead of staying in it for as long as records keep arriving.
"""
from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

from .ports import Refused
from .records import Outgoing

Item = tuple[int, Outgoing, Callable[[], None], "Refused | None", bool]
"""(hand-over number, record, its acknowledgement, its refusal, whether it failed)"""
Release = Callable[[list[tuple[int, Outgoing, Callable[[], None], "Refused | None"]]], None]
"""Hands records that only waited back to the producer, in order, without waiting for the broker."""
Outcome = Callable[[Outgoing, Callable[[], None], "Refused | None", "BaseException | None"], "Outgoing | None"]
"""Told what a record sent alone came to (None: acknowledged); may return a record to send in its place."""


class Isolation:
    def __init__(self, send_alone: Callable[[Outgoing], BaseException | None], final: Callable[[BaseException], bool],
                 outcome: Outcome, release: Release, max_backoff_s: float = 5.0) -> None:
        self._send_alone, self._final, self._outcome, self._release = send_alone, final, outcome, release
        self._max_backoff_s = max_backoff_s
        self._queue: list[Item] = []
        self._out: dict[object, int] = {}   # per producer: records handed to it, not yet come back
        self._failing: set[object] = set()  # producers that failed a record and still hold others
        self._sending = False               # the first record in the queue is out alone: it stays first
        self._releasing = False             # records that waited are being handed back: new ones queue
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def sent(self, producer: object) -> None:
        """A record was handed to ``producer`` (a token naming it); :meth:`answered` or :meth:`add` follows."""
        with self._cond:
            self._out[producer] = self._out.get(producer, 0) + 1

    def answered(self, producer: object) -> None:
        """A record ``producer`` held came back without joining the queue (acknowledged, or refused outright)."""
        with self._cond:
            self._back(producer)

    def take(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None) -> bool:
        """Queue ``record`` (handed over as number ``order``) if records wait here or a failing producer
        still holds some; False (not taken: send it) otherwise."""
        with self._cond:
            if not self._queue and not self._held() and not self._releasing:
                return False
            self._insert((order, record, on_ack, on_refused, False))
            return True

    def add(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
            producer: object = None) -> None:
        """A record that failed: send it alone, in its hand-over place. ``producer``: the one that failed it
        (None: it never held it), whose other records are then waited for before anything is sent."""
        with self._cond:
            self._insert((order, record, on_ack, on_refused, True))
            if producer is not None:
                self._failing.add(producer)
                self._back(producer)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="publish-isolated", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _insert(self, item: Item) -> None:
        bisect.insort(self._queue, item, lo=1 if self._sending else 0, key=lambda queued: queued[0])

    def _back(self, producer: object) -> None:
        left = self._out.get(producer, 0) - 1
        if left > 0:
            self._out[producer] = left
            return
        self._out.pop(producer, None)
        if producer in self._failing:
            self._failing.discard(producer)
            self._cond.notify_all()

    def _held(self) -> bool:
        return any(self._out.get(producer, 0) > 0 for producer in self._failing)

    def _run(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (bool(self._queue) and not self._held()))
                if self._closed:
                    return
                order, record, on_ack, on_refused, failed = self._queue[0]
                if not failed:   # only waited: it and those after it that only waited go back together
                    run = 0
                    while run < len(self._queue) and not self._queue[run][4]:
                        run += 1
                    waited, self._queue = self._queue[:run], self._queue[run:]
                    self._releasing = True
                else:
                    self._sending = True   # stays first until done: nothing overtakes it
            if not failed:
                try:
                    self._release([item[:4] for item in waited])
                finally:
                    with self._cond:
                        self._releasing = False
                        self._cond.notify_all()
                continue
            error = self._send_alone(record)
            if error is not None and not self._final(error):   # an outage: the same record again, later
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, min(self._max_backoff_s, 0.1 * 2 ** attempt))
                attempt += 1
                continue
            attempt = 0
            instead = self._outcome(record, on_ack, on_refused, error)
            with self._cond:
                if instead is not None:
                    self._queue[0] = (order, instead, on_ack, on_refused, True)
                else:
                    self._queue.pop(0)
                self._sending = False
