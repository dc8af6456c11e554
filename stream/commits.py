"""Offset commits sent without waiting for the broker's answer, kept until it answers (pure; no Kafka).

A synchronous commit made while a member's rejoin is pending waits behind the rejoin, and with librdkafka it
waits on the poll thread, which is the thread that would serve the rejoin: the member's intake stops for
seconds at every cooperative rebalance (docs/kafka-client.md, "Cooperative rebalancing"). So the periodic
commit is sent without waiting, and what it carried is kept here until the broker accepts it. Each later
commit carries the kept offsets again, the last one (on shutdown, or for the partitions a revocation takes)
waits for its answer, and an error the broker answered is raised at the next commit, as a synchronous
commit would have raised it.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable

from .ports import Partition


class UnansweredCommits:
    """Per partition, the highest offset sent and not yet accepted; and the last error answered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()   # answers are served by poll() and by close(), on any thread
        self._offsets: dict[Partition, int] = {}
        self._error: BaseException | None = None

    def with_unanswered(self, offsets: dict[Partition, int]) -> dict[Partition, int]:
        """``offsets`` and every offset still unanswered, the higher of the two per partition."""
        with self._lock:
            merged = dict(self._offsets)
        for partition, offset in offsets.items():
            merged[partition] = max(offset, merged.get(partition, -1))
        return merged

    def sent(self, offsets: dict[Partition, int]) -> None:
        with self._lock:
            for partition, offset in offsets.items():
                self._offsets[partition] = max(offset, self._offsets.get(partition, -1))

    def accepted(self, offsets: dict[Partition, int]) -> None:
        """The broker took ``offsets``: what they cover is answered; once nothing is unanswered, an earlier
        error is over too."""
        with self._lock:
            for partition, offset in offsets.items():
                if self._offsets.get(partition, offset + 1) <= offset:
                    del self._offsets[partition]
            if not self._offsets:
                self._error = None

    def failed(self, error: BaseException) -> None:
        """The broker refused a commit: its offsets stay unanswered (sent again with the next commit)."""
        with self._lock:
            self._error = error

    def take_error(self) -> BaseException | None:
        """The error answered since the last call, if any (raised once, at the next commit)."""
        with self._lock:
            error, self._error = self._error, None
        return error

    def drop(self, partitions: Iterable[Partition]) -> None:
        """Partitions this member no longer owns: never committed again from here."""
        with self._lock:
            for partition in partitions:
                self._offsets.pop(partition, None)
