"""The service loop: connect, poll, hand off, commit what is acknowledged, drain on stop.

All consumer calls but the rebalance listener's happen on the thread that calls
:meth:`Service.run`; decoding, inference and publishing run on their own threads (see
:mod:`.pipeline`), so the poll loop never waits for a batch and the member is never
evicted for slowness. A Kafka error that can never succeed ends the run after the
drain, raised as :class:`KafkaPermanent`; others are retried and shown on ``/readyz``.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

import plugins
from engine_build.artifact import Selection, open_artifact
from engine_build.errors import BrokerUnavailable, ConfigError, KafkaPermanent, KafkaTransient
from engine_build.imaging import DecodeLimits
from engine_build.manifest import Manifest
from engine_build.runtime.base import Backend
from engine_build.runtime.cpu import usable_cores

from .config import StreamConfig, auto_decode_workers
from .failures import FailureWatch
from .logs import BROKER_AWAY
from .metrics import HealthServer, Metrics
from .offsets import OffsetTracker
from .pipeline import PipelineConfig, Processor
from .ports import Connector, Partition, Sink, Source
from .progress import ProgressWatch
from .rebalance import Rebalance
from .transactions import RewindableSource, TransactionalSink, Transactions

log = logging.getLogger(__name__)
DEAD_LETTER_REPORT_S = 10.0   # how often dead letters no batch line counted are summarised
# While paused, the loop waits for results to drain instead of polling; it still polls (without
# waiting) this often, so a rebalance is joined without delay worth the name.
PAUSED_POLL_S = 0.5


def _broker_away(away: bool) -> None:
    """Hold the Kafka client's own log lines while the service has said the broker is away."""
    if away:
        BROKER_AWAY.set()
    else:
        BROKER_AWAY.clear()


@dataclass
class RunStats:
    consumed: int = 0
    finished: int = 0
    seconds: float = 0.0


class Service:
    def __init__(self, cfg: StreamConfig, connector: Connector | None = None, metrics: Metrics | None = None,
                 model: tuple[Manifest, Selection, Backend] | None = None) -> None:
        """``model``: the artifact already opened, as :func:`open_artifact` returns it (a test's
        stand-in); by default ``cfg.artifact`` is opened here."""
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.tracker = OffsetTracker()
        self.rebalance = Rebalance(self.tracker, self.metrics, cfg.drain_timeout_s)
        self._stop = threading.Event()
        if connector is None and cfg.kafka_client == "librdkafka":
            from .rdkafka_io import RdKafkaConnector
            connector = RdKafkaConnector(cfg)
        elif connector is None:
            from .kafka_io import KafkaConnector
            connector = KafkaConnector(cfg)
        self.connector = connector
        # Everything that can be wrong with the artifact or the plugins fails here,
        # before anything is consumed.
        self.codec = plugins.load(plugins.INPUT_GROUP, cfg.input_codec)
        self.encoder = plugins.load(plugins.OUTPUT_GROUP, cfg.output_codec)
        self.manifest, self.selection, self.backend = model or open_artifact(
            cfg.artifact, cfg.backend, cfg.precision, cfg.exact_precision, cfg.max_batch,
            threads=cfg.inference_threads or None, streams=cfg.inference_streams)
        self.model_info = {"name": self.manifest.model.name, "sha256": self.selection.sha256,
                           "precision": self.selection.precision, "placeholder": self.manifest.model.placeholder,
                           "runtime": f"{self.backend.name} ({self.backend.compute_precision})"}
        self._reachable = True
        self._missing: list[str] = []
        self._topics_checked = False   # ready only once the broker probe has looked for the input topics
        self._readiness: tuple[bool, str] = (False, "starting")
        self._polls = FailureWatch("consuming from Kafka")
        self._commits = FailureWatch("committing offsets")
        self._connecting = FailureWatch(f"connecting to Kafka at {cfg.bootstrap_servers}")
        self._failure: KafkaPermanent | None = None
        try:
            self.health = HealthServer(self.metrics, cfg.metrics_port).start() if cfg.metrics_port else None
        except OSError as exc:
            self.backend.close()
            raise ConfigError(f"--metrics-port {cfg.metrics_port}: {exc.strerror or exc}") from exc
        self.source: Source | None = None
        self.sink: Sink | None = None
        self.closing = threading.Event()   # set when the run starts closing, whatever ended it
        self._progress = ProgressWatch()

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stop.set()

    def uncommitted(self) -> str:
        """What a shutdown would leave for redelivery, for its last log line."""
        pending = ", ".join(f"{t}[{p}] below {o}" for (t, p), o in sorted(self.tracker.committable().items()))
        return f"{self.tracker.in_flight()} messages unfinished; acknowledged, not committed: {pending or 'none'}"

    def finished(self) -> int:
        """Messages whose record (result or dead letter) the broker has acknowledged."""
        return self.metrics.finished_total

    # ---- readiness ----
    def _ready(self, ready: bool, reason: str = "") -> None:
        if self._readiness[1] == "shutting down":
            return   # the probe thread may still report; shutting down is final
        if ready != self._readiness[0]:
            if ready or reason == "shutting down":
                log.info("ready" if ready else reason)
            else:
                log.warning("not ready: %s", reason)
        self._readiness = (ready, reason)
        if self.health:
            self.health.set_ready(ready, reason)
        else:
            self.metrics.ready.set(1 if ready else 0)

    def _update_readiness(self) -> None:
        if not self._reachable:
            self._ready(False, f"Kafka at {self.cfg.bootstrap_servers} is unreachable")
        elif self._missing:
            self._ready(False, f"input topic {', '.join(self._missing)} does not exist")
        elif not self._topics_checked:
            self._ready(False, "looking for the input topics")
        elif self._polls.failing:
            self._ready(False, f"consuming is failing: {self._polls.error}")
        elif self.sink is not None and self.sink.failing_since is not None:
            self._ready(False, "publishing to Kafka is failing; retrying")
        elif self._commits.failing:
            self._ready(False, f"committing offsets is failing: {self._commits.error}")
        else:
            self._ready(True)

    def _watch_broker(self, source: Source) -> None:
        """Every few seconds: do the brokers answer, do the input topics exist (for /readyz and one log
        line per change); never blocks the poll loop."""
        while True:
            reachable = source.reachable()
            if reachable != self._reachable:
                if reachable:
                    log.info("Kafka at %s answers again", self.cfg.bootstrap_servers)
                else:
                    log.warning("Kafka at %s is unreachable; retrying", self.cfg.bootstrap_servers)
                _broker_away(not reachable)
            self._reachable = reachable
            missing = source.missing_topics() if reachable else self._missing
            if missing != self._missing:
                if missing:
                    log.warning("input topic %s does not exist (it is not created by consuming): create it or fix "
                                "--input-topic", ", ".join(repr(t) for t in missing))
                else:
                    log.info("every input topic exists")
            self._missing = missing
            self._topics_checked = self._topics_checked or reachable
            self._update_readiness()
            if self._stop.wait(3.0):
                return

    # ---- connecting ----
    def _connect(self) -> bool:
        """Make the sink and source, retrying outages and transient errors; False when stopped or a
        permanent error (kept in ``_failure``) ends it."""
        delay = 0.5
        while not self._stop.is_set():
            if self.health:
                self.health.tick()   # alive while connecting: only the broker is missing
            try:
                self.sink = self.sink or self.connector.sink(self.metrics.publish_retries.inc)
                self.source = self.connector.source(self.rebalance)
                if self.cfg.processing_guarantee == "exactly-once":
                    # only the Kafka connector's ports are transactional (checked on the real broker)
                    self.rebalance.transactions = Transactions(
                        cast(TransactionalSink, self.sink), cast(RewindableSource, self.source), self.tracker,
                        self.rebalance.owned, self.cfg.drain_timeout_s, self.cfg.transaction_timeout_ms() / 1000)
                self._update_readiness()   # ready once the broker probe has found the input topics
                self._connecting.ok()
                _broker_away(False)
                log.info("connected to %s; consuming %s as group %s", self.cfg.bootstrap_servers,
                         ", ".join(self.cfg.input_topic), self.cfg.group_id)
                return True
            except KafkaPermanent as exc:
                self._failure = exc
                return False
            except (BrokerUnavailable, KafkaTransient) as exc:
                self._ready(False, str(exc))
                self._connecting.failed(exc)   # said once, and again only if the error changes
                _broker_away(isinstance(exc, BrokerUnavailable))
                log.debug("%s; retrying in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
        return False

    # ---- committing ----
    def _commit(self, offsets: dict[Partition, int] | None = None) -> None:
        transactions = self.rebalance.transactions
        owned = self.rebalance.owned()
        # never for a partition revoked meanwhile: a commit is not checked for ownership and could
        # move the new owner's committed offset past work it has not finished
        offsets = {p: o for p, o in (self.tracker.committable() if offsets is None else offsets).items()
                   if p in owned}
        if not offsets or self.source is None:
            return
        try:
            if transactions is not None:
                offsets = transactions.commit()
            else:
                self.source.commit(offsets)
        except KafkaPermanent as exc:
            self._failure = self._failure or exc
            return
        except (BrokerUnavailable, KafkaTransient) as exc:
            self._commits.failed(exc)
            return
        if not offsets:
            return
        self._commits.ok()
        self.tracker.committed(offsets)
        ends = self.source.end_offsets()
        for (topic, partition), offset in offsets.items():
            if (topic, partition) in ends:
                self.metrics.lag.labels(topic, str(partition)).set(max(0, ends[(topic, partition)] - offset))

    # ---- the loop ----
    def run(self, count: int | None = None, timeout: float | None = None) -> RunStats:
        """Consume until stopped, or until ``count`` messages are finished, or ``timeout`` s pass.

        Raises :class:`KafkaPermanent` (after draining) when consuming can never succeed.
        """
        started = time.monotonic()
        stats = RunStats()
        if not self._connect():
            self._close(None)
            if self._failure is not None:
                raise self._failure
            return stats
        assert self.source is not None and self.sink is not None
        processor = Processor(self.backend, self.codec, self.encoder, self.sink, self.tracker, self.metrics,
                              self.model_info, self._pipeline_config()).start()
        threading.Thread(target=self._watch_broker, args=(self.source,), name="broker-probe", daemon=True).start()
        try:
            self._loop(processor, stats, count, None if timeout is None else started + timeout)
        finally:
            self._close(processor)
        stats.finished = self.finished()
        stats.seconds = time.monotonic() - started
        if self._failure is not None:
            raise self._failure
        return stats

    def _pipeline_config(self) -> PipelineConfig:
        cfg = self.cfg
        decoders = cfg.decode_workers or auto_decode_workers(self.backend.on_cpu, usable_cores())
        log.info("decoding on %d thread%s%s", decoders, "s" * (decoders != 1), "" if cfg.decode_workers else " (auto)")
        return PipelineConfig(cfg.output_topic, cfg.dead_letter_topic, cfg.max_batch, cfg.max_delay_ms,
                              decoders, cfg.adaptive_batching,
                              DecodeLimits(cfg.max_message_bytes, cfg.max_pixels, cfg.reduced_decode),
                              keep_order=not cfg.unordered)

    def _loop(self, processor: Processor, stats: RunStats, count: int | None, deadline: float | None) -> None:
        assert self.source is not None
        paused, last_commit, last_report = False, time.monotonic(), time.monotonic()
        while not self._stop.is_set():
            if self.health:
                self.health.tick()
            if count is not None and self.finished() >= count and self.tracker.in_flight() == 0:
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            paused = self._backpressure(paused, processor)
            if paused:   # nothing to fetch: wait for the resume mark rather than poll (an empty poll costs ~1 ms)
                if self.tracker.in_flight() > self._resume_at:
                    self.tracker.wait_at_most(self._resume_at, PAUSED_POLL_S)
                else:
                    processor.wait_bytes_at_most(self.cfg.max_in_flight_bytes // 2, PAUSED_POLL_S)
                paused = self._backpressure(paused, processor)
            if self._stuck():
                return
            messages = self._poll(0.0 if paused else 0.1)
            # the first cause wins: a poll's, the sink's or a rebalance step's
            self._failure = self._failure or (self.sink and self.sink.failure) or self.rebalance.failure
            if self._failure is not None:
                return
            owned = self.rebalance.owned() if messages else set()
            owned -= self._redo()
            kept = [m for m in messages if (m.topic, m.partition) in owned]   # others: revoked since the poll
            for message in kept:
                processor.submit(message)
            stats.consumed += len(kept)
            if time.monotonic() - last_commit >= self.cfg.commit_interval_ms / 1000:
                self._commit()
                last_commit = time.monotonic()
                self._update_readiness()
            if time.monotonic() - last_report >= DEAD_LETTER_REPORT_S:
                processor.report_dead_letters()
                last_report = time.monotonic()

    def _stuck(self) -> bool:
        """Work queued and nothing finished for --stall-timeout-s while Kafka answers: fail /healthz and
        end the run (the group then moves this member's partitions)."""
        if not self._reachable:
            self._progress.reset()
            return False
        queued = self.tracker.in_flight()
        stalled = self._progress.stalled_for(queued, self.finished())
        if stalled <= self.cfg.stall_timeout_s:
            return False
        reason = (f"no progress for {stalled:.0f} s: {queued} messages queued and none finished "
                  f"(--stall-timeout-s {self.cfg.stall_timeout_s:g}); exiting so the group moves this member's "
                  f"partitions")
        if self.health:
            self.health.stalled = reason
        self._failure = self._failure or KafkaPermanent(reason)
        return True

    def _redo(self) -> set[Partition]:
        """Exactly once: partitions rewound after a revocation aborted their unit (their records from
        this poll are stale); a rewind that fails ends the member."""
        transactions = self.rebalance.transactions
        try:
            return transactions.redo() if transactions is not None else set()
        except KafkaPermanent as exc:
            self._failure = self._failure or exc
            return self.rebalance.owned()   # nothing more is handed out

    @property
    def _resume_at(self) -> int:
        """In flight at or below this, paused partitions resume."""
        return self.cfg.max_in_flight // 2

    def _backpressure(self, paused: bool, processor: Processor) -> bool:
        """Pause every partition while too much is in flight (messages or bytes); resume at half of
        both. Returns the new state."""
        assert self.source is not None
        in_flight, in_bytes = self.tracker.in_flight(), processor.in_flight_bytes()
        if not paused and (in_flight >= self.cfg.max_in_flight or in_bytes >= self.cfg.max_in_flight_bytes):
            self.source.pause_all()
            return True
        if paused and in_flight <= self._resume_at and in_bytes <= self.cfg.max_in_flight_bytes // 2:
            self.source.resume_all()
            return False
        return paused

    def _poll(self, timeout: float) -> list[Any]:
        """One poll; errors are classified: outages and transient ones retried, permanent ones end the run."""
        assert self.source is not None
        try:
            messages = self.source.poll(timeout, self.cfg.max_poll_records)
        except KafkaPermanent as exc:
            self._failure = exc
            return []
        except (BrokerUnavailable, KafkaTransient) as exc:
            failing_for = self._polls.failed(exc)
            self.metrics.poll_errors.labels("outage" if isinstance(exc, BrokerUnavailable) else "transient").inc()
            self._update_readiness()
            if isinstance(exc, KafkaTransient) and failing_for > self.cfg.fail_after_s:
                self._failure = KafkaPermanent(f"{exc} (failing for {failing_for:.0f} s, past --fail-after-s "
                                               f"{self.cfg.fail_after_s:g}); exiting so a restart makes a new client")
                return []
            self._stop.wait(self._polls.backoff())
            return []
        if self._polls.failing:
            self._polls.ok()
            self._update_readiness()
        return messages

    def _close(self, processor: Processor | None) -> None:
        """Stop fetching, finish in-flight batches, publish, commit, close."""
        self.closing.set()
        self._ready(False, "shutting down")
        self._stop.set()   # ends the broker probe too
        if self.source is not None:
            self.source.pause_all()
        # One deadline for the whole drain; a sink that failed for good never acknowledges what it
        # holds, so then do not wait for it.
        budget = 1.0 if self.sink is not None and self.sink.failure is not None else self.cfg.drain_timeout_s
        deadline = time.monotonic() + budget

        def left() -> float:
            return max(0.0, deadline - time.monotonic())
        inference_done = True
        if processor is not None:
            inference_done = processor.stop(left())
            processor.report_dead_letters()
            if not self.tracker.wait_idle(left()):
                log.warning("%d messages unacknowledged after %.0f s: left uncommitted (they will be redelivered)",
                            self.tracker.in_flight(), budget)
        if self.sink is not None:
            self.sink.flush(left())
        if self.rebalance.transactions is not None:
            self.rebalance.transactions.drain_timeout_s = left()
        self._commit()
        if self.rebalance.transactions is not None:
            self.rebalance.transactions.close()
        leftover = self.uncommitted() if self.tracker.committable() or self.tracker.in_flight() else None
        self.rebalance.drain_timeout_s = 0.0   # drained above: closing revokes without waiting again
        if self.source is not None:
            self.source.close()
        if self.sink is not None:
            self.sink.close()
        if inference_done:
            self.backend.close()
        else:   # a runtime may not be closed under a running inference call; the process ends anyway
            log.warning("an inference call outlasted the drain; the model is left to the process exit")
        if self.health:
            self.health.close()
        if leftover:
            log.warning("stopped: %d messages finished; left for redelivery: %s", self.finished(), leftover)
        else:
            log.info("stopped: %d messages finished, offsets committed", self.finished())
