"""``--processes N``'s supervisor (stream/supervisor.py) with stand-in children: plain Python one-liners,
so what a child does (crash, die of a signal, ignore SIGTERM) is the test's choice."""
from __future__ import annotations

import logging
import sys

from stream.supervisor import supervise

from .waiting import wait_until


def test_a_child_s_failure_is_said_naming_the_child_and_the_signal_that_killed_it(caplog):
    """The OOM killer's SIGKILL of one child: the supervisor's line names that child (its index, as its own
    lines carry it, and its pid) and the signal, not 'a consumer process exited -9'."""
    commands = [[sys.executable, "-c", "import time; time.sleep(60)"],
                [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]]
    with caplog.at_level(logging.INFO, logger="stream.supervisor"):
        assert supervise([], 2, 0, command=lambda argv, index, port: commands[index]) == 128 + 9
    pid = caplog.text.split("pids ")[1].split(", ")[1].split(")")[0]
    assert f"consumer process p1 (pid {pid}) was killed by SIGKILL; stopping the others" in caplog.text


def test_a_child_that_does_not_stop_is_killed_and_the_failure_that_stopped_the_set_is_the_exit_code(tmp_path):
    """One child fails while a sibling does not end on SIGTERM (hung in native code, its own shutdown deadline
    never running): the supervisor must not wait for it for ever, leaving the set half dead and never restarted.
    Past the drain's deadline and a margin it kills the sibling, saying so, and exits with the failure's code."""
    import os
    import signal
    import subprocess
    ready, pid_file = tmp_path / "ignoring", tmp_path / "pid"
    hung = (f"import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); os.rename({str(pid_file)!r}, {str(ready)!r}); "
            "time.sleep(600)")
    failing = f"import os, time\nwhile not os.path.exists({str(ready)!r}): time.sleep(0.02)\nraise SystemExit(3)"
    script = ("import sys; from stream.cli import main; "
              f"commands = [[sys.executable, '-c', {hung!r}], [sys.executable, '-c', {failing!r}]]; "
              "sys.exit(main(['--bootstrap-servers', '127.0.0.1:1', '--input-topic', 'in', '--output-topic', 'out', "
              "'--dead-letter-topic', 'dlq', '--metrics-port', '0', '--artifact', 'unused', '--processes', '2', "
              "'--drain-timeout-s', '0.1'], {}, child_command=lambda argv, index, port: commands[index]))")
    log = tmp_path / "supervisor.log"   # a file, not a pipe: a hung child would hold a pipe open
    supervisor = subprocess.Popen([sys.executable, "-c", script], stderr=open(log, "wb"))
    try:
        supervisor.wait(60)
    except subprocess.TimeoutExpired:
        supervisor.kill()
        supervisor.wait()
    finally:
        if ready.exists():
            try:
                os.kill(int(ready.read_text()), signal.SIGKILL)   # gone already where the supervisor killed it
            except ProcessLookupError:
                pass
    err = log.read_text()
    assert supervisor.returncode == 3, err
    pid = ready.read_text()
    assert f"consumer process p0 (pid {pid}) did not exit within" in err and "killing it" in err, err


def test_a_stop_while_the_children_still_start_is_a_clean_stop(tmp_path):
    """Ctrl-C (or SIGTERM) a moment after start, while the children are still importing and have no handler
    yet: a child dies of the signal the supervisor passed on. Nothing was consumed, so that is a clean stop:
    exit 0 with a line saying why, not exit 130 (143) after one KeyboardInterrupt traceback per child."""
    import signal
    import subprocess
    starting = "import pathlib, sys, time; pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"
    script = ("import signal, sys; from stream.logs import configure; from stream.supervisor import supervise; "
              "signal.signal(signal.SIGINT, signal.default_int_handler); configure('INFO'); "   # as in a terminal
              f"sys.exit(supervise([], 2, 0, command=lambda argv, index, port: [sys.executable, '-c', {starting!r}, "
              f"{str(tmp_path)!r} + f'/started-{{index}}']))")
    log = tmp_path / "supervisor.log"
    supervisor = subprocess.Popen([sys.executable, "-c", script], stderr=open(log, "wb"))
    try:
        wait_until(lambda: all((tmp_path / f"started-{i}").exists() for i in (0, 1)), "both children to start",
                   60, 0.02)
        supervisor.send_signal(signal.SIGINT)
        code = supervisor.wait(60)
    finally:
        supervisor.kill()
    text = log.read_text()
    assert code == 0 and "Traceback" not in text, text
    assert "SIGINT: stopping 2 consumer processes" in text, text


def test_systemd_s_sigterm_to_every_process_of_the_unit_drains_the_children_once(small_artifact, tmp_path):
    """systemd's default KillMode=control-group sends SIGTERM to every process of the unit at once: each
    child gets it from systemd and again from its supervisor. That is one stop, not an operator's 'signal
    again to exit at once': each child drains and exits 0, and so does the supervisor (before: each child
    exited at once, 143, abandoning its in-flight work, and the unit failed)."""
    import os
    import signal
    import subprocess
    log = tmp_path / "supervisor.log"
    argv = [sys.executable, "-m", "stream", "--bootstrap-servers", "127.0.0.1:1", "--input-topic", "in",
            "--output-topic", "out", "--dead-letter-topic", "dlq", "--metrics-port", "0",
            "--artifact", str(small_artifact), "--processes", "2", "--decode-workers", "1"]
    supervisor = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        # each child running (its handler installed): it says once that connecting fails and it retries
        wait_until(lambda: all(f"[p{i}] stream.failures" in log.read_text() for i in (0, 1)),
                   "both children to run", 120, 0.2)
        children = [int(p) for p in open(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children").read().split()]
        for pid in [supervisor.pid, *children]:
            os.kill(pid, signal.SIGTERM)
        code = supervisor.wait(60)
    finally:
        supervisor.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    for i in (0, 1):
        assert f"[p{i}] stream: exiting:" in text, text[-3000:]


def test_a_child_whose_parent_is_already_gone_never_runs_even_where_the_parent_handles_sigterm():
    """The death signal armed after the parent died (die_with given a pid that is not the parent): the child
    must not run. It sent itself SIGTERM, which met the Python handler fork had copied from the parent (the
    broker command's, the supervisor's), so it ran on with nobody left to end it."""
    import subprocess
    script = ("import signal, subprocess, sys; from stream.death_signal import die_with; "
              "signal.signal(signal.SIGTERM, lambda *_: None); "
              "child = subprocess.run([sys.executable, '-c', 'print(7)'], capture_output=True, text=True, "
              "preexec_fn=die_with(1)); print(child.returncode, repr(child.stdout))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["1", "''"], done.stdout + done.stderr
