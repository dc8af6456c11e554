"""Faults on the real broker: processes killed with SIGKILL, nothing lost, and with
exactly-once nothing duplicated for a read_committed reader. Small counts: each test
proves one point."""
from __future__ import annotations

import collections
import signal
import time

import pytest

from .images import good_images
from .kafka_helpers import (
    committed,
    names,
    positions,
    produce,
    produce_steadily,
    read_all,
    read_committed,
    start_service,
    stop,
)

pytestmark = pytest.mark.kafka


def _kill_three_times_then_finish(kafka_broker, small_artifact, tmp_path, total: int, **options) -> dict:
    t = names(kafka_broker, partitions=2)
    # paced over a minute, so each kill lands while input is still arriving, however fast the service
    producer = produce_steadily(kafka_broker.bootstrap, t["input"], total, 60, image="jpeg_coffee")
    for round_ in range(3):
        log = tmp_path / f"killed-{round_}.log"
        process = start_service(kafka_broker, t, small_artifact, log, **options)
        seen = len(read_all(kafka_broker.bootstrap, t["output"], 0, timeout=1))
        deadline = time.monotonic() + 120
        while len(read_all(kafka_broker.bootstrap, t["output"], 0, timeout=1)) < seen + total // 6:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        assert producer.is_alive(), "the kill lands mid-stream"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    producer.join(120)
    log = tmp_path / "last.log"
    process = start_service(kafka_broker, t, small_artifact, log, **options)
    try:
        deadline = time.monotonic() + 180
        while "connected to" not in log.read_text():   # started (even if nothing is left to do)
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        while sum(v or 0 for v in committed(kafka_broker.bootstrap, t["group"], t["input"]).values()) < total:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
    finally:
        stop(process, log)
    return t


def test_kill_9_three_times_at_least_once_loses_nothing(kafka_broker, small_artifact, tmp_path, kafka_client):
    total = 300
    t = _kill_three_times_then_finish(kafka_broker, small_artifact, tmp_path, total, kafka_client=kafka_client)
    records = read_all(kafka_broker.bootstrap, t["output"], total)
    assert set(positions(records)) == {(p, o) for p, mark in
                                        committed(kafka_broker.bootstrap, t["group"], t["input"]).items()
                                        for o in range(mark)}
    print(f"at-least-once, {kafka_client}: {len(records) - total} duplicates after 3 x kill -9")


def test_kill_9_three_times_exactly_once_read_committed_sees_each_input_once(kafka_broker, small_artifact, tmp_path,
                                                                             kafka_client):
    total = 300
    t = _kill_three_times_then_finish(kafka_broker, small_artifact, tmp_path, total, kafka_client=kafka_client,
                                      processing_guarantee="exactly-once", transactional_id="replica-0")
    records = read_committed(kafka_broker.bootstrap, t["output"])
    counts = collections.Counter(positions(records))
    duplicates = {p: n for p, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} inputs seen more than once read_committed"
    marks = committed(kafka_broker.bootstrap, t["group"], t["input"])
    assert set(counts) == {(p, o) for p, mark in marks.items() for o in range(mark)} and sum(marks.values()) == total
    raw = read_all(kafka_broker.bootstrap, t["output"], total)
    print(f"exactly-once, {kafka_client}: 0 duplicates read_committed; {len(raw) - total} aborted records visible "
          f"read_uncommitted")


class _FlakyProxy:
    """A TCP proxy between the service and the broker that delays every chunk and can cut
    every open connection at once."""

    def __init__(self, upstream: int, delay_s: float = 0.01) -> None:
        import socket
        import threading

        from stream.embedded_broker import free_port
        self.port, self.upstream, self.delay_s = free_port(), upstream, delay_s
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._open: list = []
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
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


def test_connections_delayed_and_cut_mid_stream_lose_nothing(small_artifact, tmp_path):
    from stream.embedded_broker import EmbeddedBroker, free_port
    port = free_port()
    proxy = _FlakyProxy(port)
    broker = EmbeddedBroker(port=port, advertised_port=proxy.port, log_path=tmp_path / "tansu.log").start()
    total = 300
    log = tmp_path / "service.log"
    try:
        t = names(broker, partitions=2)
        # paced, so the three cuts land while input is still arriving however fast the service is
        producer = produce_steadily(broker.bootstrap, t["input"], total, 20, image="jpeg_rocket")
        process = start_service(broker, t, small_artifact, log)
        try:
            deadline = time.monotonic() + 240
            while True:
                marks = committed(broker.bootstrap, t["group"], t["input"])
                if sum(v or 0 for v in marks.values()) >= total:
                    break
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                done = len(read_all(broker.bootstrap, t["output"], 0, timeout=1))
                if proxy.cuts < 3 and done > total * (proxy.cuts + 1) // 8:
                    proxy.cut()
                time.sleep(0.5)
        finally:
            stop(process, log)
            producer.join(30)
        assert proxy.cuts == 3, "every cut landed mid-stream"
        records = read_all(broker.bootstrap, t["output"], total)
        assert set(positions(records)) == {(p, o) for p, mark in marks.items() for o in range(mark)}
        assert sum(marks.values()) == total
    finally:
        proxy.close()
        broker.stop()



def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_soak_10000_images_rss_growth_stays_under_50_mb(kafka_broker, small_artifact, tmp_path):
    total = 10_000
    t = names(kafka_broker, partitions=2)
    images = list(good_images().values())
    produce(kafka_broker.bootstrap, t["input"], [(str(i).encode(), images[i % len(images)]) for i in range(total)])
    log = tmp_path / "soak.log"
    process = start_service(kafka_broker, t, small_artifact, log)
    rss = {}
    try:
        deadline = time.monotonic() + 1800
        while sum(v or 0 for v in committed(kafka_broker.bootstrap, t["group"], t["input"]).values()) < total:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            done = sum(v or 0 for v in committed(kafka_broker.bootstrap, t["group"], t["input"]).values())
            if done >= 2000 and "2000" not in rss:
                rss["2000"] = _rss_mb(process.pid)
            time.sleep(2)
        rss["10000"] = _rss_mb(process.pid)
    finally:
        stop(process, log)
    growth = rss["10000"] - rss["2000"]
    print(f"soak: RSS {rss['2000']:.0f} MB at 2,000 images, {rss['10000']:.0f} MB at 10,000: {growth:+.0f} MB")
    assert growth < 50
