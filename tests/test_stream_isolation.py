"""stream/isolation.py without Kafka: the ordered queue of failed records, with stand-in producers."""
from __future__ import annotations

import threading
from collections.abc import Callable

from stream.isolation import Entry, Isolation
from stream.records import Outgoing

from .waiting import wait_until


class _Stand:
    """An isolation whose resends alone and hand-backs are recorded, in the order they happen."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.alone_done = threading.Event()
        self.isolation = Isolation(self._send_alone, lambda _exc: True, self._outcome, self._release,
                                   lambda: "new")

    def _send_alone(self, record: Outgoing) -> BaseException | None:
        self.events.append(f"alone {record.value.decode()}")
        return None

    def _outcome(self, record: Outgoing, on_ack: Callable[[], None], _on_refused: object,
                 _exc: BaseException | None) -> None:
        on_ack()
        return None

    def _release(self, entry: Entry, producer: object) -> None:
        self.events.append(f"back {entry.record.value.decode()} to {producer}")

    def add(self, order: int, producer: object, failed: bool, on_ack: Callable[[], None] = lambda: None) -> None:
        self.isolation.add(order, Outgoing("out", b"k", str(order).encode(), []), on_ack, None, producer, failed)


def test_records_a_client_dropped_unsent_go_back_to_a_producer_and_only_failed_ones_go_alone():
    stand = _Stand()
    stand.isolation.take(0, Outgoing("out", b"k", b"x", []), lambda: None, None, "old")   # counted against "old"
    stand.isolation.take(1, Outgoing("out", b"k", b"x", []), lambda: None, None, "old")
    stand.isolation.take(2, Outgoing("out", b"k", b"x", []), lambda: None, None, "old")
    stand.add(0, "old", failed=True)    # refused
    stand.add(2, "old", failed=False)   # purged unsent
    stand.add(1, "old", failed=False)   # purged unsent, back out of order
    wait_until(lambda: len(stand.events) == 3, "the isolation thread acted", timeout=10)
    stand.isolation.close()
    assert stand.events == ["alone 0", "back 1 to new", "back 2 to new"]


def test_a_record_to_send_alone_waits_for_records_handed_back_ahead_of_it():
    """Records handed back go without waiting for the broker; one sent alone behind them must not be
    acknowledged first (the probe is another producer): it waits until they came back."""
    stand = _Stand()
    for order in range(3):
        stand.isolation.take(order, Outgoing("out", b"k", b"x", []), lambda: None, None, "old")
    stand.add(1, "old", failed=False)   # purged: handed back to "new", counted against it
    stand.add(0, "old", failed=False)
    stand.add(2, "old", failed=True)    # then one to send alone
    wait_until(lambda: len(stand.events) == 2, "the isolation thread acted", timeout=10)
    assert stand.events == ["back 0 to new", "back 1 to new"]
    assert stand.isolation.waiting() == 1, "the record to send alone waits for the two handed back"
    stand.isolation.answered("new")
    assert stand.isolation.waiting() == 1 and stand.events[2:] == []
    stand.isolation.answered("new")   # both back
    wait_until(lambda: len(stand.events) == 3, "the isolation thread acted", timeout=10)
    stand.isolation.close()
    assert stand.events[2] == "alone 2"
