"""Records resent one at a time, in order: after a broker refusal, to tell the record refused for
good from those that merely shared its fate, and after the client gave up on a send (an outage),
so that no later record overtakes it. Pure logic over a "send one record and wait" function; no
Kafka.

kafka-python's idempotent producer turns a refusal (InvalidRecord, MessageSizeTooLarge, ...) fatal
and fails every batch in flight with the same error, so a failed record does not say whether it
was refused itself. Sent alone, it does: acknowledged, it was innocent; refused, it is the one.
While records wait here, every new record queues behind them, so a partition's records leave in
the order they were handed over (a record that was already in flight on the main producer when the
refusal came, and fails only later, joins the queue at its end: the one place order can break).
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from .ports import Refused
from .records import Outgoing

Item = tuple[Outgoing, Callable[[], None], "Refused | None"]
Outcome = Callable[[Outgoing, Callable[[], None], "Refused | None", "BaseException | None"], "Outgoing | None"]
"""Told what a record sent alone came to (None: acknowledged); may return a record to send in its place."""


class Isolation:
    def __init__(self, send_alone: Callable[[Outgoing], BaseException | None], final: Callable[[BaseException], bool],
                 outcome: Outcome, max_backoff_s: float = 5.0) -> None:
        self._send_alone, self._final, self._outcome = send_alone, final, outcome
        self._max_backoff_s = max_backoff_s
        self._queue: deque[Item] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def take(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None) -> bool:
        """Queue ``record`` behind those isolated, if any are; False (not taken) when none are."""
        with self._cond:
            if not self._queue:
                return False
            self._queue.append((record, on_ack, on_refused))
            return True

    def add(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None) -> None:
        """A record that failed with a refusal: send it alone, after those already waiting."""
        with self._cond:
            self._queue.append((record, on_ack, on_refused))
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

    def _run(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or bool(self._queue))
                if self._closed:
                    return
                record, on_ack, on_refused = self._queue[0]   # stays first until done: nothing overtakes it
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
                    self._queue[0] = (instead, on_ack, on_refused)
                else:
                    self._queue.popleft()
