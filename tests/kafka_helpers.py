"""Producing to and reading back from the real broker in integration tests."""
from __future__ import annotations

import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition


def produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]], headers=None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for key, value in items:
        producer.send(topic, key=key, value=value, headers=headers or [])
    producer.flush()
    producer.close()


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> list:
    """Every record of ``topic`` (no group), waiting until at least ``expected`` exist."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=500)
    partitions = consumer.partitions_for_topic(topic) or set()
    deadline = time.monotonic() + timeout
    while not partitions and time.monotonic() < deadline:
        time.sleep(0.2)
        partitions = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records = []
    while time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=300).values():
            records.extend(batch)
        if len(records) >= expected:
            # one more short poll to catch duplicates in flight
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
            break
    consumer.close()
    return records


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    partitions = consumer.partitions_for_topic(topic) or set()
    out = {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)}
    consumer.close()
    return out
