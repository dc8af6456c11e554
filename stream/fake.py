"""An in-process fake broker with the service's source and sink interfaces.

For fast, honest unit tests of the service logic (batching, dead letters, offset
commits, draining): it keeps records and committed offsets like a single-member
consumer group would. It is not Kafka; integration tests use a real broker.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Callable

from .records import Headers, Message, Outgoing

Partition = tuple[str, int]


class FakeBroker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.topics: dict[str, list[list[tuple[bytes | None, bytes | None, Headers]]]] = {}
        self.committed: dict[str, dict[Partition, int]] = defaultdict(dict)
        self.fail_next_publishes = 0          # make the next N sends fail once each
        self.max_record_bytes: int | None = None   # like a broker's message.max.bytes

    def create_topic(self, name: str, partitions: int = 1) -> None:
        with self.lock:
            self.topics.setdefault(name, [[] for _ in range(partitions)])

    def produce(self, topic: str, value: bytes | None, key: bytes | None = None, headers: Headers | None = None,
                partition: int | None = None) -> int:
        with self.lock:
            parts = self.topics.setdefault(topic, [[]])
            index = partition if partition is not None else (hash(key) % len(parts) if key else 0)
            parts[index].append((key, value, list(headers or [])))
            return len(parts[index]) - 1

    def records(self, topic: str) -> list[tuple[bytes | None, bytes | None, Headers]]:
        with self.lock:
            return [r for part in self.topics.get(topic, []) for r in part]


class FakeSource:
    def __init__(self, broker: FakeBroker, topics: list[str], group_id: str,
                 on_revoked: Callable = lambda p: None, on_assigned: Callable = lambda p: None) -> None:
        self.broker, self.group = broker, group_id
        with broker.lock:
            self._assigned = [(t, i) for t in topics for i in range(len(broker.topics.get(t, [[]])))]
        start = broker.committed[group_id]
        self._position = {p: start.get(p, 0) for p in self._assigned}
        self.paused = False
        self.closed = False
        on_assigned(list(self._assigned))

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Message]:
        out: list[Message] = []
        if not self.paused:
            with self.broker.lock:
                for (topic, index) in self._assigned:
                    log = self.broker.topics[topic][index]
                    while self._position[(topic, index)] < len(log) and (max_records is None or len(out) < max_records):
                        offset = self._position[(topic, index)]
                        key, value, headers = log[offset]
                        out.append(Message(topic, index, offset, key, value, headers, int(time.time() * 1000)))
                        self._position[(topic, index)] += 1
        if not out:
            time.sleep(min(timeout_s, 0.01))
        return out

    def commit(self, offsets: dict[Partition, int]) -> None:
        with self.broker.lock:
            self.broker.committed[self.group].update(offsets)

    def assignment(self) -> list[Partition]:
        return list(self._assigned)

    def pause_all(self) -> None:
        self.paused = True

    def resume_all(self) -> None:
        self.paused = False

    def end_offsets(self) -> dict[Partition, int]:
        with self.broker.lock:
            return {(t, i): len(self.broker.topics[t][i]) for t, i in self._assigned}

    def close(self) -> None:
        self.closed = True


class FakeSink:
    def __init__(self, broker: FakeBroker, on_retry: Callable[[], None] = lambda: None) -> None:
        self.broker, self._on_retry = broker, on_retry
        self.failing_since = None

    def publish(self, record: Outgoing, on_ack: Callable[[], None]) -> None:
        with self.broker.lock:
            fail = self.broker.fail_next_publishes > 0
            if fail:
                self.broker.fail_next_publishes -= 1
        if fail:   # like the Kafka sink: retried, never dropped
            self._on_retry()
            threading.Timer(0.01, self.publish, (record, on_ack)).start()
            return
        limit = self.broker.max_record_bytes
        if limit is not None and len(record.value) > limit:
            if record.fallback is None:   # the Kafka sink would retry forever; make that visible here
                raise AssertionError(f"record of {len(record.value)} bytes exceeds {limit} and has no fallback")
            self.publish(record.fallback, on_ack)
            return
        self.broker.produce(record.topic, record.value, record.key, record.headers, partition=0)
        on_ack()

    def flush(self, timeout: float) -> bool:
        return True

    def pending_retries(self) -> int:
        return 0

    def close(self) -> None:
        pass
