"""Scaling out on the real broker: members join and leave while a stream is in flight."""
from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from .kafka_helpers import (
    committed,
    finished,
    images,
    names,
    positions,
    produce,
    read_all,
    start_service,
    stop,
)
from .waiting import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]   # three service processes
# a group join waits about half the session timeout on tansu; 2 s keeps four heartbeats (500 ms apart) in it
SESSION_MS = 2000


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


def settled(log) -> bool:
    """The member's last rebalance step was an assignment: it is not inside a rebalance."""
    steps = [line for line in log.read_text().splitlines()
             if "partitions assigned:" in line or "partitions revoked:" in line or "partitions lost" in line]
    return bool(steps) and "partitions assigned:" in steps[-1]


def gave_back(log) -> int:
    """How often the member gave partitions back: revoked, or lost (on tansu an asynchronous commit that
    meets another member's join can be answered ILLEGAL_GENERATION while this member still counts itself
    steady, and librdkafka then drops its assignment as lost: its work is redelivered, never lost)."""
    text = log.read_text()
    return text.count("partitions revoked") + text.count("partitions lost")


def owned(log) -> set[str]:
    """The partitions the member holds, from its log: an eager rebalance revokes all and assigns the new
    set; a cooperative one revokes and adds only what moves."""
    held: set[str] = set()
    for line in log.read_text().splitlines():
        named = set(re.findall(r"[\w.-]+\[\d+\]", line.split(";")[0]))
        if "partitions assigned:" in line:
            held |= named
        elif "partitions revoked:" in line or "partitions lost" in line:
            held -= named
    return held


def wait_settled(logs: list, partitions: int, timeout: float = 90) -> None:
    """Until every member's last step is an assignment and together they hold every partition: a cooperative
    rebalance assigns what it revoked in a second round, which a member leaving must not interrupt on tansu."""
    deadline = time.monotonic() + timeout
    while not (all(settled(log) for log in logs) and len(set().union(*(owned(log) for log in logs))) == partitions):
        assert time.monotonic() < deadline, "the group did not settle:\n" + "\n".join(
            log.read_text()[-1500:] for log in logs)
        time.sleep(0.1)


def wait_logged(process, log, text: str, times: int = 1, timeout: float = 60) -> None:
    """Until ``log`` holds ``text`` ``times`` times (a process that has exited has written all of its log)."""
    deadline = time.monotonic() + timeout
    while True:
        exited = process.poll() is not None
        if log.read_text().count(text) >= times:
            return
        assert not exited and time.monotonic() < deadline, f"{log.name} never said {text!r} {times} times:\n" \
            + log.read_text()[-3000:]
        time.sleep(0.05)


def finished_when_stopped(log) -> int:
    (count,) = re.findall(r"stopped: (\d+) messages finished", log.read_text())
    return int(count)


@pytest.mark.parametrize("kafka_client,strategy", [("kafka-python", "range"), ("librdkafka", "range"),
                                                    ("librdkafka", "cooperative-sticky")])
def test_members_joining_and_leaving_mid_stream_lose_nothing(kafka_broker, small_artifact, tmp_path, kafka_client,
                                                             strategy):
    """Cooperative rebalancing (``strategy``) must lose nothing either, and a member leaving must stop none
    of the partitions the others keep.

    Each change waits for the rebalance before it to end: tansu 0.6 never completes a rebalance
    whose elected leader leaves during it (it keeps naming the departed member leader; Kafka
    removes it), which a leave landing mid-rebalance can hit whatever the clients do.

    A quarter of the input arrives with each change, half as it begins (as a joiner connects, as a
    leaver is told to stop) and half once the partitions it moves are held by no one (every
    member has revoked; the leaver has paused to drain), so some is unfinished by construction
    when the joiner is assigned or the leaver has gone; the test checks that it was."""
    from stream.embedded_broker import free_port
    t = names(kafka_broker, partitions=6)
    total = 1800
    produced = 0
    logs = {name: tmp_path / f"{name}.log" for name in "abc"}
    ports = {name: free_port() for name in "abc"}
    started = {"a": start_service(kafka_broker, t, small_artifact, logs["a"], metrics_port=ports["a"],
                                      kafka_client=kafka_client, session_timeout_ms=SESSION_MS,
                                      assignment_strategy=strategy)}
    stopped: dict[str, int] = {}
    events = []

    def more_input() -> None:
        nonlocal produced
        count = total // 8
        produce(kafka_broker.bootstrap, t["input"], images(produced, count))
        produced += count

    def unfinished() -> bool:
        done = sum(finished(ports[n], answering=True) for n in started) + sum(stopped.values())
        return done < produced

    try:
        wait_assigned(logs["a"])
        for name in "bc":                                   # two joins, each mid-stream
            members = {n: (started[n], gave_back(logs[n])) for n in started}
            started[name] = start_service(kafka_broker, t, small_artifact, logs[name], metrics_port=ports[name],
                                           kafka_client=kafka_client, session_timeout_ms=SESSION_MS,
                                           assignment_strategy=strategy)
            wait_logged(started[name], logs[name], "connected to")   # its next poll joins the group
            more_input()
            for n, (process, before) in members.items():
                wait_until(lambda log=logs[n], before=before, process=process: gave_back(log) > before
                           or process.poll() is not None, f"{n} to give partitions back", timeout=60)
                assert process.poll() is None, logs[n].read_text()[-3000:]
            more_input()
            wait_assigned(logs[name])
            events.append((f"join {name}", unfinished()))
            wait_settled([logs[n] for n in started], 6)     # every partition held: the next change starts clean
        for name in "ab":                                   # two leaves, each mid-stream
            remaining = [logs[n] for n in started if n != name]
            kept = {log: gave_back(log) for log in remaining}
            process = started.pop(name)
            more_input()
            process.send_signal(signal.SIGTERM)
            wait_logged(process, logs[name], "shutting down")
            more_input()
            try:
                assert process.wait(60) == 0, logs[name].read_text()[-3000:]
            except subprocess.TimeoutExpired:
                process.kill()
                raise AssertionError(f"{name} did not stop within 60 s of SIGTERM") from None
            stopped[name] = finished_when_stopped(logs[name])
            events.append((f"leave {name}", unfinished()))
            wait_settled(remaining, 6)   # the leaver's partitions held by the others again
            if strategy == "cooperative-sticky":
                revoked = {log.name: gave_back(log) - kept[log] for log in remaining}
                assert not any(revoked.values()), f"{name} left and the others gave partitions back: {revoked}"
        inputs = read_all(kafka_broker.bootstrap, t["input"], total)
        ends = {}
        for r in inputs:
            ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            marks = committed(kafka_broker.bootstrap, t["group"], t["input"])
            if all((marks.get(p) or 0) >= end for p, end in ends.items()):
                break
            time.sleep(0.3)
    finally:
        for name, process in started.items():
            stop(process, logs[name])
    assert all(midstream for _, midstream in events), f"a step ended after the stream did: {events}"
    assert len(inputs) == total
    marks = committed(kafka_broker.bootstrap, t["group"], t["input"])
    assert {p: marks.get(p) for p in ends} == ends, "committed offsets reach the end of every partition"
    results = positions(read_all(kafka_broker.bootstrap, t["output"], total))
    done = set(results)
    print(f"{kafka_client}, {strategy}: {len(results) - len(done)} duplicate results over 4 rebalances")
    missing = {(r.partition, r.offset) for r in inputs} - done
    assert not missing, f"{len(missing)} inputs without a result"
    for name, log in logs.items():
        text = log.read_text()
        assert "rebalance callback throws" not in text and "Traceback" not in text, text[-3000:]
        assert "partitions revoked" in text or name == "c", f"{name} never gave partitions back"
