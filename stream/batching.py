"""Adaptive dynamic batching: pure policy over a clock value and two facts the caller knows.

A batch closes when it holds ``max_batch`` items, or ``max_delay`` seconds after its
first item (Triton's dynamic batching), or -- the adaptive part -- as soon as nothing
more is on its way: the caller's inference slot is free (it is asking) and no item is
queued or still being decoded. At moderate load an image is then inferred the moment it
is decoded instead of waiting out the window alone; under backlog items keep arriving,
so batches fill to ``max_batch`` and throughput is that of full batches.
"""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(self, max_batch: int, max_delay_s: float, adaptive: bool = True) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.adaptive = adaptive
        self._items: list[T] = []
        self._deadline: float | None = None

    def add(self, item: T, now: float) -> list[T] | None:
        """Add one item; returns the batch if this item closed it."""
        if not self._items:
            self._deadline = now + self.max_delay_s
        self._items.append(item)
        if len(self._items) >= self.max_batch:
            return self._take()
        return None

    def due(self, now: float) -> list[T] | None:
        """The open batch if its delay has passed."""
        if self._items and self._deadline is not None and now >= self._deadline:
            return self._take()
        return None

    def ready(self, now: float, arriving: int) -> list[T] | None:
        """The open batch if it should run now, asked by a free inference slot.

        ``arriving``: items queued or still being decoded that could join this batch.
        With none (and ``adaptive``), waiting would only add latency: run what is here.
        """
        if self._items and self.adaptive and arriving <= 0:
            return self._take()
        return self.due(now)

    def flush(self) -> list[T] | None:
        return self._take() if self._items else None

    def wait_time(self, now: float, idle: float = 0.1) -> float:
        """How long the caller may block before the open batch is due."""
        if self._deadline is None:
            return idle
        return max(0.0, self._deadline - now)

    def _take(self) -> list[T]:
        items, self._items, self._deadline = self._items, [], None
        return items
