"""The service's side of a rebalance: what is drained, what may be committed, what to forget.

Pure logic over the offset tracker; sources call it from wherever their client runs
rebalance callbacks (kafka-python's IO thread), so nothing here blocks.

Work that outlives its assignment stays tracked. Under the eager protocol every partition
is revoked at each rebalance, and one the member is assigned again keeps its fetch
position (kafka-python keeps a retained partition's state): the client goes on after the
messages already fetched, so any of them still in the pipeline (a drain that did not
finish in time) must go on holding that partition's commits back until acknowledged.
Only at the assignment is a partition's state dropped: for those that went elsewhere,
and for those new to the member (they start again from the committed offset). Lost
partitions (an eviction drops the client's positions) are dropped at once. Under the
cooperative protocol (librdkafka's cooperative-sticky) a rebalance revokes and assigns only the
partitions that move; the rules above hold as they are, the kept partitions untouched.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .metrics import Metrics
from .offsets import OffsetTracker
from .ports import Partition, show

if TYPE_CHECKING:
    from .errors import KafkaPermanent
    from .transactions import Transactions

log = logging.getLogger(__name__)


class Rebalance:
    """Implements :class:`~.ports.RebalanceHandler` for the service."""

    def __init__(self, tracker: OffsetTracker, metrics: Metrics, drain_timeout_s: float) -> None:
        self.tracker, self.metrics = tracker, metrics
        self.drain_timeout_s = drain_timeout_s
        self._lock = threading.Lock()
        self._owned: set[Partition] = set()
        self._revoked: set[Partition] = set()   # since the last assignment; kept by the client if assigned again
        self.transactions: Transactions | None = None   # exactly-once: commits or aborts on revocation
        self.failure: KafkaPermanent | None = None

    def drained(self, partitions: Sequence[Partition]) -> bool:
        return self.tracker.in_flight(list(partitions)) == 0

    def committable(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        wanted = set(partitions)
        return {p: o for p, o in self.tracker.committable().items() if p in wanted}

    def committed(self, offsets: dict[Partition, int]) -> None:
        self.tracker.committed(offsets)

    def released(self, partitions: Sequence[Partition], lost: bool) -> None:
        if lost:
            self.tracker.forget(list(partitions))
        for topic, partition in partitions:
            try:
                self.metrics.lag.remove(topic, str(partition))
            except KeyError:   # no lag was reported for it yet
                pass
        with self._lock:
            self._owned -= set(partitions)
            if not lost:
                self._revoked |= set(partitions)
        if lost:
            log.warning("partitions lost (this member was evicted from the group): %s; their uncommitted work "
                        "will be redelivered to the new owner", show(partitions))
        else:
            log.info("partitions revoked: %s", show(partitions))

    def assigned(self, partitions: Sequence[Partition]) -> None:
        new = set(partitions)
        with self._lock:
            # kept (revoked, assigned again): the client keeps its position, so the tracker keeps its state
            stale = (self._revoked - new) | (new - self._revoked)
            self._revoked = set()
            self._owned |= new
        self.tracker.forget(sorted(stale))
        log.info("partitions assigned: %s", show(partitions))

    def owned(self) -> set[Partition]:
        with self._lock:
            return set(self._owned)

    def fail(self, failure: KafkaPermanent) -> None:
        log.error("%s", failure)
        self.failure = self.failure or failure
