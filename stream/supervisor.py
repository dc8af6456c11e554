"""``--processes N``: N consumer processes on one host, one consumer group.

Each child is a plain ``python -m stream`` with the same flags and environment plus
``--processes 1 --metrics-port BASE+i --no-latency-lane`` (and, given a transactional id,
``--transactional-id ID-i``): its own Kafka clients, backend and decode pool, so the Kafka client and decoding scale
past one interpreter's GIL while the group shares the partitions among the children. The
supervisor passes SIGTERM/SIGINT/SIGHUP on to every child as SIGTERM and waits for their drains (a child still
running past its own shutdown deadline and a margin is killed); if one child fails, the others are
stopped and its exit code is returned, so the outer supervisor (systemd,
Kubernetes) restarts the whole set; if the supervisor itself dies, its children get SIGTERM (Linux).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from .death_signal import die_with

log = logging.getLogger(__name__)
CHILD_INDEX = "STREAM_CHILD_INDEX"   # set in child i's environment; its log lines carry [pi]


def child_argv(argv: Sequence[str], index: int, metrics_port: int) -> list[str]:
    """The command line of child ``index`` (later flags win in argparse). No child runs the latency lane:
    it would judge the cores idle by its own streams alone and take them from its siblings'."""
    port = metrics_port + index if metrics_port else 0
    return [sys.executable, "-m", "stream", *argv, "--processes", "1", "--metrics-port", str(port),
            "--no-latency-lane"]


ChildCommand = Callable[[Sequence[str], int, int], list[str]]   # (flags, index, metrics port) -> argv, as child_argv


def own_transactional_id(argv: Sequence[str], index: int, transactional_id: str | None) -> list[str]:
    """Child ``index``'s flags with its own stable transactional id, ``ID-index``: children sharing one
    id would fence each other (each one's init_transactions aborts its sibling's transaction)."""
    return [*argv, "--transactional-id", f"{transactional_id}-{index}"] if transactional_id else list(argv)


def child_environ(index: int) -> dict[str, str]:
    """Child ``index``'s environment: this process's, plus its index for its log lines."""
    return {**os.environ, CHILD_INDEX: str(index)}


def stop_signals() -> list[signal.Signals]:
    """The signals that drain and stop the service: SIGTERM, SIGINT, and SIGHUP (its terminal went away)
    unless it was started ignoring SIGHUP (``nohup``), which then stays ignored."""
    hangup = [] if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else [signal.SIGHUP]
    return [signal.SIGTERM, signal.SIGINT, *hangup]


def how_it_ended(code: int) -> str:
    """A child's exit status as a log line says it: ``exited 3``, ``was killed by SIGKILL``."""
    if code >= 0:
        return f"exited {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def kill_overdue(children: Sequence[subprocess.Popen], seconds: float) -> None:
    """SIGKILL the children still running ``seconds`` after they were told to stop, saying which."""
    for index, child in enumerate(children):
        if child.poll() is None:
            log.error("consumer process p%d (pid %d) did not exit within %g s of being stopped; killing it "
                      "(its uncommitted work is redelivered)", index, child.pid, seconds)
            child.kill()


def supervise(argv: Sequence[str], processes: int, metrics_port: int, transactional_id: str | None = None,
              command: ChildCommand = child_argv, stop_within_s: float = 60.0) -> int:
    """Run ``processes`` children (``command`` makes each one's command line) until all have exited;
    returns the first failure's code, else 0. Children still running ``stop_within_s`` after they were told
    to stop (a signal, or a sibling's failure) are killed: a child hung past its own shutdown deadline
    must not keep the set from ending, and so from being restarted."""
    # Own sessions (so own process groups): a terminal's Ctrl-C reaches the children once, through
    # forward(), not twice.
    children = [subprocess.Popen(command(own_transactional_id(argv, i, transactional_id), i, metrics_port),
                                 env=child_environ(i), start_new_session=True, preexec_fn=die_with(os.getpid()))
                for i in range(processes)]
    log.info("started %d consumer processes (pids %s)%s", processes, ", ".join(str(c.pid) for c in children),
             f"; metrics on ports {metrics_port}..{metrics_port + processes - 1}" if metrics_port else "")
    stopping: list[int] = []

    def stop_all() -> None:
        """SIGTERM to every child still running, whatever stopped the set: one still starting (no handler
        yet) dies of it quietly, where a forwarded SIGINT would end it in a KeyboardInterrupt traceback."""
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signalled: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        """The first stop signal drains the children; a second kills them (a child takes a repeated
        SIGTERM for the same stop arriving twice, as from systemd's SIGTERM to every process of the unit)."""
        signalled.append(signum)
        if len(signalled) == 1:
            log.info("%s: stopping %d consumer processes (signal again to kill them at once)",
                     signal.Signals(signum).name, len(children))
            stopping.append(signum)
            stop_all()
            return
        log.warning("%s again: killing the consumer processes (uncommitted work is redelivered)",
                    signal.Signals(signum).name)
        for child in children:
            if child.poll() is None:
                child.kill()
    previous = {sig: signal.signal(sig, forward) for sig in stop_signals()}
    first_failure: int | None = None   # not a sibling's SIGTERM that the failure itself caused
    overdue_at: float | None = None    # when children told to stop are killed
    try:
        while True:
            if stopping and overdue_at is None:
                overdue_at = time.monotonic() + stop_within_s
            elif overdue_at is not None and time.monotonic() >= overdue_at:
                kill_overdue(children, stop_within_s)
                overdue_at = float("inf")
            codes = [c.poll() for c in children]
            if all(code is not None for code in codes):
                # dead of the SIGTERM it was sent: still starting, with no handler yet (that drains and exits 0)
                stopped = -signal.SIGTERM if stopping else None   # so a clean stop, nothing consumed
                code = first_failure if first_failure is not None else next((c for c in codes if c and c != stopped), 0)
                return 128 - code if code < 0 else code   # killed by signal N: the shell's 128 + N
            failed = next(((i, code) for i, code in enumerate(codes) if code), None)
            if failed is not None and not stopping:
                index, first_failure = failed
                log.error("consumer process p%d (pid %d) %s; stopping the others", index, children[index].pid,
                          how_it_ended(first_failure))
                stopping.append(signal.SIGTERM)
                stop_all()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
