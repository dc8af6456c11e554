"""The Kafka client, wrapped thinly: a source (consumer group) and a sink (acks=all producer).

Everything here runs kafka-python; nothing else in the service imports it.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from engine_build.errors import BrokerUnavailable

from .records import Message, Outgoing

log = logging.getLogger(__name__)
Partition = tuple[str, int]


def reachable(bootstrap: str, timeout: float = 1.0) -> bool:
    """Whether any bootstrap server accepts a TCP connection (a cheap liveness probe)."""
    import socket
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            continue
    return False


def _too_large(exc: BaseException) -> bool:
    """kafka-python raises this both for its own size check and for the broker's MESSAGE_TOO_LARGE."""
    from kafka.errors import MessageSizeTooLargeError
    return isinstance(exc, MessageSizeTooLargeError)


def _translate(exc: Exception, what: str) -> BrokerUnavailable:
    return BrokerUnavailable(f"{what}: {type(exc).__name__}: {exc}")


class KafkaSource:
    """A consumer-group member; all calls come from the poll-loop thread."""

    def __init__(self, bootstrap: str, topics: list[str], group_id: str, client_options: dict,
                 on_revoked: Callable[[list[Partition]], None], on_assigned: Callable[[list[Partition]], None],
                 max_poll_records: int = 500, auto_offset_reset: str = "earliest",
                 session_timeout_ms: int = 10_000, max_poll_interval_ms: int = 300_000) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer
        from kafka.errors import KafkaError

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked) -> None:
                on_revoked([(tp.topic, tp.partition) for tp in revoked])

            def on_partitions_assigned(self, assigned) -> None:
                on_assigned([(tp.topic, tp.partition) for tp in assigned])

        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
                auto_offset_reset=auto_offset_reset, max_poll_records=max_poll_records,
                session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=max(100, session_timeout_ms // 4),
                max_poll_interval_ms=max_poll_interval_ms, bootstrap_timeout_ms=5_000,
                client_id=f"sentiment-stream-{group_id}", **client_options)
            self._consumer.subscribe(topics=topics, listener=Listener())
        except KafkaError as exc:
            raise _translate(exc, f"cannot reach Kafka at {bootstrap}") from exc

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Message]:
        from kafka.errors import KafkaError
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:
            raise _translate(exc, "poll failed") from exc
        now = time.monotonic()
        return [Message(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or []), r.timestamp, now)
                for records in batches.values() for r in records]

    def commit(self, offsets: dict[Partition, int]) -> None:
        from kafka import OffsetAndMetadata, TopicPartition
        from kafka.errors import KafkaError
        extra = ("", -1) if len(OffsetAndMetadata._fields) == 3 else ("",)
        try:
            self._consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, *extra) for (t, p), o in offsets.items()})
        except KafkaError as exc:
            raise _translate(exc, "commit failed") from exc

    def assignment(self) -> list[Partition]:
        return [(tp.topic, tp.partition) for tp in self._consumer.assignment()]

    def pause_all(self) -> None:
        self._consumer.pause(*self._consumer.assignment())

    def resume_all(self) -> None:
        self._consumer.resume(*self._consumer.paused())

    def end_offsets(self) -> dict[Partition, int]:
        """Last known log-end offsets (from fetch responses; no extra request)."""
        out = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                out[(tp.topic, tp.partition)] = high
        return out

    def close(self) -> None:
        self._consumer.close(autocommit=False)


class KafkaSink:
    """acks=all producer; a failed send is retried with backoff until acknowledged or closed."""

    def __init__(self, bootstrap: str, client_options: dict, on_retry: Callable[[], None] = lambda: None,
                 linger_ms: int = 5, max_request_size: int = 1 << 20) -> None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError
        try:
            self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=linger_ms,
                                           max_block_ms=10_000, retries=5, bootstrap_timeout_ms=5_000,
                                           max_request_size=max_request_size, **client_options)
        except KafkaError as exc:
            raise _translate(exc, f"cannot reach Kafka at {bootstrap}") from exc
        self._on_retry = on_retry
        self._retry_lock = threading.Condition()
        self._retries: list[tuple[float, Outgoing, Callable[[], None], int]] = []
        self._closed = False
        self.failing_since: float | None = None
        self._thread = threading.Thread(target=self._retry_loop, name="publish-retry", daemon=True)
        self._thread.start()

    def publish(self, record: Outgoing, on_ack: Callable[[], None], attempt: int = 0) -> None:
        def ok(_metadata) -> None:
            self.failing_since = None
            on_ack()

        def failed(exc) -> None:
            self._schedule(record, on_ack, attempt, exc)

        try:
            future = self._producer.send(record.topic, key=record.key, value=record.value, headers=record.headers)
        except Exception as exc:  # KafkaTimeoutError while the broker is away, or a closed producer
            self._schedule(record, on_ack, attempt, exc)
            return
        future.add_callback(ok)
        future.add_errback(failed)

    def _schedule(self, record: Outgoing, on_ack, attempt: int, exc: BaseException) -> None:
        if record.fallback is not None and _too_large(exc):
            log.warning("broker refused a %d-byte record for %s as too large; publishing it without its value",
                        len(record.value), record.topic)
            self.publish(record.fallback, on_ack)
            return
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        delay = min(5.0, 0.1 * 2 ** attempt)
        log.warning("publish to %s failed (%s: %s); retrying in %.1f s", record.topic, type(exc).__name__, exc, delay)
        self._on_retry()
        with self._retry_lock:
            self._retries.append((time.monotonic() + delay, record, on_ack, attempt + 1))
            self._retry_lock.notify()

    def _retry_loop(self) -> None:
        while True:
            with self._retry_lock:
                while not self._closed and not self._due():
                    wait = min((at for at, *_ in self._retries), default=time.monotonic() + 1) - time.monotonic()
                    self._retry_lock.wait(max(0.01, wait))
                if self._closed:
                    return
                now = time.monotonic()
                due = [r for r in self._retries if r[0] <= now]
                self._retries = [r for r in self._retries if r[0] > now]
            for _, record, on_ack, attempt in due:
                self.publish(record, on_ack, attempt)

    def _due(self) -> bool:
        now = time.monotonic()
        return any(at <= now for at, *_ in self._retries)

    def pending_retries(self) -> int:
        with self._retry_lock:
            return len(self._retries)

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        try:
            self._producer.flush(timeout=max(0.1, timeout))
        except Exception as exc:
            log.warning("flush: %s", exc)
        while self.pending_retries() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.pending_retries()

    def close(self) -> None:
        with self._retry_lock:
            self._closed = True
            self._retry_lock.notify_all()
        self._producer.close(timeout=5)
