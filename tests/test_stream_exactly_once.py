"""Exactly once at its edges, on the real broker: several processes with stable transactional
ids, and a member evicted while its transaction is open. A read_committed reader is judged
from the transaction markers (tansu sends no aborted-transaction list)."""
from __future__ import annotations

import collections
import time

import pytest

from stream.kafka_sink import close_producer

from .kafka_helpers import committed, images, names, positions, produce, read_committed, start_service, stop

pytestmark = pytest.mark.kafka
# a group join waits about half the session timeout on tansu, and an eviction the whole of it; 3 s keeps
# four heartbeats (750 ms apart) in it
SESSION_MS = 3000


def _wait_committed(kafka_broker, t: dict, total: int, processes: list, logs: list, timeout: float = 240) -> None:
    """Until the group's committed offsets cover ``total`` inputs; every process must stay up."""
    deadline = time.monotonic() + timeout
    while sum(v or 0 for v in committed(kafka_broker.bootstrap, t["group"], t["input"]).values()) < total:
        for process, log in zip(processes, logs, strict=True):
            assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "\n".join(log.read_text()[-2000:] for log in logs)
        time.sleep(0.5)


def _each_once(kafka_broker, t: dict, total: int) -> None:
    counts = collections.Counter(positions(read_committed(kafka_broker.bootstrap, t["output"])))
    duplicates = {p: n for p, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} inputs seen more than once read_committed"
    marks = committed(kafka_broker.bootstrap, t["group"], t["input"])
    assert sum(marks.values()) == total
    assert set(counts) == {(p, o) for p, mark in marks.items() for o in range(mark)}


def test_two_processes_with_one_stable_transactional_id_do_not_fence_each_other(kafka_broker, small_artifact,
                                                                                 tmp_path):
    total = 300
    t = names(kafka_broker, partitions=2)
    produce(kafka_broker.bootstrap, t["input"], images(0, total // 2))
    log = tmp_path / "processes.log"
    process = start_service(kafka_broker, t, small_artifact, log, processing_guarantee="exactly-once",
                            transactional_id="replica-0", processes=2,
                            session_timeout_ms=SESSION_MS)
    try:
        _wait_committed(kafka_broker, t, total // 6, [process], [log])     # both children are committing
        produce(kafka_broker.bootstrap, t["input"], images(total // 2, total - total // 2))
        _wait_committed(kafka_broker, t, total, [process], [log])
    finally:
        stop(process, log)   # still running until stopped, and stops with 0
    text = log.read_text()
    assert "fenced" not in text, text[-3000:]
    _each_once(kafka_broker, t, total)


def test_exactly_once_reads_only_committed_input(kafka_broker, small_artifact, tmp_path, kafka_client):
    """Records of an upstream transaction still open are not input yet: the service processes the
    other partition's records and holds these back until the transaction commits."""
    from kafka import KafkaProducer

    from .images import good_images
    t = names(kafka_broker, partitions=2)
    image = good_images()["jpeg_coffee"]
    upstream = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, transactional_id=f"upstream-{t['group']}")
    upstream.init_transactions()
    upstream.begin_transaction()
    for i in range(5):
        upstream.send(t["input"], key=b"open-%d" % i, value=image, partition=0)
    upstream.flush()
    plain = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    for i in range(5):
        plain.send(t["input"], key=b"plain-%d" % i, value=image, partition=1)
    plain.close()
    log = tmp_path / "service.log"
    process = start_service(kafka_broker, t, small_artifact, log, processing_guarantee="exactly-once",
                            transactional_id="replica-0", kafka_client=kafka_client,
                            session_timeout_ms=SESSION_MS)
    try:
        deadline = time.monotonic() + 120
        while committed(kafka_broker.bootstrap, t["group"], t["input"]).get(1) != 5:   # progress on partition 1
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        seen = positions(read_committed(kafka_broker.bootstrap, t["output"], timeout=3))
        assert sorted(seen) == [(1, o) for o in range(5)], "records of an open upstream transaction were consumed"
        upstream.commit_transaction()
        _wait_committed(kafka_broker, t, 10, [process], [log])   # 5 + 5 records
    finally:
        close_producer(upstream, 5)
        stop(process, log)
    seen = positions(read_committed(kafka_broker.bootstrap, t["output"]))
    assert sorted(seen) == [(p, o) for p in (0, 1) for o in range(5)]


def test_the_transaction_timeout_outlasts_a_commit_interval_and_the_commit_point_s_wait(kafka_broker):
    """A coordinator aborts a transaction open longer than its timeout: the producer must be made
    with one above the commit interval plus the commit point's wait (--drain-timeout-s)."""
    from stream.config import StreamConfig
    from stream.kafka_io import KafkaConnector
    t = names(kafka_broker)
    cfg = StreamConfig(bootstrap_servers=kafka_broker.bootstrap, input_topic=(t["input"],), output_topic=t["output"],
                       dead_letter_topic=t["dlq"], artifact="unused", group_id=t["group"],
                       processing_guarantee="exactly-once", transactional_id=f"timeout-{t['group']}")
    sink = KafkaConnector(cfg).sink(lambda: None)
    try:
        timeout_ms = sink._producer.config["transaction_timeout_ms"]
    finally:
        sink.close()
    assert timeout_ms > cfg.commit_interval_ms + cfg.drain_timeout_s * 1000


def test_a_member_frozen_past_its_session_timeout_commits_nothing_twice(kafka_broker, small_artifact, tmp_path):
    """SIGSTOP one of two members mid-stream until the group has moved its partitions to the other,
    then SIGCONT it: it must abort its open transaction and commit none of its in-flight work (the
    other member redoes it), exiting with one line so its supervisor restarts it."""
    import signal
    import subprocess
    total = 300
    t = names(kafka_broker, partitions=2)
    produce(kafka_broker.bootstrap, t["input"], images(0, total // 2))   # the rest after the freeze: mid-stream
    logs = [tmp_path / "frozen.log", tmp_path / "other.log"]
    # commit points a second apart: a freeze inside a commit (offsets sent, the end marker not yet) cannot be
    # fenced by the member, and tansu lets the other member read the offsets of a transaction still open
    frozen, other = (start_service(kafka_broker, t, small_artifact, log, processing_guarantee="exactly-once",
                                   transactional_id=f"replica-{i}", commit_interval_ms=1000,
                                   session_timeout_ms=SESSION_MS)
                     for i, log in enumerate(logs))
    passed = False
    try:
        deadline = time.monotonic() + 120
        while not all("partitions assigned: images" in log.read_text() for log in logs) or \
                sum(v or 0 for v in committed(kafka_broker.bootstrap, t["group"], t["input"]).values()) < total // 6:
            assert frozen.poll() is None and other.poll() is None and time.monotonic() < deadline, \
                "\n".join(log.read_text()[-2000:] for log in logs)
            time.sleep(0.2)
        def assigned() -> list[str]:
            return [line for line in logs[1].read_text().splitlines() if "partitions assigned:" in line]
        before = len(assigned())
        frozen.send_signal(signal.SIGSTOP)
        try:   # until the group has evicted it and given the other member both partitions
            deadline = time.monotonic() + 90
            while len(assigned()) == before or not assigned()[-1].endswith(f"{t['input']}[0], {t['input']}[1]"):
                assert other.poll() is None and time.monotonic() < deadline, logs[1].read_text()[-3000:]
                time.sleep(0.2)
        finally:
            frozen.send_signal(signal.SIGCONT)
        produce(kafka_broker.bootstrap, t["input"], images(total // 2, total - total // 2))
        _wait_committed(kafka_broker, t, total, [other], [logs[1]])
        passed = True
    finally:
        if frozen.poll() is None and not passed:
            frozen.send_signal(signal.SIGTERM)
        try:   # having passed, it ends on its own: a SIGTERM could catch it after its last line, exiting
            frozen_code = frozen.wait(60)
        except subprocess.TimeoutExpired:
            frozen.kill()
            raise
        stop(other, logs[1])
    _each_once(kafka_broker, t, total)
    assert frozen_code == 1, logs[0].read_text()[-3000:]
    assert "exactly-once: this member was evicted" in logs[0].read_text(), logs[0].read_text()[-3000:]
