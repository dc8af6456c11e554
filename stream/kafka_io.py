"""The Kafka client, wrapped thinly: a source (consumer-group member) and a sink (acks=all producer).

Everything here runs kafka-python; nothing else in the service imports it (but
:mod:`.errors`, which classifies its exceptions). Client errors leave this module as the
project's own, through :func:`.errors.kafka_errors`: :class:`BrokerUnavailable` (an
outage), :class:`KafkaTransient` (retry) or :class:`KafkaPermanent` (never succeeds).

kafka-python 3 runs rebalance listeners on its IO thread, where a blocking client call
is refused; the source's listener is therefore asynchronous: it awaits the drain and
the offset commit on the client's own event loop, so heartbeats go on meanwhile.
"""
from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from engine_build.errors import ConfigError

from .delayed import Delayed
from .errors import (
    OUTAGE,
    REFUSED,
    BrokerUnavailable,
    KafkaPermanent,
    fenced,
    kafka_errors,
    kafka_python_kind,
)
from .failures import FailureWatch, Refusals
from .isolation import Entry, Isolation
from .ports import Partition, RebalanceHandler, Refused, show
from .records import Message, Outgoing
from .transactions import commit_unit

if TYPE_CHECKING:
    from .config import StreamConfig

log = logging.getLogger(__name__)
_DRAIN_STEP_S = 0.02
_CLIENT_TIMEOUT_MS = 5_000   # commit and close; shutdown must end even with the broker gone
# kafka-python's transaction calls wait on the coordinator without a bound: each commit point's calls
# together, and an abort, get this long (within the share the commit point keeps of the transaction timeout)
TRANSACTION_CALLS_S = 8.0


def reachable(bootstrap: str, timeout: float = 1.0) -> bool:
    """Whether any bootstrap server accepts a TCP connection (a cheap liveness probe)."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            continue
    return False


@contextmanager
def connecting(bootstrap: str, group: str = "") -> Iterator[None]:
    """:func:`.errors.kafka_errors` for making a client. A bootstrap that fails while a broker accepts TCP
    connections stays an outage (a broker starting, or a proxy in front of one, accepts before it serves),
    but says what else it may be: TLS or SASL settings that do not match the listener, wrong credentials,
    a port that is not Kafka's."""
    try:
        with kafka_errors(f"cannot reach Kafka at {bootstrap}", group):
            yield
    except BrokerUnavailable as exc:
        if not reachable(bootstrap):
            raise
        raise BrokerUnavailable(f"{exc}; {bootstrap} accepts connections but the Kafka client cannot start a "
                                f"session there: a broker still starting, or check --security-protocol, the TLS "
                                f"and SASL settings and that the port is a Kafka listener") from exc


def isolation_level(guarantee: str) -> str:
    """What the consumer reads: exactly once, only committed input (an upstream transaction's aborted
    records are not input, and records of an open one wait for its end); at least once, everything."""
    return "read_committed" if guarantee == "exactly-once" else "read_uncommitted"


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


def fetch_bytes(max_in_flight_bytes: int) -> int:
    """The consumer's fetch size for a byte budget: a sixteenth of it, between 1 MiB and kafka-python's
    default of 50 MiB. A record larger than it is still fetched, alone. Small, because a fetched
    response costs several times its size on its way to the pipeline (the response, the parsed batch,
    each record's value), once for each partition fetched at the same time, and a poll may add it on
    top of the budget."""
    return max(1 << 20, min(50 << 20, max_in_flight_bytes // 16))


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
            await self._loop_sleep(_DRAIN_STEP_S)
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
                future = self._consumer.commit_async(self._kafka_offsets(offsets))
                limit = time.monotonic() + _CLIENT_TIMEOUT_MS / 1000
                while not future.is_done and time.monotonic() < limit:
                    await self._loop_sleep(_DRAIN_STEP_S)
                failed = future.exception if future.is_done else f"no answer within {_CLIENT_TIMEOUT_MS // 1000} s"
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
            await self._loop_sleep(_DRAIN_STEP_S)
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

    @staticmethod
    def _kafka_offsets(offsets: dict[Partition, int]) -> dict[Any, Any]:
        from kafka import OffsetAndMetadata, TopicPartition
        extra = ("", -1) if len(OffsetAndMetadata._fields) == 3 else ("",)
        return {TopicPartition(t, p): OffsetAndMetadata(o, *extra) for (t, p), o in offsets.items()}

    def _failing_partition(self) -> str:
        """The partition whose records the client was parsing when it raised (best effort)."""
        records = getattr(getattr(self._consumer, "_fetcher", None), "_next_partition_records", None)
        tp = getattr(records, "topic_partition", None)
        if tp is not None:
            return f"{tp.topic}[{tp.partition}]"
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

    def commit(self, offsets: dict[Partition, int]) -> None:
        with kafka_errors("commit failed", self._group):
            self._consumer.commit(self._kafka_offsets(offsets), timeout_ms=_CLIENT_TIMEOUT_MS)

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
                offset = self._consumer.committed(tp, timeout_ms=_CLIENT_TIMEOUT_MS)
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
        self._consumer.close(autocommit=False, timeout_ms=_CLIENT_TIMEOUT_MS)


def _async(exc: BaseException) -> bool:
    """An error from the broker (the future's errback), as opposed to one send() raised at once."""
    from kafka.errors import KafkaError
    return isinstance(exc, KafkaError)


def _fatal(producer: Any) -> bool:
    """Whether a kafka-python producer is in its fatal state (it fails everything it is handed)."""
    manager = getattr(producer, "_transaction_manager", None)   # kafka-python has no public fatal check
    return bool(getattr(manager, "has_fatal_error", lambda: False)())


def retriable(exc: BaseException) -> bool:
    """Whether sending again can succeed: a retriable Kafka error or an outage; never a bad record."""
    from kafka.errors import KafkaError
    return isinstance(exc, KafkaError) and (exc.retriable or kafka_python_kind(exc) == OUTAGE)


def _fingerprint(record: Outgoing) -> bytes:
    """What names a record across a redo: the topic and the input it answers (its content where unknown:
    a result's timings differ from one try to the next)."""
    import hashlib
    digest = hashlib.blake2b(record.topic.encode(), digest_size=16)
    if record.source is not None:
        digest.update(repr(record.source).encode())
        return digest.digest()
    for part in (record.key or b"", record.value or b""):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def refused_for_good(exc: BaseException) -> bool:
    """A broker refusal no resend can change (REFUSED in :data:`.errors.KAFKA_PYTHON`: InvalidRecord, a
    broker-side schema or policy check, MessageSizeTooLarge, ...). kafka-python's
    idempotent producer turns such an error fatal and fails every batch in flight with it, so the
    record that carries it may only have shared the refused one's fate. The one classification the
    at-least-once and the exactly-once publishing paths both use."""
    return kafka_python_kind(exc) == REFUSED and _async(exc)


class KafkaSink:
    """acks=all producer. A send that fails with a retriable Kafka error is retried with backoff until
    acknowledged or closed; any other error refuses the record: its ``on_refused`` runs (the pipeline
    dead-letters the input), and a refused record without one (a dead letter) sets :attr:`failure`.

    With a ``transactional_id`` (exactly-once) every send goes into the open transaction; a send the
    broker fails is not retried but dooms the transaction: the record counts as handled so the unit
    can finish, and :meth:`commit_transaction` then aborts it (the unit is redone after a rewind).

    Order (at least once): the client retries in order until its delivery timeout (120 s); a record it
    gives up on, or that a refusal failed, is resent through one queue kept in hand-over order
    (:mod:`.isolation`) that every later record then waits behind, and nothing leaves that queue while
    the producer that failed it still holds records of its own (they fail after it, batch by batch, and
    take their places in the queue)."""

    def __init__(self, bootstrap: str, client_options: dict[str, Any], on_retry: Callable[[], None] = lambda: None,
                 linger_ms: int = 5, max_request_size: int = 1 << 20, compression_type: str | None = None,
                 transactional_id: str | None = None, transaction_timeout_ms: int = 60_000,
                 transaction_calls_s: float = TRANSACTION_CALLS_S) -> None:
        # At least once the client retries a send without a count (kafka-python's default), in order, until
        # delivery_timeout_ms; a record it gives up on is resent through the ordered queue. In a transaction a
        # failed send dooms the unit, so there it gives up after 5.
        extra = ({"transactional_id": transactional_id, "transaction_timeout_ms": transaction_timeout_ms, "retries": 5}
                 if transactional_id else {})
        self._settings = dict(bootstrap_servers=bootstrap, acks="all", linger_ms=linger_ms, max_block_ms=10_000,
                              bootstrap_timeout_ms=5_000, max_request_size=max_request_size,
                              compression_type=compression_type, **extra, **client_options)
        with connecting(bootstrap):
            self._producer = self._new_producer()
            if transactional_id:
                self._producer.init_transactions()   # aborts what a predecessor with this id left open
                self._producer.begin_transaction()
        self._renew_lock = threading.Lock()
        self.transactional = bool(transactional_id)
        self._calls_s = transaction_calls_s   # each commit point's transaction calls together, and an abort
        self._doomed: BaseException | None = None   # a send failed inside the open transaction
        self._on_retry = on_retry
        # retries, and failure handling moved off the producer's IO thread
        self._delayed = Delayed("publish-retry")
        self._closed = False
        self._watch_lock = threading.Lock()
        self._sending = FailureWatch("publishing to Kafka")
        self._refusals = Refusals()
        self.failing_since: float | None = None
        self._delayed.start()
        self._probe: Any = None   # made at the first refusal
        # exactly once: records a broker refused when sent alone (in a probe transaction, aborted), by
        # fingerprint; when the unit is redone they are refused at once and their inputs dead-lettered
        self._refused: dict[bytes, BaseException] = {}
        self._transactional_id = transactional_id
        self._isolation = Isolation(self._send_alone, lambda exc: not retriable(exc), self._isolated_outcome,
                                    self._released, self._current_producer)
        self._handed = itertools.count()   # each record's hand-over number: the isolation's order

    def _new_producer(self) -> Any:
        from kafka import KafkaProducer
        return KafkaProducer(**self._settings)

    def _new_probe(self) -> Any:
        from kafka import KafkaProducer
        return KafkaProducer(**{**self._settings, "enable_idempotence": False, "retries": 0,
                                "max_in_flight_requests_per_connection": 1, "linger_ms": 0})

    def _send_alone(self, record: Outgoing) -> BaseException | None:
        """Send one record on a producer of its own and wait for the broker (bounded); the error or None.
        Not idempotent, one request at a time: a refusal fails that record alone, never the producer."""
        from kafka.errors import KafkaError
        if self._closed:   # no new producer after close (nothing would close it)
            return KafkaError("the sink is closed")
        try:
            if self._probe is None:
                self._probe = self._new_probe()
            self._probe.send(record.topic, key=record.key, value=record.value,
                             headers=record.headers).get(timeout=_CLIENT_TIMEOUT_MS / 1000 * 6)
        except Exception as exc:
            if retriable(exc):
                with self._watch_lock:
                    self._sending.failed(exc)
                    self.failing_since = self._sending.since
            return exc
        return None

    def _renewed(self, exc: BaseException, producer: Any) -> bool:
        """After a broker restart kafka-python's idempotent producer can be left in a fatal state
        (InitProducerId failed) that fails every later send; at least once, a new producer fixes it.
        True when ``exc`` came from such a state of ``producer`` (the one that sent the record: a
        fatal error fails its whole buffer at once), so the record is worth sending again."""
        from kafka.errors import OutOfOrderSequenceNumberError, UnknownProducerIdError
        fatal = _fatal(producer)
        if self.transactional or not (fatal or isinstance(exc, (UnknownProducerIdError,
                                                                 OutOfOrderSequenceNumberError))):
            return False
        if fatal:
            self._replace(producer, exc)
        return True

    def _replace(self, producer: Any, why: object) -> None:
        """Replace ``producer``, fatal, with a new one (unless that was done already); the old one is closed
        on a thread of its own, failing what it still holds."""
        from kafka.errors import KafkaError
        with self._renew_lock:
            if self._producer is not producer or self._closed:
                return
            log.warning("the producer is in a fatal state (%s); replacing it with a new one", why)
            try:
                self._producer = self._new_producer()
            except KafkaError as again:   # the broker is away: the retry will try again
                log.warning("making a new producer failed (%s); will retry", again)
                return
        threading.Thread(target=close_producer, args=(producer, 30.0), name="old-producer-close",
                         daemon=True).start()

    def publish(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None = None,
                order: int | None = None) -> None:
        """``order``: the hand-over number of the record this one stands in for (a value-less fallback);
        None for a record handed over now."""
        if self._refused and _fingerprint(record) in self._refused:   # exactly once: known to be refused
            self._refuse(record, on_refused, self._refused[_fingerprint(record)])
            return
        order = next(self._handed) if order is None else order
        producer = self._producer
        if not self.transactional and self._isolation.take(order, record, on_ack, on_refused, producer):
            return   # records isolated after a failure go first: this one waits its turn behind them
        self._send(order, record, on_ack, on_refused, producer)

    def _current_producer(self) -> Any:
        """The producer records go to now: a new one where a failure left it fatal and the replacement has not
        happened yet (it would only fail them again)."""
        if _fatal(self._producer):
            self._replace(self._producer, "it failed the records waiting to be sent")
        return self._producer

    def _released(self, entry: Entry, producer: Any) -> None:
        """A record that waited behind isolated ones, handed back to ``producer`` (counted against it)."""
        self._send(entry.order, entry.record, entry.on_ack, entry.on_refused, producer)

    def _send(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
              producer: Any) -> None:
        """Send on ``producer``; at least once the record is already counted against it (:meth:`Isolation.take`),
        and every way it comes back settles that count: acknowledged, refused, or queued to be resent."""
        counted = not self.transactional

        def ok(_metadata: Any) -> None:
            if counted:
                self._isolation.answered(producer)
            self._sends_ok()
            if on_refused is not None:
                self._refusals.ok()
            on_ack()

        def resend_in_place(exc: BaseException) -> None:
            """Queued at once, in its hand-over place, and nothing is sent until this producer's other records
            have come back: none overtakes it."""
            self._isolation.add(order, record, on_ack, on_refused, producer)
            self._delayed.later(0.0, partial(self._after_failure, record, exc, producer))

        def failed(exc: BaseException) -> None:   # on the producer's IO thread: never send from here
            if counted and _async(exc) and not Refusals.stops(exc):
                resend_in_place(exc)
                return
            if counted and Refusals.stops(exc):   # the operator's to fix: no resend can help
                self._isolation.answered(producer)
                self._delayed.later(0.0, lambda: self._refuse(record, on_refused, exc))
                return
            self._delayed.later(0.0, lambda: self._failed(record, on_ack, on_refused, order, exc, producer))

        try:
            future = producer.send(record.topic, key=record.key, value=record.value, headers=record.headers)
        except Exception as exc:  # KafkaTimeoutError while the broker is away, a closed producer, a bad record
            if counted and retriable(exc):   # resent in its place, once the records the producer holds are back
                resend_in_place(exc)
                return
            self._failed(record, on_ack, on_refused, order, exc, producer)
            return
        future.add_callback(ok)
        future.add_errback(failed)

    def _probe_in_transaction(self, record: Outgoing, exc: BaseException) -> None:
        """Exactly once: send a record that failed with a refusal alone, in a transaction of its own that
        is then aborted (a read_committed reader never sees it). Refused alone, it is remembered; the
        records that merely shared its fate are redone with the unit."""
        from kafka import KafkaProducer
        if _fingerprint(record) in self._refused or self._closed:
            return
        settings = {**self._settings, "transactional_id": f"{self._transactional_id}-probe", "linger_ms": 0}
        error: BaseException | None = None
        try:
            if self._probe is None:
                self._probe = KafkaProducer(**settings)
                self._probe.init_transactions()   # aborts what an earlier probe left open
            self._probe.begin_transaction()
            self._probe.send(record.topic, key=record.key, value=record.value,
                             headers=record.headers).get(timeout=_CLIENT_TIMEOUT_MS / 1000 * 6)
        except Exception as failure:
            error = failure
        try:
            self._probe.abort_transaction()
        except Exception:   # left fatal by the refusal: the next probe starts afresh (and aborts this one)
            probe, self._probe = self._probe, None
            if probe is not None:
                threading.Thread(target=close_producer, args=(probe, 5.0), daemon=True).start()
        if error is not None and refused_for_good(error):
            log.warning("broker refuses a record for %s for good (%s); its input will be dead-lettered when "
                        "the unit is redone", record.topic, error)
            self._refused[_fingerprint(record)] = error
        else:
            log.info("a record for %s that failed with %s is accepted alone; it is redone with its unit",
                     record.topic, exc)

    def _after_failure(self, record: Outgoing, exc: BaseException, producer: Any) -> None:
        """A broker failure whose record is already queued for an ordered resend: replace a producer
        it left fatal, say it, count it."""
        self._renewed(exc, producer)
        with self._watch_lock:
            self._sending.failed(exc)
            self.failing_since = self._sending.since
        if refused_for_good(exc):
            log.warning("broker refused a record for %s (%s): resending it and what failed with it one at a "
                        "time, to find the record refused for good", record.topic, exc)
        self._on_retry()

    def _failed(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None, order: int,
                exc: BaseException, producer: Any) -> None:
        """A send that failed (at least once: counted against ``producer``, each branch settling it)."""
        from kafka.errors import MessageSizeTooLargeError
        counted = not self.transactional
        if record.fallback is not None and isinstance(exc, MessageSizeTooLargeError):
            log.warning("broker refused a %d-byte record for %s as too large; publishing it without its value",
                        len(record.value or b""), record.topic)
            if counted:
                self._isolation.answered(producer)
            self.publish(record.fallback, on_ack, on_refused, order)
            return
        if counted and refused_for_good(exc):
            self._renewed(exc, producer)   # a broker's refusal leaves it fatal (send()'s own size check does not)
            log.warning("broker refused a record for %s (%s): resending it and what failed with it one at a "
                        "time, to find the record refused for good", record.topic, exc)
            self._isolation.add(order, record, on_ack, on_refused, producer)
            return
        if not retriable(exc) and not (self.transactional and _async(exc)) and not self._renewed(exc, producer):
            if counted:
                self._isolation.answered(producer)
            self._refuse(record, on_refused, exc)
            return
        if self.transactional and Refusals.stops(exc):
            self._refuse(record, on_refused, exc)   # the operator's to fix: each redone unit would fail alike
            return
        if self.transactional:
            # The open transaction cannot commit now; it will be aborted and this unit redone.
            if refused_for_good(exc):   # find out, off this transaction, whether this record is the refused one
                self._delayed.later(0.0, lambda: self._probe_in_transaction(record, exc))
            with self._watch_lock:
                self._sending.failed(exc)
                self._doomed = exc if fenced(exc) else self._doomed or exc   # a fencing is the one to say
            on_ack()
            return
        with self._watch_lock:
            self._sending.failed(exc)
            self.failing_since = self._sending.since
        log.debug("publish to %s failed (%s); resending it in order", record.topic, exc)
        self._on_retry()
        # in the ordered queue, not after a delay of its own: a later record sent meanwhile would overtake it
        self._isolation.add(order, record, on_ack, on_refused, producer)

    def commit_transaction(self, offsets: dict[Partition, int], group_metadata: Any) -> None:
        """Add the consumed offsets to the open transaction, commit it and begin the next.
        On failure the transaction is aborted (raises KafkaTransient) or, fenced, KafkaPermanent."""
        from kafka.errors import KafkaError

        def commit() -> None:
            limit = time.monotonic() + self._calls_s
            kafka_offsets = KafkaSource._kafka_offsets(offsets)
            self._bounded("adding the offsets to the transaction", limit,
                          lambda: self._producer.send_offsets_to_transaction(kafka_offsets, group_metadata))
            self._bounded("committing the transaction", limit, self._producer.commit_transaction)
        with kafka_errors("transaction commit failed"):
            commit_unit(self._doomed, commit, self._sends_ok, self.abort_transaction, KafkaError,
                        self._fenced_check)
        self._begin()

    def _sends_ok(self) -> None:
        """A record acknowledged or a transaction committed: publishing is not failing (any more)."""
        with self._watch_lock:
            self._sending.ok()
            self.failing_since = None

    def _bounded(self, what: str, limit: float, call: Callable[[], Any]) -> None:
        """Run a transaction call that kafka-python lets wait on the coordinator without a bound on its
        own thread, until ``limit`` (monotonic): past it the member ends (KafkaPermanent); the call's own
        error is raised here."""
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                call()
                outcome.append(None)
            except BaseException as exc:   # handed to the caller's thread
                outcome.append(exc)
        worker = threading.Thread(target=run, name="transaction-call", daemon=True)
        worker.start()
        worker.join(max(0.0, limit - time.monotonic()))
        if not outcome:
            raise KafkaPermanent(f"{what}: the transaction coordinator did not answer within "
                                 f"{self._calls_s:g} s; exiting so a restart makes a new producer")
        if outcome[0] is not None:
            raise outcome[0]

    def _must(self, what: str, call: Callable[[], Any]) -> None:
        """A transaction call whose failure only a new producer can fix (or that says it was fenced)."""
        from kafka.errors import KafkaError
        try:
            call()
        except KafkaError as exc:
            self._fenced_check(exc)
            raise KafkaPermanent(f"{what} failed ({exc}); exiting so a restart makes a new producer") from exc

    def _begin(self) -> None:
        self._must("beginning a transaction", self._producer.begin_transaction)

    def abort_transaction(self) -> None:
        try:
            limit = time.monotonic() + self._calls_s
            self._must("aborting a transaction",
                       lambda: self._bounded("aborting a transaction", limit, self._producer.abort_transaction))
        finally:
            self._doomed = None
        self._begin()

    @staticmethod
    def _fenced_check(exc: BaseException) -> None:
        if fenced(exc):
            raise KafkaPermanent(f"this member's producer was fenced ({type(exc).__name__}): another member "
                                 f"took over its transactional id; stopping") from exc

    @property
    def failure(self) -> KafkaPermanent | None:
        return self._refusals.failure

    def _refuse(self, record: Outgoing, on_refused: Refused | None, exc: BaseException) -> None:
        self._refusals.refuse(record.topic, on_refused, exc, self._closed)

    def pending_retries(self) -> int:
        return self._delayed.pending() + self._isolation.waiting()

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        self._flush_producer(timeout)
        while self.pending_retries() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._flush_producer(max(0.1, deadline - time.monotonic()))   # what the resends handed back to it
        return not self.pending_retries()

    def _flush_producer(self, timeout: float) -> None:
        try:
            self._producer.flush(timeout=max(0.1, timeout))
        except Exception as exc:
            log.warning("flush: %s", exc)

    def close(self) -> None:
        self._closed = True
        self._delayed.close()
        self._isolation.close()
        if self._probe is not None:
            close_producer(self._probe, _CLIENT_TIMEOUT_MS / 1000)
        close_producer(self._producer, _CLIENT_TIMEOUT_MS / 1000)

    def _isolated_outcome(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
                          exc: BaseException | None) -> Outgoing | None:
        """What a record sent alone came to: acknowledged, or refused for good (its own fault). Once the sink is
        closing, a failure is only that (closing its producer fails what it holds): the record stays
        unacknowledged, its input redelivered after the restart, not dead-lettered."""
        if exc is not None and self._closed:
            return None
        if exc is None:
            self._sends_ok()
            on_ack()
            return None
        from kafka.errors import MessageSizeTooLargeError
        if record.fallback is not None and isinstance(exc, MessageSizeTooLargeError):
            log.warning("broker refused a %d-byte record for %s as too large; publishing it without its value",
                        len(record.value or b""), record.topic)
            return record.fallback
        if not Refusals.stops(exc):   # that one stops the member, saying so itself
            log.warning("broker refused a record for %s for good (%s)", record.topic, exc)
        self._refuse(record, on_refused, exc)
        return None


def close_producer(producer: Any, timeout: float) -> bool:
    """Close a kafka-python producer within about ``timeout`` s; False when it still held records.

    kafka-python's ``close`` flushes first and raises on a flush timeout before stopping its
    thread, so a producer whose records are still failing (a fatal one being replaced, a
    broker gone) is closed by trying again until they have failed or the time is up.
    """
    from kafka.errors import KafkaError
    deadline = time.monotonic() + timeout
    while True:
        try:
            producer.close(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            return True
        except KafkaError as exc:
            if time.monotonic() >= deadline:
                log.warning("a Kafka producer did not close within %.0f s (%s): the records it still held are "
                            "given up (their inputs stay uncommitted and are redelivered)", timeout, exc)
                return False
            time.sleep(0.1)   # close may also fail at once: never spin


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
    return "; ".join(f"{kind} topic {name!r} " + (f"created with {partitions} partitions" if name in missing
                                                   else "exists") for kind, name in wanted.items())
