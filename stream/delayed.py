"""Actions run later on one thread of their own: both sinks' publish retries, and the failure handling
they move off a client's IO thread. Pure logic; the clock is handed in (tests pass one they move)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 1.0     # nothing waiting: look again after this long (a close wakes it at once)
_SHORTEST_WAIT_S = 0.01


class Delayed:
    """Actions that run once their delay has passed, in the order they fall due (those due at the same
    time in the order they came), on the thread :meth:`start` makes. What still waits at :meth:`close`
    never runs."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._name, self._clock = name, clock
        self._wake = threading.Condition()
        self._waiting: list[tuple[float, int, Callable[[], None]]] = []   # (when, arrival, action)
        self._arrivals = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def later(self, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` on this object's thread ``delay`` seconds from now (0: as soon as it can)."""
        with self._wake:
            self._arrivals += 1
            self._waiting.append((self._clock() + delay, self._arrivals, action))
            self._wake.notify()

    def pending(self) -> int:
        """Actions not yet run (a running one no longer counts)."""
        with self._wake:
            return len(self._waiting)

    def take_due(self) -> list[Callable[[], None]]:
        """The actions due now, in order, taken out (the thread runs what this returns)."""
        with self._wake:
            return self._take_due()

    def wait_s(self) -> float:
        """How long the thread sleeps before looking again: until the next action falls due."""
        with self._wake:
            return self._wait_s()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def close(self, timeout: float = 0.0) -> None:
        """Stop the thread (after the action it is running, waiting for it up to ``timeout`` s); what
        still waits is dropped."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None and timeout > 0 and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _take_due(self) -> list[Callable[[], None]]:
        now = self._clock()
        due = sorted(w for w in self._waiting if w[0] <= now)
        if due:
            self._waiting = [w for w in self._waiting if w[0] > now]
        return [action for _, _, action in due]

    def _wait_s(self) -> float:
        if not self._waiting:
            return _IDLE_WAIT_S
        return max(_SHORTEST_WAIT_S, min(at for at, _, _ in self._waiting) - self._clock())

    def _run(self) -> None:
        while True:
            with self._wake:
                due = self._take_due()
                while not self._closed and not due:
                    self._wake.wait(self._wait_s())
                    due = self._take_due()
                if self._closed:
                    return
            for action in due:
                try:
                    action()
                except Exception:   # a bug in one action must not end the thread every later retry needs
                    log.exception("a delayed action (%s) failed", self._name)
