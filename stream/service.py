"""The service loop: connect, poll, hand off, commit what is acknowledged, drain on stop.

All consumer calls happen on the thread that calls :meth:`Service.run`; decoding,
inference and publishing run on their own threads (see :mod:`.pipeline`), so the
poll loop never waits for a batch and the member is never evicted for slowness.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import plugins
from engine_build.artifact import open_artifact
from engine_build.errors import BrokerUnavailable, ConfigError
from engine_build.imaging import DecodeLimits

from .config import StreamConfig
from .metrics import HealthServer, Metrics
from .offsets import OffsetTracker
from .pipeline import PipelineConfig, Processor

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    consumed: int = 0
    finished: int = 0
    commits: int = 0
    seconds: float = 0.0


class Service:
    def __init__(self, cfg: StreamConfig, source_factory: Callable | None = None,
                 sink_factory: Callable | None = None, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.tracker = OffsetTracker()
        self._stop = threading.Event()
        # Everything that can be wrong with the artifact or the plugins fails here,
        # before anything is consumed.
        self.codec = plugins.load(plugins.INPUT_GROUP, cfg.input_codec)
        self.encoder = plugins.load(plugins.OUTPUT_GROUP, cfg.output_codec)
        self.manifest, self.selection, self.backend = open_artifact(
            cfg.artifact, cfg.backend, cfg.precision, cfg.exact_precision, cfg.max_batch,
            threads=cfg.inference_threads or None)
        key = "tensorrt" if self.selection.backend == "tensorrt" else self.selection.precision
        self.model_info = {"name": self.manifest["model"]["name"], "sha256": self.manifest["files"][key]["sha256"],
                           "precision": self.selection.precision, "placeholder": self.manifest["model"]["placeholder"],
                           "runtime": f"{self.backend.name} ({self.backend.compute_precision})"}
        self._source_factory = source_factory or self._kafka_source
        self._sink_factory = sink_factory or self._kafka_sink
        self._probe_broker = source_factory is None   # the fake broker has no address to probe
        self._reachable = True
        self._commit_ok = True
        self._commits = 0
        try:
            self.health = HealthServer(self.metrics, cfg.metrics_port).start() if cfg.metrics_port else None
        except OSError as exc:
            self.backend.close()
            raise ConfigError(f"--metrics-port {cfg.metrics_port}: {exc.strerror or exc}") from None
        self.source = self.sink = None

    # ---- Kafka wiring (replaced by the fake broker in unit tests) ----
    def _kafka_source(self, on_revoked, on_assigned):
        from .kafka_io import KafkaSource
        return KafkaSource(self.cfg.bootstrap_servers, list(self.cfg.input_topic), self.cfg.group_id,
                           self.cfg.client_options(), on_revoked, on_assigned, self.cfg.max_poll_records,
                           self.cfg.auto_offset_reset, self.cfg.session_timeout_ms, self.cfg.max_poll_interval_ms)

    def _kafka_sink(self, on_retry):
        from .kafka_io import KafkaSink
        # Room for a dead letter carrying the largest accepted input, plus headers.
        return KafkaSink(self.cfg.bootstrap_servers, self.cfg.client_options(), on_retry,
                         max_request_size=max(1 << 20, self.cfg.max_message_bytes + (64 << 10)))

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stop.set()

    def _ready(self, ready: bool, reason: str = "") -> None:
        if self.health:
            self.health.set_ready(ready, reason)
        else:
            self.metrics.ready.set(1 if ready else 0)

    def _watch_broker(self) -> None:
        """Every few seconds, whether the brokers answer at all (for /readyz); never blocks the poll loop."""
        from .kafka_io import reachable
        while not self._stop.wait(3.0):
            self._reachable = reachable(self.cfg.bootstrap_servers)

    def _update_readiness(self) -> None:
        failing = getattr(self.sink, "failing_since", None) is not None
        if not self._reachable:
            self._ready(False, f"Kafka at {self.cfg.bootstrap_servers} is unreachable")
        elif failing:
            self._ready(False, "publishing to Kafka is failing; retrying")
        elif not self._commit_ok:
            self._ready(False, "committing offsets is failing; retrying")
        else:
            self._ready(True)

    def _connect(self) -> bool:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self.sink = self.sink or self._sink_factory(self.metrics.publish_retries.inc)
                self.source = self._source_factory(self._on_revoked, self._on_assigned)
                self._ready(True)
                log.info("connected to %s; consuming %s as group %s", self.cfg.bootstrap_servers,
                         ", ".join(self.cfg.input_topic), self.cfg.group_id)
                return True
            except BrokerUnavailable as exc:
                self._ready(False, str(exc))
                log.warning("%s; retrying in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
        return False

    # ---- rebalance: finish and commit revoked partitions' work before release ----
    def _on_revoked(self, partitions) -> None:
        if not partitions:
            return
        drained = self.tracker.wait_idle(self.cfg.drain_timeout_s, partitions)
        self._commit({p: o for p, o in self.tracker.committable().items() if p in partitions})
        if not drained:
            log.warning("revoked %s with work still in flight: left uncommitted (it will be redelivered)", partitions)
        self.tracker.forget(partitions)
        log.info("partitions revoked: %s", ", ".join(f"{t}[{p}]" for t, p in partitions))

    def _on_assigned(self, partitions) -> None:
        log.info("partitions assigned: %s", ", ".join(f"{t}[{p}]" for t, p in partitions) or "none")

    def _commit(self, offsets=None) -> None:
        offsets = self.tracker.committable() if offsets is None else offsets
        if not offsets or self.source is None:
            return
        try:
            self.source.commit(offsets)
        except BrokerUnavailable as exc:
            self._commit_ok = False
            log.warning("%s; will retry", exc)
            return
        self._commit_ok = True
        self.tracker.committed(offsets)
        self._commits += 1
        ends = self.source.end_offsets()
        for (topic, partition), offset in offsets.items():
            if (topic, partition) in ends:
                self.metrics.lag.labels(topic, str(partition)).set(max(0, ends[(topic, partition)] - offset))

    def run(self, count: int | None = None, timeout: float | None = None) -> RunStats:
        """Consume until stopped, or until ``count`` messages are finished, or ``timeout`` s pass."""
        started = time.monotonic()
        stats = RunStats()
        if not self._connect():
            self._close(None)
            return stats
        processor = Processor(self.backend, self.codec, self.encoder, self.sink, self.tracker, self.metrics,
                              self.model_info, PipelineConfig(
                                  self.cfg.output_topic, self.cfg.dead_letter_topic, self.cfg.max_batch,
                                  self.cfg.max_delay_ms, self.cfg.decode_workers,
                                  DecodeLimits(self.cfg.max_message_bytes, self.cfg.max_pixels,
                                               not self.cfg.no_reduced_decode))).start()
        if self._probe_broker:
            threading.Thread(target=self._watch_broker, name="broker-probe", daemon=True).start()
        paused, last_commit = False, time.monotonic()
        try:
            while not self._stop.is_set():
                if self.health:
                    self.health.tick()
                finished = self.finished()
                if count is not None and finished >= count and self.tracker.in_flight() == 0:
                    break
                if timeout is not None and time.monotonic() - started > timeout:
                    break
                in_flight = self.tracker.in_flight()
                if not paused and in_flight >= self.cfg.max_in_flight:
                    self.source.pause_all()
                    paused = True
                elif paused and in_flight <= self.cfg.max_in_flight // 2:
                    self.source.resume_all()
                    paused = False
                try:
                    messages = self.source.poll(0.1, self.cfg.max_poll_records)
                except BrokerUnavailable as exc:
                    self._ready(False, str(exc))
                    log.warning("%s", exc)
                    self._stop.wait(1.0)
                    continue
                for message in messages:
                    processor.submit(message)
                stats.consumed += len(messages)
                if time.monotonic() - last_commit >= self.cfg.commit_interval_ms / 1000:
                    self._commit()
                    last_commit = time.monotonic()
                    self._update_readiness()
        finally:
            self._close(processor)
        stats.finished = self.finished()
        stats.commits = self._commits
        stats.seconds = time.monotonic() - started
        return stats

    def finished(self) -> int:
        """Messages whose record (result or dead letter) the broker has acknowledged."""
        return self.metrics.finished_total

    def _close(self, processor: Processor | None) -> None:
        """Stop fetching, finish in-flight batches, publish, commit, close."""
        self._ready(False, "shutting down")
        if self.source is not None:
            self.source.pause_all()
        if processor is not None:
            processor.stop(self.cfg.drain_timeout_s)
            if not self.tracker.wait_idle(self.cfg.drain_timeout_s):
                log.warning("%d messages unacknowledged after %.0f s: left uncommitted (they will be redelivered)",
                            self.tracker.in_flight(), self.cfg.drain_timeout_s)
        if self.sink is not None:
            self.sink.flush(self.cfg.drain_timeout_s)
        self._commit()
        if self.source is not None:
            self.source.close()
        if self.sink is not None:
            self.sink.close()
        self.backend.close()
        if self.health:
            self.health.close()
        log.info("stopped: %d messages finished, offsets committed", self.finished())
