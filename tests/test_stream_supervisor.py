"""``--processes N``'s supervisor (stream/supervisor.py) with stand-in children: plain Python one-liners,
so what a child does (crash, die of a signal, ignore SIGTERM) is the test's choice."""
from __future__ import annotations

import logging
import sys

from stream.supervisor import supervise


def test_a_child_s_failure_is_said_naming_the_child_and_the_signal_that_killed_it(caplog):
    """The OOM killer's SIGKILL of one child: the supervisor's line names that child (its index, as its own
    lines carry it, and its pid) and the signal, not 'a consumer process exited -9'."""
    commands = [[sys.executable, "-c", "import time; time.sleep(60)"],
                [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]]
    with caplog.at_level(logging.INFO, logger="stream.supervisor"):
        assert supervise([], 2, 0, command=lambda argv, index, port: commands[index]) == 128 + 9
    pid = caplog.text.split("pids ")[1].split(", ")[1].split(")")[0]
    assert f"consumer process p1 (pid {pid}) was killed by SIGKILL; stopping the others" in caplog.text
