"""The benchmark's own Kafka clients: the input producer and the result reader.

librdkafka (confluent-kafka, from the test extra) rather than kafka-python: their per-record work
is C, so they take a few hundredths of a core from the service they measure instead of a tenth or
more. Each input record is keyed ``seq:send time in ns``; the service passes keys through, so a
result's latency is its arrival at the reader minus that time.
"""
from __future__ import annotations

import json
import threading
import time


class Reader(threading.Thread):
    """Reads a result topic; latency = arrival time - send time embedded in the key ``seq:epoch_ns``."""

    def __init__(self, bootstrap: str, topic: str, fetch_wait_ms: int = 5) -> None:
        super().__init__(name="reader", daemon=True)
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-reader-{topic}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": fetch_wait_ms})
        partitions = self.consumer.list_topics(topic, timeout=30).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self.seen: list[tuple[float, float]] = []    # (arrival, latency s)
        self.seqs: list[int] = []                     # each result's input sequence number
        self.inside: list[dict] = []                  # the service's own timing_ms of each result
        self.lock = threading.Condition()
        self.halt = False

    def run(self) -> None:
        while not self.halt:
            first = self.consumer.poll(0.05)    # consume(n, timeout) would wait out its timeout for n
            if first is None:
                continue
            now = time.time_ns()
            records = [r for r in [first, *self.consumer.consume(1000, 0)] if r.error() is None]
            with self.lock:
                for r in records:
                    seq, sent = (int(part) for part in r.key().split(b":"))
                    self.seen.append((now / 1e9, (now - sent) / 1e9))
                    self.seqs.append(seq)
                    self.inside.append(json.loads(r.value()).get("timing_ms", {}))
                self.lock.notify_all()
        self.consumer.close()

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.seen) < count and time.monotonic() < deadline:
                self.lock.wait(0.1)
            return len(self.seen) >= count

    def close(self) -> None:
        self.halt = True
        self.join(5)


class Producer:
    """One record per send, at once (``linger.ms`` 0), so a paced run's records leave when they are
    sent; a record the broker refuses fails the next :meth:`flush`."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka import Producer as Librdkafka
        self._producer = Librdkafka({"bootstrap.servers": bootstrap, "acks": 1, "linger.ms": 0,
                                     "message.max.bytes": 8 << 20})
        self._failures: list[str] = []

    def _delivered(self, error: object, _record: object) -> None:
        if error is not None:
            self._failures.append(str(error))

    def send(self, topic: str, payload: bytes, seq: int) -> None:
        """``payload`` keyed ``seq:send time in ns``."""
        while True:
            try:
                self._producer.produce(topic, key=f"{seq}:{time.time_ns()}".encode(), value=payload,
                                       on_delivery=self._delivered)
                break
            except BufferError:       # its local queue is full: let deliveries drain it
                self._producer.poll(0.05)
        self._producer.poll(0)

    def flush(self) -> None:
        if self._producer.flush(60):
            raise RuntimeError("the benchmark's producer could not deliver its records in 60 s")
        if self._failures:
            raise RuntimeError(f"the broker refused {len(self._failures)} input records: {self._failures[0]}")

    def close(self) -> None:
        """Deliver what is queued and let the client go (before the broker stops: else it logs reconnects)."""
        self.flush()
        del self._producer


def paced(prod: Producer, topic: str, payloads: list[bytes], rate: float, seconds: float, first: int = 0) -> int:
    """Send at a fixed rate (open loop) for ``seconds``; returns how many were sent."""
    count, start = int(rate * seconds), time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        prod.send(topic, payloads[i % len(payloads)], first + i)
    prod.flush()
    return count
