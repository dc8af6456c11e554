"""Producing to and reading back from the real broker in integration tests."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]


def produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]], headers=None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for key, value in items:
        producer.send(topic, key=key, value=value, headers=headers or [])
    producer.flush()
    producer.close()


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 60.0,
             isolation_level: str = "read_uncommitted", to_end: bool = False) -> list:
    """Every record of ``topic`` (no group), waiting until at least ``expected`` exist; with ``to_end``,
    also until the reader has reached the high watermark each partition's last fetch reported."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=500,
                             isolation_level=isolation_level)
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
        if len(records) >= expected and (not to_end or _at_end(consumer, tps)):
            # one more short poll to catch duplicates in flight
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
            break
    consumer.close()
    return records


def _at_end(consumer: KafkaConsumer, tps: list[TopicPartition]) -> bool:
    ends = [consumer.highwater(tp) for tp in tps]
    return all(end is not None and consumer.position(tp) >= end for tp, end in zip(tps, ends, strict=True))


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    partitions = consumer.partitions_for_topic(topic) or set()
    out = {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)}
    consumer.close()
    return out


def names(kafka_broker, partitions: int = 2) -> dict:
    run = uuid.uuid4().hex[:8]
    topics = {"input": f"images-{run}", "output": f"labels-{run}", "dlq": f"dead-{run}", "group": f"g-{run}"}
    kafka_broker.create_topics({topics["input"]: partitions, topics["output"]: 1, topics["dlq"]: 1})
    return topics


def start_service(kafka_broker, t: dict, artifact: Path, log: Path, environ: dict | None = None,
                  **extra) -> subprocess.Popen:
    """``python -m stream`` configured through its environment twins (``extra``: STREAM_<KEY>)."""
    env = {**os.environ, **(environ or {}), "STREAM_BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
           "STREAM_INPUT_TOPIC": t["input"],
           "STREAM_OUTPUT_TOPIC": t["output"], "STREAM_DEAD_LETTER_TOPIC": t["dlq"], "STREAM_GROUP_ID": t["group"],
           "STREAM_ARTIFACT": str(artifact), "STREAM_METRICS_PORT": "0", "STREAM_MAX_BATCH": "8",
           "STREAM_COMMIT_INTERVAL_MS": "200", "STREAM_DECODE_WORKERS": "2",
           "STREAM_SESSION_TIMEOUT_MS": "6000", "PYTHONUNBUFFERED": "1",
           **{f"STREAM_{k.upper()}": str(v) for k, v in extra.items()}}
    return subprocess.Popen([sys.executable, "-m", "stream"], cwd=ROOT, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def positions(records) -> list[tuple[int, int]]:
    return [(json.loads(r.value)["source"]["partition"], json.loads(r.value)["source"]["offset"]) for r in records]


def wait_for_outputs(kafka_broker, topic: str, at_least: int, timeout: float = 120) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_all(kafka_broker.bootstrap, topic, at_least, timeout=3)
        if len(records) >= at_least:
            return records
    raise AssertionError(f"fewer than {at_least} records on {topic} after {timeout} s")


def stop(process: subprocess.Popen, log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("service did not stop within 60 s of SIGTERM:\n" + log.read_text()[-3000:]) from None
    assert code == 0, log.read_text()[-3000:]


def finished(port: int, answering: bool = False) -> int:
    """Messages the service whose metrics answer on ``port`` has finished (results and dead letters
    the broker acknowledged); 0 while it does not answer yet, unless it must be ``answering``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        if answering:
            raise
        return 0
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("sentiment_images_total{")))


def wait_finished(process: subprocess.Popen, port: int, at_least: int, log: Path, timeout: float = 120) -> int:
    """Until the service at ``port`` has finished ``at_least`` messages; returns its count then."""
    deadline = time.monotonic() + timeout
    while (done := finished(port)) < at_least:
        assert process.poll() is None, f"the service exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{done} of {at_least} finished after {timeout} s:\n" \
            + log.read_text()[-3000:]
        time.sleep(0.05)
    return done


def assert_stops_without_dead_letter(sink: Any, topic: str, error_name: str, timeout: float = 30.0) -> None:
    """Publish one result on ``sink`` (a sink whose producer the broker answers with an error only the
    operator can fix) and check that the sink stopped the member, saying ``error_name``, instead of
    dead-lettering the input or (exactly once) acknowledging it into a transaction that is aborted and
    redone for ever, and left the record unacknowledged. Closes the sink."""
    import threading

    from stream.records import Outgoing
    refused: list[BaseException] = []
    acked = threading.Event()
    try:
        sink.publish(Outgoing(topic, b"k", b"result", []), acked.set, refused.append)
        deadline = time.monotonic() + timeout
        while sink.failure is None and not refused and not acked.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not refused, f"dead-lettered on an error no input caused: {refused}"
        assert sink.failure is not None and not acked.is_set()
        assert error_name in str(sink.failure) and "stopping this member" in str(sink.failure), str(sink.failure)
    finally:
        sink.close()


def images(first: int, count: int, image: str = "jpeg_coffee") -> list[tuple[bytes, bytes]]:
    """``count`` copies of one test image keyed ``first``, ``first + 1``, ...: a chunk of a stream."""
    from .images import good_images
    value = good_images()[image]
    return [(str(i).encode(), value) for i in range(first, first + count)]


def read_committed(bootstrap: str, topic: str, timeout: float = 60.0) -> list:
    """What a read_committed reader sees, decided from the transaction markers in the log.

    tansu writes commit and abort markers (also the abort a successor's init_transactions
    writes for a killed producer) but sends no AbortedTransactions list in its Fetch
    responses, and clients filter aborted records by that list, so ``isolation_level=
    "read_committed"`` returns aborted records from it. This reads the raw batches
    (:func:`raw_batches`, read_uncommitted) and keeps a transactional record once its
    producer's commit marker follows it, as a Kafka broker's reader would. It reads up to the
    high watermark of every partition (call it once the writers have stopped)."""
    visible: list = []
    pending: dict[tuple[int, int], list] = collections.defaultdict(list)
    for partition, batch, records in raw_batches(bootstrap, topic, timeout):
        if not batch.is_transactional:
            visible.extend(records)
        elif batch.is_control_batch:
            commit = records[0].key[2:4] == b"\x00\x01"
            kept = pending.pop((partition, batch.producer_id), [])
            if commit:
                visible.extend(kept)
        else:
            pending[(partition, batch.producer_id)].extend(records)
    return visible


def raw_batches(bootstrap: str, topic: str, timeout: float = 60.0) -> list[tuple[int, Any, list]]:
    """Every record batch of ``topic`` up to each partition's high watermark, control batches and
    aborted ones included, as (partition, batch, its records), in partition and offset order.

    Sent as plain Fetch requests (read_uncommitted, no fetch session) to each partition's leader
    through kafka-python's network client, and parsed with ``kafka.record.MemoryRecords``: no
    consumer, nothing of the client patched."""
    from kafka.net.compat import KafkaNetClient
    from kafka.protocol.consumer import FetchRequest
    from kafka.protocol.metadata import MetadataRequest
    from kafka.record import MemoryRecords

    deadline = time.monotonic() + timeout
    client = KafkaNetClient(bootstrap_servers=bootstrap, client_id="tests-raw-batches")
    try:
        client.check_version(timeout_ms=int(timeout * 1000))
        leaders: dict[int, int] = {}
        while not leaders:   # a listing of every topic: asking for one by name may create it (tansu)
            node = client.least_loaded_node(bootstrap_fallback=True)
            metadata = client.send_and_receive(node, MetadataRequest(topics=None), timeout_ms=_left_ms(deadline))
            leaders = {p.partition_index: p.leader_id for t in metadata.topics if t.name == topic
                       for p in t.partitions if p.leader_id >= 0}
            assert leaders or time.monotonic() < deadline, f"no partition of {topic} has a leader after {timeout} s"
            if not leaders:
                time.sleep(0.2)
        out = []
        for partition in sorted(leaders):
            offset, high = 0, None
            while high is None or offset < high:
                assert time.monotonic() < deadline, f"{topic}[{partition}]: at {offset} of {high} after {timeout} s"
                request = FetchRequest(
                    max_wait_ms=100, min_bytes=1, max_bytes=50 << 20, isolation_level=0, session_id=0,
                    session_epoch=-1, topics=[FetchRequest.FetchTopic(topic=topic, partitions=[
                        FetchRequest.FetchTopic.FetchPartition(partition=partition, fetch_offset=offset,
                                                               partition_max_bytes=50 << 20)])],
                    forgotten_topics_data=[], rack_id="", min_version=4, max_version=12)
                response = client.send_and_receive(leaders[partition], request, timeout_ms=_left_ms(deadline))
                (data,) = [p for t in response.responses for p in t.partitions if p.partition_index == partition]
                if data.error_code == 1 and offset < data.log_start_offset:   # OFFSET_OUT_OF_RANGE: deleted
                    offset = data.log_start_offset
                    continue
                assert data.error_code == 0, f"{topic}[{partition}] at {offset}: Fetch error {data.error_code}"
                high = data.high_watermark
                raw = MemoryRecords(bytes(data.records or b""))
                while (batch := raw.next_batch()) is not None:
                    if batch.next_offset > offset:
                        out.append((partition, batch, [r for r in batch if r.offset >= offset]))
                        offset = batch.next_offset
        return out
    finally:
        client.close()


def _left_ms(deadline: float) -> int:
    return max(100, int((deadline - time.monotonic()) * 1000))


class FlakyProxy:
    """A TCP proxy between the service and the broker that delays every chunk, can cut every open
    connection at once, and while ``down`` refuses new ones (a broker away)."""

    def __init__(self, upstream: int, delay_s: float = 0.01) -> None:
        import socket
        import threading

        from stream.embedded_broker import free_port
        self.port, self.upstream, self.delay_s = free_port(), upstream, delay_s
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._open: list = []
        self.cuts = 0
        self.down = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        import socket
        with self._lock:
            doomed, self._open = self._open, []
        for s in doomed:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.cuts += 1

    def close(self) -> None:
        self._server.close()
        self.cut()
