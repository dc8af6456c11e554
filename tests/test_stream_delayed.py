"""Delayed actions (both sinks' publish retries): due order, pending count, the thread, close. The
clock is the test's own; nothing sleeps."""
from __future__ import annotations

import threading

from stream.delayed import Delayed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_action_is_due_only_once_its_delay_has_passed():
    clock = Clock()
    delayed = Delayed("test", clock)
    delayed.later(2.0, lambda: None)
    assert delayed.take_due() == [] and delayed.pending() == 1
    clock.now += 1.999
    assert delayed.take_due() == []
    clock.now += 0.001
    assert len(delayed.take_due()) == 1 and delayed.pending() == 0
    assert delayed.take_due() == []


def test_due_actions_come_in_the_order_they_fall_due_ties_in_the_order_they_came():
    clock = Clock()
    delayed = Delayed("test", clock)
    ran: list[str] = []
    for name, delay in (("late", 3.0), ("first-now", 0.0), ("soon", 1.0), ("second-now", 0.0), ("never", 9.0)):
        delayed.later(delay, lambda name=name: ran.append(name))
    clock.now += 3.0
    for action in delayed.take_due():
        action()
    assert ran == ["first-now", "second-now", "soon", "late"]
    assert delayed.pending() == 1


def test_the_thread_sleeps_until_the_next_action_falls_due():
    clock = Clock()
    delayed = Delayed("test", clock)
    assert delayed.wait_s() == 1.0   # nothing waiting: looks again after a second (later() wakes it)
    delayed.later(5.0, lambda: None)
    delayed.later(0.5, lambda: None)
    assert delayed.wait_s() == 0.5
    clock.now += 0.6
    assert delayed.wait_s() == 0.01   # overdue: never a busy spin


def test_the_thread_runs_due_actions_and_stops_at_close_dropping_what_waits():
    clock = Clock()
    delayed = Delayed("test", clock)
    ran = threading.Event()
    names: list[str] = []
    delayed.later(0.0, lambda: (names.append(threading.current_thread().name), ran.set()))
    delayed.later(60.0, lambda: names.append("dropped"))
    delayed.start()
    assert ran.wait(10), "a due action runs on the thread"
    assert names == ["test"] and delayed.pending() == 1
    delayed.close(timeout=10)
    assert delayed._thread is not None and not delayed._thread.is_alive()
    clock.now += 60.0
    assert names == ["test"]


def test_an_action_added_from_a_running_action_runs_too():
    delayed = Delayed("test", Clock())
    done = threading.Event()
    delayed.later(0.0, lambda: delayed.later(0.0, done.set))
    delayed.start()
    try:
        assert done.wait(10)
    finally:
        delayed.close(timeout=10)


def test_an_action_that_raises_is_logged_and_the_later_ones_still_run(caplog):
    delayed = Delayed("test", Clock())
    ran = threading.Event()

    def boom() -> None:
        raise RuntimeError("a bug in one retry")
    delayed.later(0.0, boom)
    delayed.later(0.0, ran.set)
    delayed.start()
    try:
        assert ran.wait(10), "the thread died with the first action's exception"
    finally:
        delayed.close(timeout=10)
    assert "a delayed action (test) failed" in caplog.text and "a bug in one retry" in caplog.text
