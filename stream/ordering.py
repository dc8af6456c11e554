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

    ``emit`` runs outside this object's lock (a producer's send can block, waiting for metadata):
    one thread at a time emits a partition's ready items, in order, and items that become ready
    meanwhile queue behind them, so nothing overtakes what was ready first and a blocked send
    holds up only its own partition.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._expected: dict[Hashable, deque[Hashable]] = {}
        self._done: dict[Hashable, dict[Hashable, T]] = {}
        self._ready: dict[Hashable, deque[T]] = {}   # released in order, not yet emitted
        self._emitting: set[Hashable] = set()        # partitions a thread is emitting for

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
            ready = self._ready.setdefault(partition, deque())
            while queue and queue[0] in done:
                ready.append(done.pop(queue.popleft()))
            if not ready or partition in self._emitting:
                return   # the thread emitting for this partition emits these too, after its own
            self._emitting.add(partition)
        self._emit_ready(partition, emit)

    def _emit_ready(self, partition: Hashable, emit: Callable[[T], None]) -> None:
        while True:
            with self._lock:   # the flag drops with the last check, or a newcomer's items would wait forever
                ready = self._ready[partition]
                if not ready:
                    self._emitting.discard(partition)
                    return
                item = ready.popleft()
            try:
                emit(item)
            except BaseException:   # a bug in emit: the next completion emits what is left
                with self._lock:
                    self._emitting.discard(partition)
                raise

    def waiting(self) -> int:
        """Finished items held back behind an unfinished earlier one."""
        with self._lock:
            return sum(len(d) for d in self._done.values())
