"""Faults on the real broker: processes killed with SIGKILL, nothing lost, and with
exactly-once nothing duplicated for a read_committed reader. Small counts: each test
proves one point."""
from __future__ import annotations

import collections
import signal
import time

import pytest

from .images import good_images
from .kafka_helpers import committed, names, positions, produce, read_all, read_committed, start_service, stop

pytestmark = pytest.mark.kafka


def _kill_three_times_then_finish(kafka_broker, small_artifact, tmp_path, total: int, **options) -> dict:
    t = names(kafka_broker, partitions=2)
    produce(kafka_broker.bootstrap, t["input"], [(str(i).encode(), good_images()["jpeg_coffee"]) for i in range(total)])
    for round_ in range(3):
        log = tmp_path / f"killed-{round_}.log"
        process = start_service(kafka_broker, t, small_artifact, log, **options)
        seen = len(read_all(kafka_broker.bootstrap, t["output"], 0, timeout=1))
        deadline = time.monotonic() + 120
        while len(read_all(kafka_broker.bootstrap, t["output"], 0, timeout=1)) < seen + total // 6:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    log = tmp_path / "last.log"
    process = start_service(kafka_broker, t, small_artifact, log, **options)
    try:
        deadline = time.monotonic() + 180
        while sum(v or 0 for v in committed(kafka_broker.bootstrap, t["group"], t["input"]).values()) < total:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
    finally:
        stop(process, log)
    return t


def test_kill_9_three_times_at_least_once_loses_nothing(kafka_broker, small_artifact, tmp_path):
    total = 300
    t = _kill_three_times_then_finish(kafka_broker, small_artifact, tmp_path, total)
    records = read_all(kafka_broker.bootstrap, t["output"], total)
    assert set(positions(records)) == {(p, o) for p, mark in
                                        committed(kafka_broker.bootstrap, t["group"], t["input"]).items()
                                        for o in range(mark)}
    print(f"at-least-once: {len(records) - total} duplicates after 3 x kill -9")


def test_kill_9_three_times_exactly_once_read_committed_sees_each_input_once(kafka_broker, small_artifact, tmp_path):
    total = 300
    t = _kill_three_times_then_finish(kafka_broker, small_artifact, tmp_path, total,
                                      processing_guarantee="exactly-once", transactional_id="replica-0")
    records = read_committed(kafka_broker.bootstrap, t["output"])
    counts = collections.Counter(positions(records))
    duplicates = {p: n for p, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} inputs seen more than once read_committed"
    marks = committed(kafka_broker.bootstrap, t["group"], t["input"])
    assert set(counts) == {(p, o) for p, mark in marks.items() for o in range(mark)} and sum(marks.values()) == total
    raw = read_all(kafka_broker.bootstrap, t["output"], total)
    print(f"exactly-once: 0 duplicates read_committed; {len(raw) - total} aborted records visible read_uncommitted")
