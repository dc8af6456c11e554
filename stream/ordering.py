"""Per-partition order: results leave in the order their inputs arrived, whatever order the
decode pool and inference threads finish them in. Pure logic; no Kafka.

Items are named by a token unique to one delivery (the service uses the message object's
id), not by offset: after a rebalance the same offset can be in flight twice, an old copy
still finishing while the redelivered one starts.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class InOrder(Generic[T]):
    """Items complete in any order; each partition's are emitted in the order they were expected.

    ``emit`` runs under this object's lock, so what one thread emits can never overtake what
    another emitted first (the sink's publish is a non-blocking hand-off).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._expected: dict[Hashable, deque[Hashable]] = {}
        self._done: dict[Hashable, dict[Hashable, T]] = {}

    def expect(self, partition: Hashable, token: Hashable) -> None:
        if self.enabled:
            with self._lock:
                self._expected.setdefault(partition, deque()).append(token)

    def complete(self, partition: Hashable, token: Hashable, item: T, emit: Callable[[T], None]) -> None:
        """Record one finished item; emit it and every later one now unblocked, in order."""
        if not self.enabled:
            emit(item)
            return
        with self._lock:
            done = self._done.setdefault(partition, {})
            done[token] = item
            queue = self._expected.get(partition, deque())
            while queue and queue[0] in done:
                emit(done.pop(queue.popleft()))

    def waiting(self) -> int:
        """Finished items held back behind an unfinished earlier one."""
        with self._lock:
            return sum(len(d) for d in self._done.values())
