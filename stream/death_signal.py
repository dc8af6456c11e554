"""Children that end with their parent: a consumer process of ``--processes N`` (it drains and stops,
instead of consuming on beside the set that replaces it), the embedded broker (instead of holding
every record in memory with nobody to use them), and the services a benchmark starts."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1   # prctl(2): the signal a process gets when its parent dies


def die_with(parent: int) -> Callable[[], None] | None:
    """A child's ``preexec_fn`` (Linux): it gets SIGTERM when ``parent`` dies however it dies (kill -9, the
    OOM killer), instead of running on orphaned. The kernel sends it when the *thread* that started the
    child ends: start children from one that lives as long as they should. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl   # looked up here, not between fork and exec
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:   # in the child, between fork and exec: no locks, no logging
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:    # the parent died before the signal was armed: nothing has run yet
            os._exit(1)               # (a SIGTERM here would meet the parent's Python handler, copied by fork)
    return set_death_signal
