"""The kafka-python connector: the source (a consumer-group member), the output topics, and what
makes them and the sink (:mod:`.kafka_sink`).

The service's kafka-python clients are made here and in :mod:`.kafka_sink` (:mod:`.errors` classifies
their exceptions; :mod:`.topics`, the demo and the embedded broker use its admin client on their own).
Client errors leave this module as the project's own, through :func:`.errors.kafka_errors`:
:class:`BrokerUnavailable` (an outage), :class:`KafkaTransient` (retry) or :class:`KafkaPermanent`
(never succeeds).

kafka-python 3 runs rebalance listeners on its IO thread, where a blocking client call
is refused; the source's listener is therefore asynchronous: it awaits the drain and
the offset commit on the client's own event loop, so heartbeats go on meanwhile.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine_build.errors import ConfigError

from .errors import KafkaPermanent, kafka_errors
from .kafka_common import (
    CLIENT_TIMEOUT_MS,
    CLIENT_TIMEOUT_S,
    DRAIN_STEP_S,
    TRANSACTION_CALLS_S,
    connecting,
    fetch_bytes,
    isolation_level,
    kafka_offsets,
    output_topics_line,
    reachable,
)
from .kafka_sink import KafkaSink
from .ports import Partition, RebalanceHandler, show
from .records import Message

if TYPE_CHECKING:
    from .config import StreamConfig

log = logging.getLogger(__name__)


def _refuse_topic_creation(consumer: Any) -> bool:
    """Make the consumer's metadata requests say ``allow_auto_topic_creation=False``.

    kafka-python 3.0.12 drops the consumer's ``allow_auto_create_topics=False``: its cluster
    metadata is made without it and keeps the default, True, so the request for a subscribed
    topic's metadata asks the broker to create it (tansu does, as does a Kafka broker with
    ``auto.create.topics.enable``) and a typo'd input topic came into being. False when this
    client keeps the setting elsewhere."""
    config = getattr(getattr(getattr(consumer, "_manager", None), "cluster", None), "config", None)
    if not isinstance(config, dict) or "allow_auto_create_topics" not in config:
        return False
    config["allow_auto_create_topics"] = False
    return True


def _tp_list(partitions: Any) -> list[Partition]:
    return sorted((tp.topic, tp.partition) for tp in partitions)


class KafkaSource:
    """A consumer-group member; all calls but the rebalance listener's come from the poll thread."""

    def __init__(self, cfg: StreamConfig, rebalance: RebalanceHandler) -> None:
        from kafka import AsyncConsumerRebalanceListener, KafkaConsumer

        self._bootstrap, self._group, self._reset = cfg.bootstrap_servers, cfg.group_id, cfg.auto_offset_reset
        self._topics = list(cfg.input_topic)
        source = self

        class Listener(AsyncConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await source._revoke(_tp_list(revoked))

            async def on_partitions_lost(self, lost: Any) -> None:
                await source._lose(_tp_list(lost))

            async def on_partitions_assigned(self, assigned: Any) -> None:
                source._joined_at = time.monotonic()
                rebalance.assigned(_tp_list(assigned))

        self._rebalance = rebalance
        self._session_s = cfg.session_timeout_ms / 1000
        self._joined_at = time.monotonic()   # the last join completed (the listener's assignment)
        with connecting(cfg.bootstrap_servers, cfg.group_id):
            self._consumer = KafkaConsumer(
                bootstrap_servers=cfg.bootstrap_servers, group_id=cfg.group_id, enable_auto_commit=False,
                auto_offset_reset=cfg.auto_offset_reset, max_poll_records=cfg.max_poll_records,
                fetch_max_wait_ms=cfg.fetch_max_wait_ms,
                fetch_max_bytes=fetch_bytes(cfg.max_in_flight_bytes),
                session_timeout_ms=cfg.session_timeout_ms,
                heartbeat_interval_ms=max(100, cfg.session_timeout_ms // 4),
                max_poll_interval_ms=cfg.max_poll_interval_ms, bootstrap_timeout_ms=5_000,
                isolation_level=isolation_level(cfg.processing_guarantee),
                client_id=f"sentiment-stream-{cfg.group_id}", allow_auto_create_topics=False,
                **cfg.client_options())
            if not _refuse_topic_creation(self._consumer):
                self._consumer.close(autocommit=False)
                raise ConfigError("this kafka-python cannot be kept from creating the input topics; "
                                  "install kafka-python>=3.0.12,<3.1")
        # The listener waits on the client's own event loop; kafka-python 3 offers no public sleep.
        sleep = getattr(getattr(self._consumer, "_net", None), "sleep", None)
        if sleep is None:
            self._consumer.close(autocommit=False)
            raise ConfigError("this kafka-python has no event-loop sleep for the rebalance listener; "
                              "install kafka-python>=3.0.12,<3.1")
        self._loop_sleep: Callable[[float], Any] = sleep
        self._listener, self._subscribed, self._next_look = Listener(), False, 0.0

    def _joined(self) -> bool:
        """Join the group once every input topic exists (looked for at most once a second); True once joined.

        Until then the client names no input topic, so nothing can create one. Joining first and
        waiting for a topic to appear is not enough on tansu: when the group's only member rejoins
        after a subscribed topic appears, it keeps the group's generation and hands back the old,
        empty assignment, so a topic created after the join was never consumed."""
        if self._subscribed:
            return True
        if time.monotonic() < self._next_look:
            return False
        self._next_look = time.monotonic() + 1.0
        from kafka.errors import KafkaError
        try:
            existing = self._consumer.topics()
        except KafkaError:
            return False   # unknown while the broker is away: look again
        missing = [t for t in self._topics if t not in existing]
        if missing:
            log.debug("not joining group %s yet: input topic %s missing", self._group, ", ".join(missing))
            return False
        self._consumer.subscribe(topics=self._topics, listener=self._listener)
        self._subscribed = True
        return True

    async def _revoke(self, partitions: list[Partition]) -> None:
        """Drain the revoked partitions' work (up to the drain timeout), commit it, release them."""
        if not partitions:
            return
        from kafka.errors import KafkaError
        handler = self._rebalance
        deadline = time.monotonic() + handler.drain_timeout_s
        while not handler.drained(partitions) and time.monotonic() < deadline:
            await self._loop_sleep(DRAIN_STEP_S)
        drained = handler.drained(partitions)
        transactions = handler.transactions
        offsets = {} if transactions is not None else handler.committable(partitions)
        if transactions is not None:   # exactly-once: commit or abort the open transaction, off this loop
            result: dict = {}

            def end() -> None:
                result.update(transactions.end_for_revocation(drained))
            failure = await self._off_loop(end, "revoke-transaction")
            handler.committed(result)
            if failure is not None:   # fenced, or undrained: the service ends this member
                handler.fail(failure)
        if offsets:   # awaited for at most the client timeout: a coordinator that never answers ends no wait
            try:
                future = self._consumer.commit_async(kafka_offsets(offsets))
                limit = time.monotonic() + CLIENT_TIMEOUT_S
                while not future.is_done and time.monotonic() < limit:
                    await self._loop_sleep(DRAIN_STEP_S)
                failed = future.exception if future.is_done else f"no answer within {CLIENT_TIMEOUT_MS // 1000} s"
            except KafkaError as exc:
                failed = exc
            if failed is None:
                handler.committed(offsets)
            else:
                log.warning("revoked %s: commit failed (%s); their unacknowledged work will be redelivered",
                            show(partitions), failed)
        if not drained:
            log.warning("revoked %s with work still in flight after %g s: committed only below it (a next "
                        "owner redoes it; kept here, it holds commits back until acknowledged)", show(partitions),
                        handler.drain_timeout_s)
        handler.released(partitions, lost=False)

    async def _lose(self, partitions: list[Partition]) -> None:
        """Evicted: exactly once, abort the open transaction (off this loop) before the partitions go."""
        handler = self._rebalance
        transactions = handler.transactions
        if transactions is not None and partitions:
            lost: list[KafkaPermanent] = []
            failure = await self._off_loop(lambda: lost.append(transactions.lost(partitions)), "lose-transaction")
            handler.fail(failure or lost[0])
        handler.released(partitions, lost=True)

    async def _off_loop(self, call: Callable[[], None], name: str) -> KafkaPermanent | None:
        """Run a blocking transaction step on its own thread while this loop goes on (heartbeats);
        the KafkaPermanent it raised, if any. Its wait is bounded: a commit point that holds the
        transaction, then the transaction calls."""
        failures: list[KafkaPermanent] = []

        def run() -> None:
            try:
                call()
            except KafkaPermanent as exc:
                failures.append(exc)
        worker = threading.Thread(target=run, name=name, daemon=True)
        worker.start()
        bound = self._rebalance.drain_timeout_s + 2 * TRANSACTION_CALLS_S + 5
        limit = time.monotonic() + bound
        while worker.is_alive() and time.monotonic() < limit:
            await self._loop_sleep(DRAIN_STEP_S)
        if worker.is_alive():
            return KafkaPermanent(f"{name}: the transaction step did not finish within {bound:g} s; exiting so a "
                                  f"restart makes new clients")
        return failures[0] if failures else None

    def in_group(self) -> bool:
        """False once the generation was reset, or when neither a heartbeat was answered nor a join
        completed for three quarters of the session timeout: the coordinator may have evicted this
        member (a freeze, a starved IO thread). Not kafka-python's own session clock: finding the
        coordinator again restarts it, before the heartbeat that learns of the eviction."""
        metadata = self._consumer.group_metadata()
        if metadata.generation_id < 0 or not metadata.member_id:
            return False
        heartbeat = getattr(getattr(self._consumer, "_coordinator", None), "heartbeat", None)   # no public clock
        if heartbeat is None:
            return True
        answered = max(heartbeat.last_receive, self._joined_at)
        return time.monotonic() - answered < self._session_s * 3 / 4

    def _failing_partition(self) -> str:
        """The partition whose records the client was parsing when it raised (best effort)."""
        records = getattr(getattr(self._consumer, "_fetcher", None), "_next_partition_records", None)
        tp = getattr(records, "topic_partition", None)
        if tp is not None:   # and the offset it had come to: the record it could not parse, where it raised on one
            at = getattr(records, "next_fetch_offset", None)
            return f"{tp.topic}[{tp.partition}]" + (f" at offset {at}" if isinstance(at, int) else "")
        return f"one of {show(_tp_list(self._consumer.assignment()))}"

    def poll(self, timeout_s: float, max_records: int) -> list[Message]:
        # kafka-python raises its own errors and, from listeners, anything
        with kafka_errors(lambda: f"consuming {self._failing_partition()}", self._group, also=(Exception,)):
            if not self._joined():
                time.sleep(timeout_s)
                return []
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        now = time.monotonic()
        return [Message(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or []), r.timestamp, now)
                for records in batches.values() for r in records]

    def commit(self, offsets: dict[Partition, int], *, wait: bool) -> dict[Partition, int]:   # always waits
        with kafka_errors("commit failed", self._group):
            self._consumer.commit(kafka_offsets(offsets), timeout_ms=CLIENT_TIMEOUT_MS)
        return offsets

    def group_metadata(self) -> Any:
        return self._consumer.group_metadata()

    def rewind(self, partitions: list[Partition]) -> None:
        """Seek to the last committed offsets (or where a new group starts) to redo aborted work."""
        from kafka import TopicPartition
        owned = set(self._consumer.assignment())
        for topic, index in partitions:
            tp = TopicPartition(topic, index)
            if tp not in owned:
                continue
            with kafka_errors("rewinding after an aborted transaction", self._group):
                offset = self._consumer.committed(tp, timeout_ms=CLIENT_TIMEOUT_MS)
            if offset is not None:
                self._consumer.seek(tp, offset)
            elif self._reset == "earliest":
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek_to_end(tp)

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

    def reachable(self) -> bool:
        return reachable(self._bootstrap)

    def missing_topics(self) -> list[str] | None:
        """Subscribed input topics the cluster does not have, from a listing of every topic (a request
        that names no topic, so no broker creates one for it); None when the listing failed."""
        from kafka.errors import KafkaError
        try:
            existing = self._consumer.topics()
        except KafkaError as exc:   # a timeout, or an ACL refusing the listing while TCP still connects
            log.debug("listing the topics: %s", exc)
            return None   # did not look: not "every input topic exists"
        return [t for t in self._topics if t not in existing]

    def close(self) -> None:
        self._consumer.close(autocommit=False, timeout_ms=CLIENT_TIMEOUT_MS)


def ensure_output_topics(cfg: StreamConfig) -> str:
    """Create the output and dead-letter topics if missing (as many partitions as the first input
    topic, the broker's default replication); one line saying which existed and which were made."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError
    with connecting(cfg.bootstrap_servers):
        admin = KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers, client_id="sentiment-stream-admin",
                                 bootstrap_timeout_ms=5_000, **cfg.client_options())
    try:
        with kafka_errors("checking the output topics", also=(ValueError,)):
            existing = set(admin.list_topics())
            wanted = {"output": cfg.output_topic, "dead-letter": cfg.dead_letter_topic}
            missing = [t for t in dict.fromkeys(wanted.values()) if t not in existing]
            partitions = 1
            if cfg.input_topic[0] in existing:
                (described,) = admin.describe_topics([cfg.input_topic[0]])
                partitions = max(1, len(described.get("partitions", ())))
            if missing:
                try:
                    admin.create_topics([NewTopic(t, partitions, -1) for t in missing])
                except TopicAlreadyExistsError:
                    pass   # another member made it first
                except KafkaError as exc:
                    raise KafkaPermanent(f"{', '.join(missing)}: missing and cannot be created ({exc}); create "
                                         f"them (README: Topics) or grant CREATE") from exc
    finally:
        admin.close()
    return output_topics_line(wanted, missing, partitions)


class KafkaConnector:
    """Makes the Kafka source and sink from the service config."""

    def __init__(self, cfg: StreamConfig) -> None:
        from kafka import codec
        has = {"gzip": codec.has_gzip, "snappy": codec.has_snappy, "lz4": codec.has_lz4, "zstd": codec.has_zstd}
        library = {"snappy": "python-snappy", "zstd": "zstandard"}.get(cfg.compression_type, cfg.compression_type)
        if cfg.compression_type in has and not has[cfg.compression_type]():
            raise ConfigError(f"--compression-type {cfg.compression_type}: its library is missing "
                              f"(pip install {library})")
        self.cfg = cfg

    def source(self, rebalance: RebalanceHandler) -> KafkaSource:
        return KafkaSource(self.cfg, rebalance)

    def sink(self, on_retry: Callable[[], None]) -> KafkaSink:
        cfg = self.cfg
        log.info("%s", ensure_output_topics(cfg))
        # Room for a dead letter carrying the largest accepted input, plus headers.
        transactional_id = None
        if cfg.processing_guarantee == "exactly-once":
            transactional_id = cfg.transactional_id or f"sentiment-stream-{cfg.group_id}-{uuid.uuid4().hex[:12]}"
        return KafkaSink(cfg.bootstrap_servers, cfg.client_options(), on_retry, linger_ms=cfg.linger_ms,
                         max_request_size=max(1 << 20, cfg.max_message_bytes + (64 << 10)),
                         compression_type=None if cfg.compression_type == "none" else cfg.compression_type,
                         transactional_id=transactional_id, transaction_timeout_ms=cfg.transaction_timeout_ms())
