"""Dynamic batching as in Triton: a batch closes at ``max_batch`` items or ``max_delay``
seconds after its first item, whichever comes first. Pure logic over a clock value."""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(self, max_batch: int, max_delay_s: float) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
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

    def flush(self) -> list[T] | None:
        return self._take() if self._items else None

    def wait_time(self, now: float, idle: float = 0.1) -> float:
        """How long the caller may block before the open batch is due."""
        if self._deadline is None:
            return idle
        return max(0.0, self._deadline - now)

    def __len__(self) -> int:
        return len(self._items)

    def _take(self) -> list[T]:
        items, self._items, self._deadline = self._items, [], None
        return items
