"""Waiting in a test for another thread's or process's progress, not for the clock: the condition is looked
at again and again, and only a test that never gets there waits the whole ``timeout``."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def wait_until(condition: Callable[[], object], what: str = "", timeout: float = 30.0, step: float = 0.005) -> None:
    """Return once ``condition()`` holds; fail the test, naming ``what``, if it does not within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(step)


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (not ended, and not a zombie awaiting its parent's wait)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
