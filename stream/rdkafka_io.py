"""The Kafka client, librdkafka's way (confluent-kafka): the source and the connector, as :mod:`.kafka_io` is
kafka-python's; the sink is :mod:`.rdkafka_sink`.

Chosen with ``--kafka-client librdkafka``; nothing else imports confluent-kafka (but the sink, and
:mod:`.errors`, which classifies its errors). librdkafka's errors leave this module as the project's own, classified
in one table (:data:`.errors.LIBRDKAFKA`) and raised through :func:`.errors.kafka_errors`:
:class:`BrokerUnavailable` (an outage), :class:`KafkaTransient` (retry), :class:`KafkaPermanent`
(never succeeds), and for a record the broker refuses for good, the sink's ``on_refused``.

librdkafka calls the rebalance callbacks from ``consume()`` on the poll thread, so the drain on
revocation may block there (up to the drain timeout; heartbeats run on librdkafka's own threads).
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine_build.errors import ConfigError

from .errors import (
    KafkaPermanent,
    kafka_errors,
    librdkafka_error,
    librdkafka_name,
)
from .kafka_common import (
    CLIENT_TIMEOUT_S,
    DRAIN_STEP_S,
    connecting,
    fetch_bytes,
    isolation_level,
    output_topics_line,
    reachable,
)
from .ports import Partition, RebalanceHandler, show
from .rdkafka_common import QUIET, client_settings, topic_partitions
from .rdkafka_sink import RdKafkaSink
from .records import Message

if TYPE_CHECKING:
    from .config import StreamConfig

log = logging.getLogger(__name__)

def _tp_list(partitions: Any) -> list[Partition]:
    return sorted((tp.topic, tp.partition) for tp in partitions)


# Backpressure holds records in librdkafka's queue this long before pausing the partitions (which drops
# them): a hold usually ends within a second, and a rebalance waits for this member at most this long.
HOLD_BEFORE_PAUSE_S = 2.0
# Once its prefetch queue is full librdkafka puts off a partition's next fetch by fetch.queue.backoff.ms, 1 s
# by default. Every hold fills that queue, so after each one the pipeline ran dry for up to a second: one
# process fed a GPU stand-in a quarter slower (docs/performance.md, the tenth run). A full queue is looked at
# again this often instead (not the fetch wait: an operator who raises that to cut empty fetches would
# bring the starvation back; not 0: a held consumer would spin).
FULL_QUEUE_RECHECK_MS = 10


def _headers(message: Any) -> tuple[list[tuple[str, bytes | None]], str | None]:
    """A consumed record's headers, and why they could not be read (then none): confluent-kafka decodes each key
    as UTF-8, as Kafka's protocol says it is, and a producer that ignored that makes ``headers()`` raise
    (a SystemError from a UnicodeDecodeError) for the whole record."""
    try:
        return list(message.headers() or []), None
    except (SystemError, UnicodeDecodeError) as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        return [], f"its headers cannot be read: a header key is not UTF-8 ({cause})"


def consumer_settings(cfg: StreamConfig) -> dict[str, Any]:
    """librdkafka's consumer configuration for the service config."""
    return {
        "bootstrap.servers": cfg.bootstrap_servers, "group.id": cfg.group_id,
        "client.id": f"sentiment-stream-{cfg.group_id}",
        "enable.auto.commit": False, "enable.auto.offset.store": False,
        "auto.offset.reset": cfg.auto_offset_reset, "fetch.wait.max.ms": cfg.fetch_max_wait_ms,
        # what librdkafka prefetches while backpressure holds the loop (64 MB by default), and one fetch (50 MB): a
        # sixteenth of the byte budget each, as kafka-python's fetch. A fetch that finds the queue below its limit
        # may still add a record per partition past it (the first record of a partition always comes whole).
        "queued.max.messages.kbytes": fetch_bytes(cfg.max_in_flight_bytes) // 1024,
        "fetch.max.bytes": fetch_bytes(cfg.max_in_flight_bytes),
        "fetch.queue.backoff.ms": FULL_QUEUE_RECHECK_MS,
        "session.timeout.ms": cfg.session_timeout_ms,
        "heartbeat.interval.ms": max(100, cfg.session_timeout_ms // 4),
        "max.poll.interval.ms": cfg.max_poll_interval_ms,
        "isolation.level": isolation_level(cfg.processing_guarantee),
        "allow.auto.create.topics": False, "partition.assignment.strategy": cfg.assignment_strategy,
        **QUIET, **client_settings(cfg)}


class RdKafkaSource:
    """A consumer-group member; every call, the rebalance callbacks included, comes from the poll thread."""

    def __init__(self, cfg: StreamConfig, rebalance: RebalanceHandler) -> None:
        from confluent_kafka import Consumer
        from confluent_kafka.admin import AdminClient
        self._bootstrap, self._group, self._reset = cfg.bootstrap_servers, cfg.group_id, cfg.auto_offset_reset
        self._topics = list(cfg.input_topic)
        self._rebalance = rebalance
        self._cooperative = cfg.assignment_strategy == "cooperative-sticky"
        self._commit_error: BaseException | None = None   # answered to a commit sent without waiting
        self._commit_out = False   # a commit sent without waiting is not answered yet
        settings = {**consumer_settings(cfg), "on_commit": self._answered}
        with connecting(cfg.bootstrap_servers, cfg.group_id):
            # a second client for the probe thread: the consumer's own list_topics waits while consume() runs
            self._admin = AdminClient({"bootstrap.servers": cfg.bootstrap_servers, **QUIET, **client_settings(cfg)})
            self._consumer = Consumer(settings)
            self._consumer.subscribe(self._topics, on_assign=self._assign, on_revoke=self._revoke,
                                     on_lost=self._lose)
        self._paused = False          # the partitions are paused in librdkafka
        self._held_since: float | None = None   # backpressure: since when no records are taken
        self._lost = False   # librdkafka reported the partitions lost: evicted (exactly once, fenced for good)

    # ---- rebalance callbacks (from consume(), on the poll thread) ----
    def _assign(self, consumer: Any, partitions: Any) -> None:
        self._rebalance.assigned(_tp_list(partitions))
        if self._cooperative:   # the partitions added to those kept
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if self._paused and partitions:   # backpressure holds for partitions that arrive while paused
            consumer.pause(partitions)
        elif partitions:   # librdkafka keeps a partition's pause through a revocation and a later assignment:
            # one paused before an eager rebalance, resumed while the assignment was empty, came back paused
            consumer.resume(partitions)

    def _revoke(self, consumer: Any, partitions: Any) -> None:
        """Drain the revoked partitions' work (up to the drain timeout), commit it, release them."""
        revoked = _tp_list(partitions)
        if not revoked:
            return
        handler = self._rebalance
        transactions = handler.transactions
        # exactly once the open transaction holds every partition's work: a cooperative revocation keeps some,
        # and their results must not commit before their offsets can
        waited = revoked if transactions is None else sorted(set(revoked) | set(_tp_list(consumer.assignment())))
        deadline = time.monotonic() + handler.drain_timeout_s
        while not handler.drained(waited) and time.monotonic() < deadline:
            time.sleep(DRAIN_STEP_S)   # librdkafka heartbeats on its own thread meanwhile
        drained = handler.drained(waited)
        if transactions is not None:   # exactly-once: commit or abort the open transaction (bounded calls)
            try:
                handler.committed(transactions.end_for_revocation(drained))
            except KafkaPermanent as failure:   # fenced, or undrained: the service ends this member
                handler.fail(failure)
            handler.released(revoked, lost=False)
            return
        offsets = handler.committable(revoked)   # what the broker has not accepted yet, sent or not
        if offsets:
            try:
                consumer.commit(offsets=topic_partitions(offsets), asynchronous=False)
                handler.committed(offsets)
            except Exception as exc:   # a KafkaException: a revocation never raises into consume()
                log.warning("revoked %s: commit failed (%s); their unacknowledged work will be redelivered",
                            show(revoked), exc)
        if not drained:
            log.warning("revoked %s with work still in flight after %.0f s: left uncommitted (it will be "
                        "redelivered)", show(revoked), handler.drain_timeout_s)
        handler.released(revoked, lost=False)

    def _lose(self, consumer: Any, partitions: Any) -> None:
        """Evicted: the partitions already belong to another member; nothing of theirs may be committed
        (exactly once, the open transaction is aborted first and the member ends)."""
        lost = _tp_list(partitions)
        self._lost = True
        transactions = self._rebalance.transactions
        if transactions is not None and lost:
            self._rebalance.fail(transactions.lost(lost))
        self._rebalance.released(lost, lost=True)

    # ---- exactly once (stream.transactions.RewindableSource) ----
    def group_metadata(self) -> Any:
        return self._consumer.consumer_group_metadata()

    def in_group(self) -> bool:
        """False once librdkafka reported the partitions lost (it does when the session expires or the
        coordinator says the member is unknown) or while it has no member id."""
        return not self._lost and bool(self._consumer.memberid())

    def rewind(self, partitions: list[Partition]) -> None:
        """Seek to the last committed offsets (or where a new group starts) to redo aborted work."""
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition
        owned = set(self.assigned())
        wanted = [TopicPartition(t, p) for t, p in partitions if (t, p) in owned]
        if not wanted:
            return
        with kafka_errors("rewinding after an aborted transaction", self._group):
            for tp in self._consumer.committed(wanted, timeout=CLIENT_TIMEOUT_S):
                start = OFFSET_BEGINNING if self._reset == "earliest" else OFFSET_END
                self._consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else start))

    # ---- the Source port ----
    def poll(self, timeout_s: float, max_records: int) -> list[Message]:
        from confluent_kafka import KafkaError, KafkaException
        if self._holding():   # rebalance events wait for the hold's end, at most HOLD_BEFORE_PAUSE_S
            return []
        # a KafkaException, or anything a rebalance callback raised
        with kafka_errors("consuming", self._group, also=(Exception,)):
            # consume(n, timeout) waits out its whole timeout unless n records come: at a low rate every
            # poll cost its timeout (0.1 s) in latency. Wait for the first record, then take what is there.
            first = self._consumer.poll(timeout_s)
            batch = [] if first is None else [first]
            if first is not None and max_records > 1:
                batch += self._consumer.consume(num_messages=max_records - 1, timeout=0)
        now = time.monotonic()
        out, errors = [], []
        for m in batch:
            error = m.error()
            if error is None:
                message: Any = m   # confluent-kafka's stubs allow None where a consumed record has a value
                headers, unreadable = _headers(message)
                out.append(Message(message.topic(), message.partition(), message.offset(), message.key(),
                                   message.value(), headers, message.timestamp()[1], now, unreadable))
            elif error.code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART,
                                      KafkaError._UNKNOWN_TOPIC):   # a missing topic: missing_topics says so
                errors.append(error)
        if errors and not out:   # records already taken are handed on; the error comes again if it lasts
            with kafka_errors(f"consuming from {show(self.assigned())}", self._group):
                raise KafkaException(errors[0])
        return out

    def assigned(self) -> list[Partition]:
        return _tp_list(self._consumer.assignment())

    def commit(self, offsets: dict[Partition, int], *, wait: bool) -> dict[Partition, int]:
        """With cooperative rebalancing and without ``wait``, the commit is sent and librdkafka's answer
        comes later, from :meth:`poll` (:meth:`_answered`): a synchronous commit made while the member's
        rejoin is pending waits behind the rejoin, on this thread, which is the one that would serve it,
        and the partitions the member keeps would stop meanwhile (docs/kafka-client.md, "Cooperative
        rebalancing"; under eager rebalancing every partition stops anyway, so the commit waits). An error
        it answers is raised here, at the next commit. One such commit is out at a time, and the last one
        waits for it: librdkafka retries a refused commit on its own, so two could land out of order and
        move the group's offset back."""
        earlier, self._commit_error = self._commit_error, None
        with kafka_errors("commit failed", self._group):
            if wait or not self._cooperative:
                self._answer_the_commit_out()
                self._consumer.commit(offsets=topic_partitions(offsets), asynchronous=False)
                return offsets
            if earlier is not None:
                raise earlier
            if not self._commit_out:   # else these offsets stay committable: the next commit carries them
                self._consumer.commit(offsets=topic_partitions(offsets), asynchronous=True)
                self._commit_out = True
        return {}

    def _answer_the_commit_out(self) -> None:
        """Before the last commit: wait (bounded) for the answer to the one still out. Its records are not
        wanted now, so the partitions are paused first (librdkafka then drops what it prefetched)."""
        if not self._commit_out:
            return
        self._pause()
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while self._commit_out and time.monotonic() < deadline:
            self._consumer.poll(0.05)   # serves the answer; a record it might still return is redelivered later

    def _answered(self, error: Any, partitions: Any) -> None:
        """librdkafka's answer to a commit sent without waiting: what it accepted is committed for the
        service (the rest stays committable and goes again); an error for partitions this member still
        holds is kept for the next commit to raise."""
        from confluent_kafka import KafkaException
        self._commit_out = False
        failed = error or next((tp.error for tp in partitions if tp.error is not None), None)
        accepted = {(tp.topic, tp.partition): tp.offset for tp in partitions if error is None and tp.error is None}
        if accepted:
            self._rebalance.committed(accepted)
        if failed is not None and {(tp.topic, tp.partition) for tp in partitions} & set(self.assigned()):
            log.debug("a commit failed (%s); its offsets go again with the next", failed)
            self._commit_error = KafkaException(failed)

    def pause_all(self) -> None:
        """Take no more records. librdkafka drops a paused partition's prefetched records and fetches them
        again after the resume, which halved one process's rate under backpressure's short cycles; so
        records are first only left in its (bounded) queue, and the partitions paused once a hold lasts
        :data:`HOLD_BEFORE_PAUSE_S` (a poll must then serve rebalance events without taking records)."""
        if self._held_since is None:
            self._held_since = time.monotonic()

    def resume_all(self) -> None:
        self._held_since = None
        if self._paused:
            self._paused = False
            self._consumer.resume(self._consumer.assignment())

    def _holding(self) -> bool:
        """True while a short hold lasts (poll takes nothing and calls nothing); past it, pause for real."""
        if self._held_since is None or self._paused:
            return False
        if time.monotonic() - self._held_since < HOLD_BEFORE_PAUSE_S:
            return True
        self._pause()
        return False

    def _pause(self) -> None:
        self._paused = True
        self._consumer.pause(self._consumer.assignment())

    def end_offsets(self) -> dict[Partition, int]:
        """Last known log-end offsets (librdkafka's cache from fetch responses; no extra request)."""
        out = {}
        for tp in self._consumer.assignment():
            try:
                _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            except Exception:   # KafkaException: not fetched yet
                continue
            if high is not None and high >= 0:
                out[(tp.topic, tp.partition)] = high
        return out

    def reachable(self) -> bool:
        return reachable(self._bootstrap)

    def missing_topics(self) -> list[str] | None:
        """Subscribed input topics the cluster does not have: asked by listing every topic, since
        asking for one topic's metadata makes some brokers (tansu) create it; None when the listing failed."""
        try:
            existing = self._admin.list_topics(timeout=CLIENT_TIMEOUT_S).topics
        except Exception as exc:   # KafkaException: a timeout, or an ACL refusing the listing while TCP connects
            log.debug("listing the topics: %s", exc)
            return None   # did not look: not "every input topic exists"
        return [t for t in self._topics if t not in existing]

    def close(self) -> None:
        try:
            self._consumer.close()
        except Exception as exc:   # already closed, or the broker gone
            log.warning("closing the consumer: %s", exc)


def ensure_output_topics(cfg: StreamConfig) -> str:
    """:func:`.kafka_io.ensure_output_topics` with librdkafka's admin client (kafka-python's cannot talk to
    every broker librdkafka can: librdkafka's mock cluster answers it with ApiVersions it cannot decode)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": cfg.bootstrap_servers, **QUIET, **client_settings(cfg)})
    wanted = {"output": cfg.output_topic, "dead-letter": cfg.dead_letter_topic}
    with connecting(cfg.bootstrap_servers):   # the first request: librdkafka's clients connect lazily
        existing = admin.list_topics(timeout=CLIENT_TIMEOUT_S).topics
    missing = [t for t in dict.fromkeys(wanted.values()) if t not in existing]
    first = existing.get(cfg.input_topic[0])
    partitions = max(1, len(first.partitions)) if first is not None and first.error is None else 1
    for topic, future in (admin.create_topics([NewTopic(t, partitions) for t in missing],
                                              request_timeout=CLIENT_TIMEOUT_S) if missing else {}).items():
        try:
            future.result()
        except KafkaException as exc:
            error = librdkafka_error(exc)
            if error is not None and librdkafka_name(error) == "TOPIC_ALREADY_EXISTS":
                continue   # another member made it first
            raise KafkaPermanent(f"{topic}: missing and cannot be created ({exc}); create it (README: Topics) "
                                 f"or grant CREATE") from exc
    return output_topics_line(wanted, missing, partitions)


class RdKafkaConnector:
    """Makes the librdkafka source and sink from the service config; the source's rebalancing is
    ``cfg.assignment_strategy`` (librdkafka's ``partition.assignment.strategy``)."""

    def __init__(self, cfg: StreamConfig) -> None:
        try:   # its version is in the start-up line (stream.cli.client_version)
            import confluent_kafka  # noqa: F401
        except ImportError as exc:
            raise ConfigError("--kafka-client librdkafka needs confluent-kafka "
                              "(pip install 'sentiment-stream[librdkafka]')") from exc
        self.cfg = cfg

    def source(self, rebalance: RebalanceHandler) -> RdKafkaSource:
        return RdKafkaSource(self.cfg, rebalance)

    def sink(self, on_retry: Callable[[], None]) -> RdKafkaSink:
        cfg = self.cfg
        log.info("%s", ensure_output_topics(cfg))
        transactional_id = None
        if cfg.processing_guarantee == "exactly-once":
            transactional_id = cfg.transactional_id or f"sentiment-stream-{cfg.group_id}-{uuid.uuid4().hex[:12]}"
        # Room for a dead letter carrying the largest accepted input, plus headers.
        return RdKafkaSink(cfg.bootstrap_servers, client_settings(cfg), on_retry, linger_ms=cfg.linger_ms,
                           max_request_size=max(1 << 20, cfg.max_message_bytes + (64 << 10)),
                           compression_type=None if cfg.compression_type == "none" else cfg.compression_type,
                           transactional_id=transactional_id, transaction_timeout_ms=cfg.transaction_timeout_ms())
