"""The service loop: connect, poll, hand off, commit what is acknowledged, drain on stop.

A :class:`Service` is handed everything it uses, already built (:func:`.app.build` builds
them from the config); it only runs, and closes what it was handed when the run ends.

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
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from engine_build.artifact import Selection
from engine_build.imaging import decode
from engine_build.manifest import Manifest
from engine_build.runtime.base import Backend

from .config import StreamConfig
from .errors import BrokerUnavailable, KafkaPermanent, KafkaTransient
from .failures import FailureWatch
from .logs import BROKER_AWAY
from .metrics import HealthServer, Metrics
from .offsets import OffsetTracker
from .pipeline import Decoder, PipelineConfig, Processor
from .ports import Connector, Partition, Sink, Source
from .progress import ProgressWatch
from .readiness import Readiness
from .rebalance import Rebalance
from .transactions import RewindableSource, TransactionalSink, Transactions

if TYPE_CHECKING:
    from plugins.codecs import InputCodec
    from plugins.encoders import OutputEncoder

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


@dataclass(frozen=True)
class Ports:
    """The connected ports of one run: what the loop consumes from and publishes to."""
    source: Source
    sink: Sink
    transactions: Transactions | None   # exactly once only


class Service:
    """Runs what it is handed (built by :func:`.app.build`): connects, polls, hands off, commits, drains."""

    def __init__(self, cfg: StreamConfig, connector: Connector, model: tuple[Manifest, Selection, Backend],
                 codec: InputCodec, encoder: OutputEncoder, pipeline: PipelineConfig, *, metrics: Metrics,
                 tracker: OffsetTracker, health: HealthServer | None = None, decoder: Decoder = decode,
                 dead_letter_report_s: float = DEAD_LETTER_REPORT_S) -> None:
        """Only stores: ``model`` is the artifact already opened (as :func:`open_artifact` returns it),
        ``health`` the server already started; both are closed when the run ends."""
        self.cfg, self.connector, self.pipeline = cfg, connector, pipeline
        self.codec, self.encoder, self.decoder = codec, encoder, decoder
        self.metrics, self.tracker, self.health = metrics, tracker, health
        self.dead_letter_report_s = dead_letter_report_s
        self.rebalance = Rebalance(tracker, metrics, cfg.drain_timeout_s)
        self._stop = threading.Event()
        self.manifest, self.selection, self.backend = model
        self.model_info = {"name": self.manifest.model.name, "sha256": self.selection.sha256,
                           "precision": self.selection.precision, "placeholder": self.manifest.model.placeholder,
                           "runtime": f"{self.backend.name} ({self.backend.compute_precision})"}
        self.readiness = Readiness(cfg.bootstrap_servers, health.set_ready if health else self._ready_gauge, log)
        self._polls = FailureWatch("consuming from Kafka")
        # commits are tried only while there is something to commit: a failure after a quiet stretch starts afresh
        self._commits = FailureWatch("committing offsets",
                                     forget_after_s=2 * (cfg.commit_interval_ms / 1000 + cfg.drain_timeout_s))
        self._connecting = FailureWatch(f"connecting to Kafka at {cfg.bootstrap_servers}")
        self._failure: KafkaPermanent | None = None
        self.closing = threading.Event()   # set when the run starts closing, whatever ended it
        self._progress = ProgressWatch()
        self._drain_deadline = 0.0         # when closing, the one deadline of the whole drain
        self._drain_budget = 0.0
        self._inference_done = True        # False while an inference call may still be running
        self._leftover: str | None = None  # what the shutdown leaves for redelivery

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
    def _ready_gauge(self, ready: bool, reason: str) -> None:
        self.metrics.ready.set(1 if ready else 0)

    def _update_readiness(self, ports: Ports) -> None:
        if self._polls.failing:
            failing: str | None = f"consuming is failing: {self._polls.error}"
        elif ports.sink.failing_since is not None:
            failing = "publishing to Kafka is failing; retrying"
        elif self._commits.failing:
            failing = f"committing offsets is failing: {self._commits.error}"
        else:
            failing = None
        self.readiness.update(failing)

    def _watch_broker(self, ports: Ports) -> None:
        """Every few seconds: do the brokers answer, do the input topics exist (for /readyz and one log
        line per change); never blocks the poll loop."""
        while True:
            reachable = ports.source.reachable()
            if self.readiness.observed(reachable, ports.source.missing_topics() if reachable else None):
                _broker_away(not reachable)
            self._update_readiness(ports)
            if self._stop.wait(3.0):
                return

    # ---- connecting ----
    def _connect(self, closes: ExitStack) -> Ports | None:
        """Make the sink and source, retrying outages and transient errors; None when stopped or a
        permanent error (kept in ``_failure``) ends it. Each port made is entered into ``closes``,
        followed by what settles the shutdown between their closes."""
        delay = 0.5
        sink: Sink | None = None   # made once: kept through the source's retries
        while not self._stop.is_set():
            if self.health:
                self.health.tick()   # alive while connecting: only the broker is missing
            try:
                if sink is None:
                    sink = self.connector.sink(self.metrics.publish_retries.inc)
                    closes.callback(sink.close)
                source = self.connector.source(self.rebalance)
                closes.callback(source.close)
                closes.callback(self._settle)
                transactions = None
                if self.cfg.processing_guarantee == "exactly-once":
                    # only the Kafka connector's ports are transactional (checked on the real broker)
                    transactions = self.rebalance.transactions = Transactions(
                        cast(TransactionalSink, sink), cast(RewindableSource, source), self.tracker,
                        self.rebalance.owned, self.cfg.drain_timeout_s, self.cfg.transaction_timeout_ms() / 1000)
                    closes.callback(transactions.close)
                ports = Ports(source, sink, transactions)
                self._update_readiness(ports)   # ready once the broker probe has found the input topics
                self._connecting.ok()
                _broker_away(False)
                log.info("connected to %s; consuming %s as group %s", self.cfg.bootstrap_servers,
                         ", ".join(self.cfg.input_topic), self.cfg.group_id)
                return ports
            except KafkaPermanent as exc:
                self._failure = exc
                return None
            except (BrokerUnavailable, KafkaTransient) as exc:
                self.readiness.set(False, str(exc))
                # said once, and again only if the error changes; one that is no outage ends the run past the limit
                self._failure = self._past_the_limit(self._connecting, exc)
                if self._failure is not None:
                    return None
                _broker_away(isinstance(exc, BrokerUnavailable))
                log.debug("%s; retrying in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
        return None

    # ---- committing ----
    def _commit(self, ports: Ports, wait: bool) -> None:
        """``wait``: the last commit, answered before it returns (the periodic one need not be:
        :meth:`.ports.Source.commit`; what the broker has not accepted stays committable and goes again)."""
        owned = self.rebalance.owned()
        # never for a partition revoked meanwhile: a commit is not checked for ownership and could
        # move the new owner's committed offset past work it has not finished
        offsets = {p: o for p, o in self.tracker.committable().items() if p in owned}
        if not offsets:
            return
        try:
            if ports.transactions is not None:
                accepted = ports.transactions.commit()
                if not accepted:   # nothing was committed: the unit is still publishing
                    return
            else:
                accepted = ports.source.commit(offsets, wait=wait)
        except KafkaPermanent as exc:   # a refusal the sink stopped on is the cause (the commit only waited on it)
            self._failure = self._failure or ports.sink.failure or exc
            return
        except (BrokerUnavailable, KafkaTransient) as exc:
            # exactly once, a unit redone and failing alike each time (an ACL librdkafka reports as a purge of
            # the transaction's records) ends here
            self._failure = self._failure or self._past_the_limit(self._commits, exc)
            return
        self._commits.ok()
        self.tracker.committed(accepted)
        ends = ports.source.end_offsets()
        for (topic, partition), offset in self.tracker.committed_offsets().items():
            if (topic, partition) in ends and (topic, partition) in owned:
                self.metrics.lag.labels(topic, str(partition)).set(max(0, ends[(topic, partition)] - offset))

    # ---- the loop ----
    def run(self, count: int | None = None, timeout: float | None = None) -> RunStats:
        """Consume until stopped, or until ``count`` messages are finished, or ``timeout`` s pass.

        Everything the run holds (the health server, the model, the ports, the processor) is closed
        through one exit stack, in reverse, whatever fails: first the drain (stop fetching, finish
        in-flight batches, publish, commit), then the transactions, the source, the sink, the model
        and the health server. Raises :class:`KafkaPermanent` (after draining) when consuming can never
        succeed.
        """
        started = time.monotonic()
        stats = RunStats()
        try:
            with ExitStack() as closes:
                closes.callback(self._said_stopped)
                if self.health is not None:
                    closes.callback(self.health.close)
                closes.callback(self._release_model)
                try:
                    ports = self._connect(closes)
                    if ports is not None:
                        self._run(ports, closes, stats, count, None if timeout is None else started + timeout)
                finally:
                    self._begin_closing()   # before the stack unwinds: the drain starts at once
        except Exception:
            if self._failure is None:
                raise
            # the failure that ended the run is what the caller must hear (one line, its exit code);
            # what went wrong after it is said here
            log.exception("closing after %s failed too", self._failure)
        stats.finished = self.finished()
        stats.seconds = time.monotonic() - started
        if self._failure is not None:
            raise self._failure
        return stats

    def _run(self, ports: Ports, closes: ExitStack, stats: RunStats, count: int | None,
             deadline: float | None) -> None:
        decoders = self.pipeline.decode_workers
        log.info("decoding on %d thread%s%s", decoders, "s" * (decoders != 1),
                 "" if self.cfg.decode_workers else " (auto)")
        processor = Processor(self.backend, self.codec, self.encoder, ports.sink, self.tracker, self.metrics,
                              self.model_info, self.pipeline, self.decoder)
        self._inference_done = False
        processor.start()
        closes.callback(self._finish, ports)               # third: flush and commit
        closes.callback(self._stop_processor, processor)   # second: finish what is in flight
        closes.callback(self._stop_fetching, ports)        # first: the deadline starts, fetching stops
        threading.Thread(target=self._watch_broker, args=(ports,), name="broker-probe", daemon=True).start()
        self._loop(ports, processor, stats, count, deadline)

    def _loop(self, ports: Ports, processor: Processor, stats: RunStats, count: int | None,
              deadline: float | None) -> None:
        paused, last_commit, last_report = False, time.monotonic(), time.monotonic()
        while not self._stop.is_set():
            if self.health:
                self.health.tick()
            if count is not None and self.finished() >= count and self.tracker.in_flight() == 0:
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            paused = self._backpressure(ports, paused, processor)
            if paused:   # nothing to fetch: wait for the resume mark rather than poll (an empty poll costs ~1 ms)
                if self.tracker.in_flight() > self._resume_at:
                    self.tracker.wait_at_most(self._resume_at, PAUSED_POLL_S)
                else:
                    processor.wait_bytes_at_most(self.cfg.max_in_flight_bytes // 2, PAUSED_POLL_S)
                paused = self._backpressure(ports, paused, processor)
            if self._stuck():
                return
            messages = self._poll(ports, 0.0 if paused else 0.1)
            # the first cause wins: a poll's, the sink's or a rebalance step's
            self._failure = self._failure or ports.sink.failure or self.rebalance.failure
            if self._failure is not None:
                return
            owned = self.rebalance.owned() if messages else set()
            owned -= self._redo(ports)
            kept = [m for m in messages if (m.topic, m.partition) in owned]   # others: revoked since the poll
            for message in kept:
                processor.submit(message)
            stats.consumed += len(kept)
            if time.monotonic() - last_commit >= self.cfg.commit_interval_ms / 1000:
                self._commit(ports, wait=False)
                last_commit = time.monotonic()
                self._update_readiness(ports)
            if time.monotonic() - last_report >= self.dead_letter_report_s:
                processor.report_dead_letters()
                last_report = time.monotonic()

    def _stuck(self) -> bool:
        """Work queued and nothing finished for --stall-timeout-s while Kafka answers: fail /healthz and
        end the run (the group then moves this member's partitions)."""
        if not self.readiness.reachable:
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

    def _redo(self, ports: Ports) -> set[Partition]:
        """Exactly once: partitions rewound after a revocation aborted their unit (their records from
        this poll are stale); a rewind that fails ends the member."""
        try:
            return ports.transactions.redo() if ports.transactions is not None else set()
        except KafkaPermanent as exc:
            self._failure = self._failure or exc
            return self.rebalance.owned()   # nothing more is handed out

    @property
    def _resume_at(self) -> int:
        """In flight at or below this, paused partitions resume."""
        return self.cfg.max_in_flight // 2

    def _backpressure(self, ports: Ports, paused: bool, processor: Processor) -> bool:
        """Pause every partition while too much is in flight (messages or bytes); resume at half of
        both. Returns the new state."""
        in_flight, in_bytes = self.tracker.in_flight(), processor.in_flight_bytes()
        if not paused and (in_flight >= self.cfg.max_in_flight or in_bytes >= self.cfg.max_in_flight_bytes):
            ports.source.pause_all()
            return True
        if paused and in_flight <= self._resume_at and in_bytes <= self.cfg.max_in_flight_bytes // 2:
            ports.source.resume_all()
            return False
        return paused

    def _past_the_limit(self, watch: FailureWatch, exc: BrokerUnavailable | KafkaTransient) -> KafkaPermanent | None:
        """Record a retried failure of ``watch``'s call; the failure that ends the run once errors other
        than an outage have lasted past --fail-after-s, else None."""
        failing_for = watch.failed(exc, outage=isinstance(exc, BrokerUnavailable))
        if failing_for <= self.cfg.fail_after_s:
            return None
        return KafkaPermanent(f"{exc} ({watch.what} failing for {failing_for:.0f} s, past --fail-after-s "
                              f"{self.cfg.fail_after_s:g}); exiting so a restart makes a new client")

    def _poll(self, ports: Ports, timeout: float) -> list[Any]:
        """One poll; errors are classified: outages and transient ones retried, permanent ones end the run."""
        try:
            messages = ports.source.poll(timeout, self.cfg.max_poll_records)
        except KafkaPermanent as exc:
            self._failure = exc
            return []
        except (BrokerUnavailable, KafkaTransient) as exc:
            past = self._past_the_limit(self._polls, exc)
            self.metrics.poll_errors.labels("outage" if isinstance(exc, BrokerUnavailable) else "transient").inc()
            self._update_readiness(ports)
            if past is not None:
                self._failure = past
                return []
            self._stop.wait(self._polls.backoff())
            return []
        if self._polls.failing:
            self._polls.ok()
            self._update_readiness(ports)
        return messages

    # ---- closing: the steps the run's exit stack takes, in this order ----
    def _begin_closing(self) -> None:
        self.closing.set()
        self.readiness.shut_down()
        self._stop.set()   # ends the broker probe too

    def _left(self) -> float:
        return max(0.0, self._drain_deadline - time.monotonic())

    def _stop_fetching(self, ports: Ports) -> None:
        """The drain's one deadline starts; a sink that failed for good never acknowledges what it
        holds, so then it is not waited for."""
        self._drain_budget = 1.0 if ports.sink.failure is not None else self.cfg.drain_timeout_s
        self._drain_deadline = time.monotonic() + self._drain_budget
        ports.source.pause_all()

    def _stop_processor(self, processor: Processor) -> None:
        """Finish in-flight batches (and publish them) within the deadline."""
        self._inference_done = processor.stop(self._left())
        processor.report_dead_letters()
        if not self.tracker.wait_idle(self._left()):
            log.warning("%d messages unacknowledged after %.0f s: left uncommitted (they will be redelivered)",
                        self.tracker.in_flight(), self._drain_budget)

    def _finish(self, ports: Ports) -> None:
        """Flush what is published and commit what is acknowledged."""
        ports.sink.flush(self._left())
        if ports.transactions is not None:
            ports.transactions.drain_timeout_s = self._left()
        self._commit(ports, wait=True)

    def _settle(self) -> None:
        """After the last commit (and the transactions' close), before the source closes."""
        self._leftover = self.uncommitted() if self.tracker.committable() or self.tracker.in_flight() else None
        self.rebalance.drain_timeout_s = 0.0   # drained above: closing revokes without waiting again

    def _release_model(self) -> None:
        if self._inference_done:
            self.backend.close()
        else:   # a runtime may not be closed under a running inference call; the process ends anyway
            log.warning("an inference call outlasted the drain; the model is left to the process exit")

    def _said_stopped(self) -> None:
        if self._leftover:
            log.warning("stopped: %d messages finished; left for redelivery: %s", self.finished(), self._leftover)
        else:
            log.info("stopped: %d messages finished, offsets committed", self.finished())
