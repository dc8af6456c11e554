"""Waiting in a test for another thread's or process's progress, not for the clock: the condition is looked
at again and again, and only a test that never gets there waits the whole ``timeout``."""
from __future__ import annotations

import subprocess
import sys
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


def ends_with_its_parent(script: str, how: int, what: str, timeout: float = 60.0) -> None:
    """Run ``script`` (Python that starts a process, prints its pid and sleeps) in a process from the
    repository root, end that process with signal ``how``, and wait for the started one (``what``) to end."""
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())   # type: ignore[union-attr]
        assert running(child)
        parent.send_signal(how)
        parent.wait(timeout=30)
        wait_until(lambda: not running(child), f"{what} to end with the process that started it", timeout, 0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
