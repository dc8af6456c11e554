"""Stopping a command on SIGTERM or Ctrl-C, and stopping a build only where it is safe to.

Python runs a signal handler in the main thread at whatever point that thread has reached, so an exception
raised from the handler lands anywhere: inside the import of a native module (which then fails with
"ImportError: initialization failed" instead of stopping), inside a library's own cleanup (the process then
dies by SIGINT after printing that it was interrupted), or where it leaves a library unable to shut down (a
build that never exited). Inside :func:`stop_at_checkpoints` the first signal therefore only asks for a stop,
and the work raises :class:`KeyboardInterrupt` itself at its next :func:`checkpoint`: between a build's steps
and in its loops over images and batches. Some steps have no loop of the build's own to check in (a TensorRT
engine build, NNCF's bias correction, compiling a model), so a stop waits for the one under way. A second
signal stops the build at once, as before.
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
_holding = 0     # how many uninterrupted() blocks
_stopping = False   # a KeyboardInterrupt is on its way: the cleanup it runs must not be cut by another


def checkpoint() -> None:
    """Raise KeyboardInterrupt if a stop was asked for; cheap, for loops."""
    global _stopping
    if _asked.is_set():
        _stopping = True
        raise KeyboardInterrupt


@contextmanager
def stop_at_checkpoints() -> Iterator[None]:
    """Inside, the first SIGTERM or Ctrl-C asks for a stop at the next :func:`checkpoint` (and says so on
    stderr); outside, or a second time, it raises KeyboardInterrupt at once."""
    global _deferring
    _deferring += 1
    try:
        yield
        if _asked.is_set():   # asked after the last checkpoint: the work is complete, and kept
            _say(b"the stop came after the last step: the work is complete\n")
    finally:
        _deferring -= 1
        if not _deferring:
            _asked.clear()


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Inside, every signal is only noted, a second one too: for what must not be cut half way (moving a
    finished artifact into place)."""
    global _holding
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1


def _say(line: bytes) -> None:
    """os.write, not print: the main thread may be inside a write to stderr (print would raise); and a
    stderr that is gone must not turn into an exception here."""
    try:
        os.write(2, line)
    except OSError:
        pass


def _on_signal(_signum: int, _frame: Any) -> None:
    global _stopping
    if _stopping:   # already stopping: its cleanup (the staging folder's removal) runs to its end
        return
    if _holding or (_deferring and not _asked.is_set()):
        if not _asked.is_set():
            _say(b"stopping after the current step (send it again to stop at once)\n")
        _asked.set()
        return
    _stopping = True
    raise KeyboardInterrupt


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While a command runs, SIGTERM (``timeout``, a supervisor) ends it as Ctrl-C does, and both honour
    :func:`stop_at_checkpoints`. Only in the main thread (handlers cannot be set elsewhere)."""
    global _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stopping = False
