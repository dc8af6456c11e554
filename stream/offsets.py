"""Which offsets are safe to commit: every message at or below them is acknowledged.

Thread-safe: the poll loop adds, the producer's callbacks complete, the poll loop
commits. Pure logic; no Kafka.
"""
from __future__ import annotations

import threading
from collections import defaultdict

from .ports import Partition


class OffsetTracker:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._pending: dict[Partition, set[int]] = defaultdict(set)
        self._next: dict[Partition, int] = {}         # one past the highest offset received
        self._committed: dict[Partition, int] = {}

    def add(self, partition: Partition, offset: int) -> None:
        with self._lock:
            self._pending[partition].add(offset)
            self._next[partition] = max(self._next.get(partition, 0), offset + 1)

    def done(self, partition: Partition, offset: int) -> None:
        """Mark one message's output as acknowledged by the broker."""
        with self._lock:
            pending = self._pending.get(partition)
            if pending is not None:
                pending.discard(offset)
            self._lock.notify_all()

    def in_flight(self, partitions: list[Partition] | None = None) -> int:
        with self._lock:
            return self._count(partitions)

    def committable(self) -> dict[Partition, int]:
        """Per partition, the next offset to commit, where it moved since the last commit."""
        with self._lock:
            out = {}
            for partition, nxt in self._next.items():
                pending = self._pending.get(partition)
                offset = min(pending) if pending else nxt
                if offset > self._committed.get(partition, -1):
                    out[partition] = offset
            return out

    def committed(self, offsets: dict[Partition, int]) -> None:
        """The broker accepted ``offsets`` (from the committing thread, or from a client's answer later)."""
        with self._lock:
            for partition, offset in offsets.items():
                self._committed[partition] = max(offset, self._committed.get(partition, -1))

    def committed_offsets(self) -> dict[Partition, int]:
        """Per partition, the highest offset the broker accepted."""
        with self._lock:
            return dict(self._committed)

    def wait_idle(self, timeout: float, partitions: list[Partition] | None = None) -> bool:
        """Block until nothing is in flight (for ``partitions``, or all); False on timeout."""
        return self.wait_at_most(0, timeout, partitions)

    def wait_at_most(self, count: int, timeout: float, partitions: list[Partition] | None = None) -> bool:
        """Block until at most ``count`` messages are in flight (for ``partitions``, or all); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._count(partitions) <= count, timeout)

    def _count(self, partitions: list[Partition] | None) -> int:
        keys = self._pending.keys() if partitions is None else partitions
        return sum(len(self._pending.get(p, ())) for p in keys)

    def forget(self, partitions: list[Partition]) -> None:
        """Drop state for partitions this member no longer owns."""
        with self._lock:
            for partition in partitions:
                self._pending.pop(partition, None)
                self._next.pop(partition, None)
                self._committed.pop(partition, None)
            self._lock.notify_all()
