"""Readiness (``/readyz``, the ``sentiment_ready`` gauge) and its causes, behind one lock.

Two threads change it: the broker probe (does Kafka answer, do the input topics exist) and
the poll loop (connecting, consuming, publishing, committing, shutting down). Every
transition is checked and made under the lock, so shutting down stays final: a probe that
looked at the broker just before the shutdown cannot report ready after it.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

SHUTTING_DOWN = "shutting down"


class Readiness:
    """``publish(ready, reason)`` is told of every state set (the health server's, or the gauge);
    ``log`` says each change (the service hands in its own logger, so the lines keep its name)."""

    def __init__(self, bootstrap_servers: str, publish: Callable[[bool, str], None],
                 log: logging.Logger | None = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self._publish = publish
        self._log = log or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._state: tuple[bool, str] = (False, "starting")
        self._reachable = True
        self._missing: list[str] = []
        self._topics_checked = False   # ready only once the broker probe has looked for the input topics

    @property
    def state(self) -> tuple[bool, str]:
        with self._lock:
            return self._state

    @property
    def reachable(self) -> bool:
        """What the broker probe last found."""
        with self._lock:
            return self._reachable

    def set(self, ready: bool, reason: str = "") -> None:
        """A new state, said in the log when readiness changes; none after shutting down."""
        with self._lock:
            self._set(ready, reason)

    def shut_down(self) -> None:
        """Not ready, for good."""
        self.set(False, SHUTTING_DOWN)

    def observed(self, reachable: bool, missing: list[str] | None) -> bool:
        """What the broker probe found: does Kafka answer, which input topics are missing (None: not
        looked, as while Kafka is away or when the listing failed: the last list found stands). Each change
        is said once. True when reachability changed."""
        with self._lock:
            changed = reachable != self._reachable
            if changed and reachable:
                self._log.info("Kafka at %s answers again", self.bootstrap_servers)
            elif changed:
                self._log.warning("Kafka at %s is unreachable; retrying", self.bootstrap_servers)
            self._reachable = reachable
            if missing is not None and missing != self._missing:
                if missing:
                    self._log.warning("input topic %s does not exist (it is not created by consuming): create it or "
                                      "fix --input-topic", ", ".join(repr(t) for t in missing))
                else:
                    self._log.info("every input topic exists")
                self._missing = missing
            self._topics_checked = self._topics_checked or missing is not None   # a failed listing looked at nothing
            return changed

    def update(self, failing: str | None = None) -> None:
        """Ready unless Kafka is away, an input topic is missing or not yet looked for, or ``failing``
        says what else fails (consuming, publishing, committing)."""
        with self._lock:
            if not self._reachable:
                self._set(False, f"Kafka at {self.bootstrap_servers} is unreachable")
            elif self._missing:
                self._set(False, f"input topic {', '.join(self._missing)} does not exist")
            elif not self._topics_checked:
                self._set(False, "looking for the input topics")
            elif failing is not None:
                self._set(False, failing)
            else:
                self._set(True)

    def _set(self, ready: bool, reason: str = "") -> None:
        if self._state[1] == SHUTTING_DOWN:
            return   # the probe thread may still report; shutting down is final
        if ready != self._state[0]:
            if ready or reason == SHUTTING_DOWN:
                self._log.info("ready" if ready else reason)
            else:
                self._log.warning("not ready: %s", reason)
        self._state = (ready, reason)
        self._publish(ready, reason)
