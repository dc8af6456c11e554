"""A client call that keeps failing: said once when it starts, once when it recovers.

Pure logic over a clock, so the service's reaction to repeated errors is unit-tested
without a broker.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class FailureWatch:
    """Tracks one kind of call (poll, publish, commit): failing since when, with what error."""

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self._clock = clock
        self.since: float | None = None
        self.error: str = ""
        self._kind = ""
        self.count = 0

    def failed(self, exc: BaseException) -> float:
        """Record a failure; returns how long the call has been failing (0 on the first)."""
        now = self._clock()
        text = str(exc)
        if self.since is None:
            self.since = now
            log.warning("%s failing: %s; retrying", self.what, text)
        elif type(exc).__name__ != self._kind:
            log.warning("%s still failing, now with: %s", self.what, text)
        self.error, self._kind = text, type(exc).__name__
        self.count += 1
        return now - self.since

    def ok(self) -> None:
        """Record a success; says once that the call recovered."""
        if self.since is not None:
            log.info("%s recovered after %.1f s (%d failed attempts)", self.what, self._clock() - self.since,
                     self.count)
        self.since, self.error, self._kind, self.count = None, "", "", 0

    @property
    def failing(self) -> bool:
        return self.since is not None

    def backoff(self, base: float = 0.1, cap: float = 5.0) -> float:
        """Seconds to wait before the next attempt: doubling from ``base`` up to ``cap``."""
        return min(cap, base * 2 ** max(0, self.count - 1))
