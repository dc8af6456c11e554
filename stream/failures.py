"""A client call that keeps failing: said once when it starts, once when it recovers (or is forgotten
after a quiet stretch); and what a sink does with a record the broker will never take.

Pure logic over a clock, so the service's reaction to repeated errors is unit-tested
without a broker.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .errors import PERMANENT, KafkaPermanent, fenced, kind, publish_failure
from .ports import Refused

log = logging.getLogger(__name__)


def doubling(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """``base`` doubled ``attempt`` times, at most ``cap``: a retry's wait, for however many attempts (the
    exponent is bounded: 2 ** 1024 is past what a float holds)."""
    return min(cap, base * 2 ** min(max(0, attempt), 64))


class FailureWatch:
    """Tracks one kind of call (poll, publish, commit): failing since when, with what error."""

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic,
                 forget_after_s: float | None = None) -> None:
        """``forget_after_s``: for a call made only now and then (a commit, when there is something to
        commit), a failure this long after the last one starts afresh: the calls between, if any, did not
        fail, and an idle stretch is not a failing one."""
        self.what = what
        self._clock = clock
        self.forget_after_s = forget_after_s
        self._last: float | None = None
        self.since: float | None = None
        self.error: str = ""
        self._kind = ""
        self.count = 0
        self._not_outage_since: float | None = None   # the failures since then were none of them an outage

    def failed(self, exc: BaseException, outage: bool = False) -> float:
        """Record a failure; returns how long the call has been failing with errors that are not an outage
        (0 for an outage: those are retried without a limit, and the count starts afresh after one, so a
        broker restart's aftermath is not counted from the start of the outage)."""
        now = self._clock()
        if self._stale(now) and self._last is not None:
            log.info("%s: the last failure was %.0f s ago, none since; counting afresh", self.what, now - self._last)
            self._reset()
        self._last = now
        text = str(exc)
        self._not_outage_since = None if outage else (now if self._not_outage_since is None
                                                       else self._not_outage_since)
        if self.since is None:
            self.since = now
            log.warning("%s failing: %s; retrying", self.what, text)
        elif type(exc).__name__ != self._kind:
            log.warning("%s still failing, now with: %s", self.what, text)
        self.error, self._kind = text, type(exc).__name__
        self.count += 1
        return 0.0 if self._not_outage_since is None else now - self._not_outage_since

    def ok(self) -> None:
        """Record a success; says once that the call recovered."""
        if self.since is not None and self.failing:
            log.info("%s recovered after %.1f s (%d failed attempts)", self.what, self._clock() - self.since,
                     self.count)
        self._reset()

    def _reset(self) -> None:
        self.since, self.error, self._kind, self.count, self._not_outage_since = None, "", "", 0, None

    def _stale(self, now: float) -> bool:
        return self.forget_after_s is not None and self._last is not None and now - self._last > self.forget_after_s

    @property
    def failing(self) -> bool:
        return self.since is not None and not self._stale(self._clock())

    def backoff(self, base: float = 0.1, cap: float = 5.0) -> float:
        """Seconds to wait before the next attempt: doubling from ``base`` up to ``cap``."""
        return doubling(self.count - 1, base, cap)


class Refusals:
    """A sink's records the broker will never take. The input of a record refused for good is
    dead-lettered (its ``on_refused`` runs); a refused dead letter, or an error only the operator can
    fix (PERMANENT: an ACL, acks, a codec; it would refuse every record, so dead-lettering would empty
    the stream into the dead-letter topic), stops the member instead: :attr:`failure`, logged once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watch = FailureWatch("publishing results (refused, not retriable; dead-lettering their inputs)")
        self.failure: KafkaPermanent | None = None

    @staticmethod
    def stops(exc: BaseException) -> bool:
        """Whether ``exc`` stops the member rather than refuse one record (a fenced producer is the commit
        point's or a new producer's to deal with, not the operator's)."""
        return kind(exc) == PERMANENT and not fenced(exc)

    def refuse(self, topic: str, on_refused: Refused | None, exc: BaseException, closed: bool = False) -> None:
        """A record for ``topic`` refused with ``exc``; ``closed``: the sink is closing (nothing is stopped)."""
        if on_refused is not None and not self.stops(exc):
            with self._lock:
                self._watch.failed(exc)
            on_refused(exc)
            return
        self.stop(topic, exc, dead_letter=on_refused is None, closed=closed)

    def stop(self, topic: str, exc: BaseException, dead_letter: bool = False, closed: bool = False) -> None:
        """Stop the member (:attr:`failure`, said once): ``exc`` refused a dead letter for ``topic``, or is an
        error only the operator can fix (a producer that no new one would cure)."""
        with self._lock:
            if self.failure is not None or closed:
                return
            self.failure = publish_failure(exc, topic, dead_letter)
        log.error("%s", self.failure)

    def ok(self) -> None:
        """A record that could have been refused was acknowledged: the refusals, if any, are over."""
        with self._lock:
            self._watch.ok()
