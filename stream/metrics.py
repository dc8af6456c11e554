"""Prometheus metrics plus ``/healthz`` and ``/readyz`` on one port."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """All service metrics in one registry (a fresh one per service, so tests stay apart)."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: the time of the per-second rate (a test's hand-turned clock)."""
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)   # the standard process_* metrics: resident memory, CPU seconds, open files
        self.images = Counter("sentiment_images", "Messages finished, by outcome", ["outcome"], registry=r)
        self.decode_failures = Counter("sentiment_decode_failures", "Rejected inputs, by reason", ["reason"],
                                       registry=r)
        self.dead_letters = Counter("sentiment_dead_letters", "Dead-letter records acknowledged", registry=r)
        self.batch_size = Histogram("sentiment_batch_size", "Images per inference batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.inference = Histogram("sentiment_inference_seconds", "Inference time per batch", buckets=_LATENCY,
                                   registry=r)
        self.end_to_end = Histogram("sentiment_end_to_end_seconds", "Poll to broker acknowledgement, per message",
                                    buckets=_LATENCY, registry=r)
        self.lag = Gauge("sentiment_consumer_lag", "Log end offset minus committed offset", ["topic", "partition"],
                         registry=r)
        self.in_flight = Gauge("sentiment_in_flight", "Messages received and not yet acknowledged", registry=r)
        self.rate = Gauge("sentiment_images_per_second", "Messages finished per second over the last 10 s", registry=r)
        self.ready = Gauge("sentiment_ready", "1 when connected to the broker and consuming", registry=r)
        self.poll_errors = Counter("sentiment_poll_errors", "Failed polls, by kind (outage, transient)", ["kind"],
                                   registry=r)
        self.publish_retries = Counter("sentiment_publish_retries", "Publishes retried after a broker error",
                                       registry=r)
        self.finished_total = 0
        self._recent: deque[float] = deque()
        self._lock = threading.Lock()
        self.rate.set_function(self._rate)

    def record_finished(self, outcome: str, received: float) -> None:
        """One message's record (result or dead letter) was acknowledged by the broker."""
        now = self.clock()
        self.images.labels(outcome).inc()
        self.end_to_end.observe(now - received)
        with self._lock:
            self.finished_total += 1
            self._recent.append(now)

    def _rate(self) -> float:
        """Computed at scrape time, so it falls to 0 when traffic stops."""
        now = self.clock()
        with self._lock:
            while self._recent and self._recent[0] < now - 10:
                self._recent.popleft()
            return len(self._recent) / 10.0

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``connections`` at once: one more is closed unanswered at once
    (idle or half-sent requests cannot pile up threads; each also times out, :class:`HealthServer`)."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], connections: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:   # its thread did not start: the slot is free again
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HealthServer:
    """Serves /metrics, /healthz (the loop is alive) and /readyz (broker reachable, consuming), to GET and
    HEAD, whatever the query string. A connection is closed ``timeout_s`` after it opened, answered or not,
    and at most ``connections`` are served at once (300 idle half-sent requests once held 316 threads)."""

    def __init__(self, metrics: Metrics, port: int, host: str = "0.0.0.0", timeout_s: float = 5.0,
                 connections: int = 32) -> None:
        self.metrics = metrics
        self.alive_at = time.monotonic()
        self.is_ready = False
        self.reason = "starting"
        self.stalled: str | None = None   # why the pipeline is stuck, once it is
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s   # each read and write on the connection (StreamRequestHandler)

            def setup(self) -> None:
                super().setup()
                # and the whole connection (one request: HTTP/1.0), so a client trickling a byte at a time
                # cannot hold its slot: cut at the timeout, its read then ends
                self._cut = threading.Timer(timeout_s, self._shut)
                self._cut.daemon = True
                self._cut.start()

            def finish(self) -> None:
                self._cut.cancel()
                super().finish()

            def _shut(self) -> None:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                self._send(*self._answer())

            def do_HEAD(self) -> None:  # noqa: N802 (http.server API)
                self._send(*self._answer(), head=True)

            def _answer(self) -> tuple[int, bytes, str]:
                path, text = self.path.split("?", 1)[0], "text/plain; charset=utf-8"
                if path == "/metrics":
                    return 200, outer.metrics.render(), CONTENT_TYPE_LATEST
                if path == "/healthz":
                    alive = time.monotonic() - outer.alive_at < 60
                    if outer.stalled is not None:
                        return 503, f"{outer.stalled}\n".encode(), text
                    return (200 if alive else 503), (b"ok\n" if alive else b"poll loop stalled\n"), text
                if path == "/readyz":
                    return (200 if outer.is_ready else 503,
                            b"ready\n" if outer.is_ready else f"not ready: {outer.reason}\n".encode(), text)
                return 404, b"not found\n", text

            def _send(self, code: int, body: bytes, ctype: str, head: bool = False) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = _BoundedServer((host, port), Handler, connections)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.is_ready = ready
        self.reason = reason
        self.metrics.ready.set(1 if ready else 0)

    def tick(self) -> None:
        self.alive_at = time.monotonic()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
