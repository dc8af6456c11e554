"""Scaling out on the real broker: members join and leave while a stream is in flight."""
from __future__ import annotations

import time

import pytest

from .kafka_helpers import committed, names, positions, produce_steadily, read_all, start_service, stop

pytestmark = pytest.mark.kafka


def assigned_some(log) -> bool:
    return any(line.split("partitions assigned:")[1].strip() != "none"
               for line in log.read_text().splitlines() if "partitions assigned:" in line)


def wait_assigned(log, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if assigned_some(log):
            return
        time.sleep(0.2)
    raise AssertionError(f"{log.name} was never assigned a partition:\n{log.read_text()[-3000:]}")


def assignments(log) -> int:
    return log.read_text().count("partitions assigned:")


def wait_reassigned(logs: list, before: dict, timeout: float = 90) -> None:
    """Until every member in ``logs`` has been assigned again since ``before`` (the rebalance ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(assignments(log) > before[log] for log in logs):
            return
        time.sleep(0.2)
    raise AssertionError("the group did not finish rebalancing:\n" + "\n".join(log.read_text()[-1500:] for log in logs))


def test_members_joining_and_leaving_mid_stream_lose_nothing(kafka_broker, small_artifact, tmp_path, kafka_client):
    """Each change waits for the rebalance before it to end: tansu 0.6 never completes a rebalance
    whose elected leader leaves during it (it keeps naming the departed member leader; Kafka
    removes it), which a leave landing mid-rebalance can hit whatever the clients do."""
    t = names(kafka_broker, partitions=6)
    total, seconds = 1800, 36
    producer = produce_steadily(kafka_broker.bootstrap, t["input"], total, seconds)
    logs = {name: tmp_path / f"{name}.log" for name in "abc"}
    started = {"a": start_service(kafka_broker, t, small_artifact, logs["a"], kafka_client=kafka_client)}
    events = []
    try:
        wait_assigned(logs["a"])
        for name in "bc":                                   # two joins, each mid-stream
            started[name] = start_service(kafka_broker, t, small_artifact, logs[name], kafka_client=kafka_client)
            wait_assigned(logs[name])
            events.append((f"join {name}", producer.is_alive()))
        for name in "ab":                                   # two leaves, each mid-stream
            remaining = [logs[n] for n in started if n != name]
            before = {log: assignments(log) for log in remaining}
            stop(started.pop(name), logs[name])
            events.append((f"leave {name}", producer.is_alive()))
            wait_reassigned(remaining, before)
        producer.join(120)
        inputs = read_all(kafka_broker.bootstrap, t["input"], total)
        ends = {}
        for r in inputs:
            ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            marks = committed(kafka_broker.bootstrap, t["group"], t["input"])
            if all((marks.get(p) or 0) >= end for p, end in ends.items()):
                break
            time.sleep(1)
    finally:
        for name, process in started.items():
            stop(process, logs[name])
    assert all(alive for _, alive in events), f"a step landed after the stream ended: {events}"
    assert len(inputs) == total
    marks = committed(kafka_broker.bootstrap, t["group"], t["input"])
    assert {p: marks.get(p) for p in ends} == ends, "committed offsets reach the end of every partition"
    results = positions(read_all(kafka_broker.bootstrap, t["output"], total))
    done = set(results)
    print(f"{kafka_client}: {len(results) - len(done)} duplicate results over 4 rebalances")
    missing = {(r.partition, r.offset) for r in inputs} - done
    assert not missing, f"{len(missing)} inputs without a result"
    for name, log in logs.items():
        text = log.read_text()
        assert "rebalance callback throws" not in text and "Traceback" not in text, text[-3000:]
        assert "partitions revoked" in text or name == "c", f"{name} never gave partitions back"
