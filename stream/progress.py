"""Is the member still making progress? The poll loop never waits on the pipeline, so the group
keeps a member whose inference call hangs, whose inference thread died or whose sink retries
forever: its partitions stand still. Work queued and nothing finished for a bound means stuck;
the service then fails ``/healthz`` and exits so the group moves the partitions. Pure logic."""
from __future__ import annotations

import time


class ProgressWatch:
    def __init__(self) -> None:
        self._finished = -1
        self._since = time.monotonic()

    def stalled_for(self, queued: int, finished: int, now: float | None = None) -> float:
        """Seconds that ``queued`` work has waited with ``finished`` (a running count) standing still;
        0 while nothing is queued or something finished since the last call."""
        now = time.monotonic() if now is None else now
        if queued == 0 or finished != self._finished:
            self._finished, self._since = finished, now
            return 0.0
        return now - self._since

    def reset(self) -> None:
        """Not the member's fault (Kafka is unreachable): start counting again."""
        self._finished = -1
