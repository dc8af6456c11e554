"""Readiness, changed from the broker probe and the poll loop at once."""
from __future__ import annotations

import logging
import threading

from stream.readiness import SHUTTING_DOWN, Readiness


class _Slow(logging.Handler):
    """Each line takes a moment to write, as on a busy stderr: the window between deciding on a
    transition and making it is then wide enough for another thread to step into."""

    def emit(self, record: logging.LogRecord) -> None:
        threading.Event().wait(0.0002)


def test_shutting_down_stays_final_while_other_threads_keep_reporting():
    published: list[tuple[bool, str]] = []
    readiness = Readiness("kafka:9092", lambda ready, reason: published.append((ready, reason)))
    logger, handler = logging.getLogger("stream.readiness"), _Slow()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    calls = [0] * 4
    shut = threading.Event()
    after_shutdown = 300   # calls each thread makes once shutting down has begun

    def report(index: int) -> None:
        done_after = None
        while done_after is None or calls[index] < done_after:
            i = calls[index]
            if index % 2:   # the broker probe: Kafka comes and goes, a topic goes missing
                readiness.observed(reachable=i % 3 != 0, missing=["typo"] if i % 5 == 0 else [])
                readiness.update()
            else:           # the poll loop: consuming fails and recovers
                readiness.update(None if i % 2 else "consuming is failing: timeout")
                readiness.set(True)
            calls[index] += 1
            if done_after is None and shut.is_set():
                done_after = calls[index] + after_shutdown
    threads = [threading.Thread(target=report, args=(i,), daemon=True) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        while min(calls) < 200 and all(t.is_alive() for t in threads):
            threading.Event().wait(0.001)
        readiness.shut_down()
        shut.set()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert readiness.state == (False, SHUTTING_DOWN)
    first = published.index((False, SHUTTING_DOWN))
    assert published[first:] == [(False, SHUTTING_DOWN)], f"published after shutting down: {published[first:][:5]}"
    assert any(ready for ready, _ in published[:first]), "the threads did flap the state before"


def test_causes_take_precedence_and_each_change_is_said_once(caplog):
    published: list[tuple[bool, str]] = []
    readiness = Readiness("kafka:9092", lambda ready, reason: published.append((ready, reason)))
    with caplog.at_level("INFO", logger="stream"):
        readiness.update()
        assert readiness.state == (False, "looking for the input topics")
        assert not readiness.observed(True, ["typo"])
        readiness.update("consuming is failing: x")
        assert readiness.state == (False, "input topic typo does not exist")
        readiness.observed(True, [])
        readiness.update("consuming is failing: x")
        assert readiness.state == (False, "consuming is failing: x")
        assert readiness.observed(False, None) and not readiness.reachable
        readiness.observed(False, None)
        readiness.update()
        assert readiness.state == (False, "Kafka at kafka:9092 is unreachable")
        assert readiness.observed(True, None)
        readiness.update()
        assert readiness.state == (True, "") and published[-1] == (True, "")
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "unreachable; retrying" in line]) == 1, lines
    assert len([line for line in lines if "'typo' does not exist" in line]) == 1, lines
    assert lines.count("ready") == 1 and "every input topic exists" in lines
