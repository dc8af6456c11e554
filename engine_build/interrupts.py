"""Stopping a command on SIGTERM or Ctrl-C, and stopping a build only where it is safe to.

Python runs a signal handler in the main thread at whatever point that thread has reached, so an exception
raised from the handler lands anywhere: inside the import of a native module (which then fails with
"ImportError: initialization failed" instead of stopping), inside a library's own cleanup (the process then
dies by SIGINT after printing that it was interrupted), or where it leaves a library unable to shut down (a
build that never exited). Inside :func:`stop_at_checkpoints` the first signal therefore only asks for a stop,
and the work raises :class:`KeyboardInterrupt` itself at its next :func:`checkpoint`: between a build's steps
and in its loops over images, so within about a batch's time. A second signal stops it at once, as before.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_asked = threading.Event()
_deferring = 0   # how many stop_at_checkpoints() blocks the main thread is in


def checkpoint() -> None:
    """Raise KeyboardInterrupt if a stop was asked for; cheap, for loops."""
    if _asked.is_set():
        raise KeyboardInterrupt


@contextmanager
def stop_at_checkpoints() -> Iterator[None]:
    """Inside, the first SIGTERM or Ctrl-C asks for a stop at the next :func:`checkpoint` (and says so on
    stderr); outside, or a second time, it raises KeyboardInterrupt at once."""
    global _deferring
    _deferring += 1
    try:
        yield   # work that finished is kept: a stop asked for after its last checkpoint is not raised here
    finally:
        _deferring -= 1
        if not _deferring:
            _asked.clear()


def _on_signal(_signum: int, _frame: Any) -> None:
    if _deferring and not _asked.is_set():
        _asked.set()
        # os.write, not print: the main thread may be inside a write to stderr (print would raise)
        os.write(2, b"stopping after the current step (send it again to stop at once)\n")
        return
    raise KeyboardInterrupt


@contextmanager
def signals_stop_commands() -> Iterator[None]:
    """While a command runs, SIGTERM (``timeout``, a supervisor) ends it as Ctrl-C does, and both honour
    :func:`stop_at_checkpoints`. Only in the main thread (handlers cannot be set elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
