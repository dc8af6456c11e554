"""The service owns its log: the Kafka client's own lines are rate-limited, one per kind a minute,
and held back entirely while the service has said that the broker is away.

kafka-python writes a dozen ERROR/WARNING lines every few seconds while a broker is away;
the service itself reports each state change once (see :mod:`.service`), so the client's
repeats add nothing an on-call engineer can act on. Once the broker answers again, the
client's next line of each kind says how many like it were held back.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

# Set by the service while it has reported the broker unreachable (and said so once); cleared when it answers.
BROKER_AWAY = threading.Event()


class ClientChatter(logging.Filter):
    """Passes a ``kafka.*`` record only if none of the same logger, level and message template
    passed in the last ``interval_s``; the next one that passes says how many were held back."""

    def __init__(self, interval_s: float = 60.0, prefix: str = "kafka", clock: Callable[[], float] = time.monotonic,
                 away: threading.Event = BROKER_AWAY) -> None:
        super().__init__()
        self.interval_s, self.prefix, self._clock, self._away = interval_s, prefix, clock, away
        self._last: dict[tuple[str, int, str], float] = {}
        self._held: dict[tuple[str, int, str], int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = (record.name, record.levelno, _kind(record.msg))
        now = self._clock()
        with self._lock:
            if self._away.is_set() or now - self._last.get(key, -self.interval_s) < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if record.exc_info and record.exc_info[1] is not None:   # the client's tracebacks as one line
            record.msg = f"{record.msg} ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
            record.exc_info, record.exc_text = None, None
        if held:
            record.msg = f"{record.msg} [{held} like this held back]"
        return True


def _kind(msg: object) -> str:
    """A message's kind: its text without addresses and numbers. kafka-python formats some lines itself
    (``Task <... at 0x7f...> ran for 0.126s``), so their template differs every time."""
    return re.sub(r"0x[0-9a-fA-F]+|\d+(\.\d+)?", "#", str(msg))


def log_format(process: str | None = None) -> str:
    """One line per record; a child of ``--processes N`` tags its lines with its index (``[p1]``)."""
    tag = f"[p{process}] " if process else ""
    return f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"


def configure(level: str, process: str | None = None) -> None:
    """Logging for the service's entry point: one format, client chatter rate-limited."""
    logging.basicConfig(level=level, format=log_format(process))
    logging.getLogger("kafka").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(ClientChatter())
