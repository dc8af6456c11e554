"""The Kafka client, librdkafka's way (confluent-kafka): the same source and sink as :mod:`.kafka_io` and
:mod:`.kafka_sink`.

Chosen with ``--kafka-client librdkafka``; nothing else imports confluent-kafka (but :mod:`.errors`,
which classifies its errors). librdkafka's errors leave this module as the project's own, classified
in one table (:data:`.errors.LIBRDKAFKA`) and raised through :func:`.errors.kafka_errors`:
:class:`BrokerUnavailable` (an outage), :class:`KafkaTransient` (retry), :class:`KafkaPermanent`
(never succeeds), and for a record the broker refuses for good, the sink's ``on_refused``.

librdkafka calls the rebalance callbacks from ``consume()`` on the poll thread, so the drain on
revocation may block there (up to the drain timeout; heartbeats run on librdkafka's own threads).
Delivery reports are served by a thread of the sink polling the producer, so acknowledgements
reach the service while the poll thread drains.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from engine_build.errors import ConfigError

from .errors import (
    OUTAGE,
    PERMANENT,
    REFUSED,
    TRANSIENT,
    KafkaPermanent,
    fenced,
    kafka_errors,
    librdkafka_error,
    librdkafka_kind,
    librdkafka_name,
)
from .failures import Refusals
from .kafka_common import (
    CLIENT_TIMEOUT_S,
    DRAIN_STEP_S,
    TRANSACTION_CALLS_S,
    connecting,
    fetch_bytes,
    isolation_level,
    output_topics_line,
    reachable,
)
from .ports import Partition, RebalanceHandler, Refused, show
from .records import Message, Outgoing
from .sink_base import SinkBase
from .transactions import commit_unit

if TYPE_CHECKING:
    from .config import StreamConfig

log = logging.getLogger(__name__)

# librdkafka's own log, through logging, critical lines only: at its default level it writes a line for every
# failed reconnect while the broker is away (the service says that once); errors reach the service as events
_QUIET: dict[str, Any] = {"logger": logging.getLogger("stream.librdkafka"), "log_level": 2}


def _not_gapless_fatal(record: logging.LogRecord) -> bool:
    """librdkafka logs the fatal error that keeps its gapless guarantee as an emergency; to the sink it is a
    refused batch, which it says itself (a warning), so it is left out here."""
    return "Gap-less ordering would not be guaranteed" not in record.getMessage()


_QUIET["logger"].addFilter(_not_gapless_fatal)


def client_settings(cfg: StreamConfig) -> dict[str, Any]:
    """librdkafka's names for the TLS/SASL settings of ``cfg`` (only those that are set)."""
    options = {"security.protocol": cfg.security_protocol.lower(), "ssl.ca.location": cfg.ssl_cafile,
               "ssl.certificate.location": cfg.ssl_certfile, "ssl.key.location": cfg.ssl_keyfile,
               "sasl.mechanism": cfg.sasl_mechanism, "sasl.username": cfg.sasl_username,
               "sasl.password": cfg.sasl_password}
    return {k: v for k, v in options.items() if v is not None}


def _tp_list(partitions: Any) -> list[Partition]:
    return sorted((tp.topic, tp.partition) for tp in partitions)


def _offsets(offsets: dict[Partition, int]) -> list[Any]:
    from confluent_kafka import TopicPartition
    return [TopicPartition(t, p, o) for (t, p), o in offsets.items()]


# Backpressure holds records in librdkafka's queue this long before pausing the partitions (which drops
# them): a hold usually ends within a second, and a rebalance waits for this member at most this long.
HOLD_BEFORE_PAUSE_S = 2.0
# Once its prefetch queue is full librdkafka puts off a partition's next fetch by fetch.queue.backoff.ms, 1 s
# by default. Every hold fills that queue, so after each one the pipeline ran dry for up to a second: one
# process fed a GPU stand-in a quarter slower (docs/performance.md, the tenth run). A full queue is looked at
# again this often instead (not the fetch wait: an operator who raises that to cut empty fetches would
# bring the starvation back; not 0: a held consumer would spin).
FULL_QUEUE_RECHECK_MS = 10


def consumer_settings(cfg: StreamConfig, assignment_strategy: str = "range") -> dict[str, Any]:
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
        "allow.auto.create.topics": False, "partition.assignment.strategy": assignment_strategy,
        **_QUIET, **client_settings(cfg)}


class RdKafkaSource:
    """A consumer-group member; every call, the rebalance callbacks included, comes from the poll thread."""

    def __init__(self, cfg: StreamConfig, rebalance: RebalanceHandler,
                 assignment_strategy: str = "range") -> None:
        from confluent_kafka import Consumer
        from confluent_kafka.admin import AdminClient
        self._bootstrap, self._group, self._reset = cfg.bootstrap_servers, cfg.group_id, cfg.auto_offset_reset
        self._topics = list(cfg.input_topic)
        self._rebalance = rebalance
        self._cooperative = assignment_strategy == "cooperative-sticky"
        settings = consumer_settings(cfg, assignment_strategy)
        with connecting(cfg.bootstrap_servers, cfg.group_id):
            # a second client for the probe thread: the consumer's own list_topics waits while consume() runs
            self._admin = AdminClient({"bootstrap.servers": cfg.bootstrap_servers, **_QUIET, **client_settings(cfg)})
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
        deadline = time.monotonic() + handler.drain_timeout_s
        while not handler.drained(revoked) and time.monotonic() < deadline:
            time.sleep(DRAIN_STEP_S)   # librdkafka heartbeats on its own thread meanwhile
        drained = handler.drained(revoked)
        transactions = handler.transactions
        if transactions is not None:   # exactly-once: commit or abort the open transaction (bounded calls)
            try:
                handler.committed(transactions.end_for_revocation(drained))
            except KafkaPermanent as failure:   # fenced, or undrained: the service ends this member
                handler.fail(failure)
            handler.released(revoked, lost=False)
            return
        offsets = handler.committable(revoked)
        if offsets:
            try:
                consumer.commit(offsets=_offsets(offsets), asynchronous=False)
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
                out.append(Message(message.topic(), message.partition(), message.offset(), message.key(),
                                   message.value(), list(message.headers() or []), message.timestamp()[1], now))
            elif error.code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART,
                                      KafkaError._UNKNOWN_TOPIC):   # a missing topic: missing_topics says so
                errors.append(error)
        if errors and not out:   # records already taken are handed on; the error comes again if it lasts
            with kafka_errors(f"consuming from {show(self.assigned())}", self._group):
                raise KafkaException(errors[0])
        return out

    def assigned(self) -> list[Partition]:
        return _tp_list(self._consumer.assignment())

    def commit(self, offsets: dict[Partition, int]) -> None:
        with kafka_errors("commit failed", self._group):
            self._consumer.commit(offsets=_offsets(offsets), asynchronous=False)

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
        self._paused = True
        self._consumer.pause(self._consumer.assignment())
        return False

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


def _exception(error: Any) -> BaseException:
    """A librdkafka ``KafkaError`` as the exception the error tree classifies (other errors as they are)."""
    from confluent_kafka import KafkaError, KafkaException
    return KafkaException(error) if isinstance(error, KafkaError) else error


def _retriable(error: Any) -> bool:
    """Whether sending again can succeed: an outage, a transient error, a full local queue; never a bad record."""
    found = librdkafka_error(error)
    return found is not None and librdkafka_kind(found) in (OUTAGE, TRANSIENT)


def _is_refusal(error: Any) -> bool:
    found = librdkafka_error(error)
    return found is not None and librdkafka_kind(found) == REFUSED


def _timed_out(error: Any) -> bool:
    found = librdkafka_error(error)
    return found is not None and librdkafka_name(found) == "_MSG_TIMED_OUT"


# librdkafka's fatal errors of an idempotent producer that a new one (a new id, sequences from 0) cures: a refused
# batch (gapless), and a broker that lost the producer's state or disagrees on its sequence numbers
_CURED_BY_A_NEW_PRODUCER = ("_GAPLESS_GUARANTEE", "OUT_OF_ORDER_SEQUENCE_NUMBER", "UNKNOWN_PRODUCER_ID",
                            "_INCONSISTENT")
# what librdkafka hands back unsent: purged from a failed producer's queue, or its local queue full
_UNSENT = ("_PURGE_QUEUE", "_QUEUE_FULL")


def _producers_fault(error: Any, exc: BaseException) -> bool:
    """A failure of the producer, not of the record: librdkafka's fatal state (``produce`` on a fatal producer
    raises _FATAL, which does not say fatal() itself), or a fenced epoch (a delivery report's error never says
    fatal(); its code does)."""
    found = librdkafka_error(error)
    return found is not None and librdkafka_kind(found) == PERMANENT and \
        (found.fatal() or fenced(exc) or librdkafka_name(found) == "_FATAL")


def _name(error: Any) -> str | None:
    """The librdkafka code's name of ``error`` (see :func:`librdkafka_name`), None for any other error."""
    found = librdkafka_error(error)
    return None if found is None else librdkafka_name(found)


class RdKafkaSink(SinkBase):
    """Idempotent acks=all producer with delivery reports. A refusal (:data:`REFUSED`) runs ``on_refused``
    (the pipeline dead-letters the input), and a refused record without one (a dead letter) sets
    :attr:`failure`. A fatal idempotence error replaces the producer.

    At least once, as the kafka-python sink (:mod:`.kafka_sink`): librdkafka keeps a partition's order
    while it retries on its own, but a record whose delivery fails (refused, or given up on after
    ``message.timeout.ms``) goes to one queue kept in hand-over order (:mod:`.isolation`), is resent
    alone on a producer of its own (not idempotent: a refusal fails that record only, where a batch's
    refusal fails every record in it), and every later record waits behind it. That needs every batch
    behind a refused one to fail too: with ``enable.gapless.guarantee`` the refusal turns the producer
    fatal, its queue is purged, and the broker refuses what was in flight behind it out of sequence (the
    replaced producer's queue is purged again as such batches come back for a retry). Exactly once a
    failed delivery dooms the open transaction instead."""

    def __init__(self, bootstrap: str, settings: dict[str, Any], on_retry: Callable[[], None] = lambda: None,
                 linger_ms: int = 5, max_request_size: int = 1 << 20, compression_type: str | None = None,
                 transactional_id: str | None = None, transaction_timeout_ms: int = 60_000) -> None:
        # At least once, a batch the broker refuses turns the producer fatal and fails every batch behind it
        # (gapless), as kafka-python's does: by default librdkafka would bump its epoch and send the later
        # batches on, acknowledged before the refused batch's innocent records are resent alone (out of order)
        extra = ({"transactional.id": transactional_id, "transaction.timeout.ms": transaction_timeout_ms}
                 if transactional_id else {"enable.gapless.guarantee": True})
        self._settings = {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                          "linger.ms": linger_ms, "message.max.bytes": max_request_size,
                          "compression.type": compression_type or "none", "message.timeout.ms": 30_000,
                          **_QUIET, **extra, **settings}
        self._bootstrap = bootstrap
        with connecting(bootstrap):
            self._producer = self._new_producer()
            if transactional_id:   # aborts what a predecessor with this id left open
                self._producer.init_transactions(TRANSACTION_CALLS_S)
                self._producer.begin_transaction()
        super().__init__(on_retry, transactional_id)
        self._lock = threading.Lock()   # the producer's replacement, and the replaced ones still served
        self._retired: dict[Any, float] = {}   # replaced producers, by when: their reports are still served
        self._dead: set[Any] = set()   # those replaced as fatal: nothing more can be handed to them
        self._poll_thread = threading.Thread(target=self._serve, name="producer-poll", daemon=True)
        self._poll_thread.start()
        self._delayed.start()

    def _new_producer(self) -> Any:
        from confluent_kafka import Producer
        return Producer(self._settings)

    def _serve(self) -> None:
        """Serve delivery reports (they call ``on_ack``) until closed: the producer's, and those of producers
        it replaced for as long as they hold records (a record can still be handed to one that was just
        replaced, and its report is what settles it), at least ``message.timeout.ms`` and a margin."""
        while not self._closed:
            with self._lock:
                retired = list(self._retired.items())
            for producer, since in [(self._producer, None), *retired]:
                try:   # poll raises what a delivery callback raised: said, and the thread goes on serving
                    if since is not None:   # it sends nothing more: what comes back to its queue (a batch
                        # behind a refused one, answered out of order and queued for a retry) fails now, to
                        # be resent in order, not after message.timeout.ms
                        producer.purge(in_queue=True, in_flight=False, blocking=False)
                    producer.poll(0.05 if since is None else 0)
                except Exception as exc:
                    if self._fatal(producer, exc):
                        continue
                    log.exception("serving the producer's delivery reports")
                    time.sleep(0.05)   # never spin on an error that repeats
                if since is not None and len(producer) == 0 and (producer in self._dead or time.monotonic() - since
                                                                  > self._settings["message.timeout.ms"] / 1000 + 5):
                    with self._lock:
                        self._retired.pop(producer, None)
                        self._dead.discard(producer)

    def _fatal(self, producer: Any, exc: BaseException) -> bool:
        """Whether ``exc``, raised by ``poll`` or ``flush``, is librdkafka's fatal error (raised once, by the call
        that serves its event). One a new producer cures (:data:`_CURED_BY_A_NEW_PRODUCER`) replaces it; at least
        once, any other (no IdempotentWrite ACL, a broker without idempotence: a new producer would fail alike)
        stops the member; in a transaction the commit point says it."""
        error = librdkafka_error(exc)
        if error is None or not error.fatal():
            return False
        if self.transactional:
            log.warning("the transactional producer is in a fatal state (%s)", error.str())
        elif producer is not self._producer:   # replaced already (a timeout while the broker answered)
            log.info("a replaced producer is in a fatal state (%s)", error.str())
        elif _name(error) in _CURED_BY_A_NEW_PRODUCER:
            self._delayed.later(0.0, partial(self._renew, producer, error))
        else:
            self._refusals.stop("the output topics", _exception(error), closed=self._closed)
        return True

    def _send(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
              producer: Any) -> None:
        """Produce on ``producer``; at least once the record is already counted against it
        (:meth:`Isolation.take`), and every way it comes back settles that count."""
        counted = not self.transactional

        def delivered(error: Any, _message: Any) -> None:   # on the producer-poll thread
            if error is None:
                if counted:
                    self._isolation.answered(producer)
                self._acknowledged(on_ack, on_refused)
            elif counted:
                self._requeue(order, record, on_ack, on_refused, error, producer)
            else:
                self._delayed.later(0.0, lambda: self._failed(record, on_ack, on_refused, error, order, True))

        try:
            # a plugin's str is a bug: librdkafka would send its UTF-8, kafka-python refuses it; refuse it here too
            for name, part in (("key", record.key), ("value", record.value)):
                if part is not None and not isinstance(part, bytes):
                    raise TypeError(f"a record {name} must be bytes, not {type(part).__name__}")
            extra = {"headers": record.headers} if record.headers else {}
            producer.produce(record.topic, value=record.value, key=record.key, on_delivery=delivered, **extra)
        except BufferError as exc:   # the local queue is full: wait for deliveries, then send again
            log.debug("producer queue full (%s)", exc)
            if counted:   # in its place, behind nothing and before every later record
                from confluent_kafka import KafkaError
                self._requeue(order, record, on_ack, on_refused, KafkaError(KafkaError._QUEUE_FULL), producer)
            else:
                self._delayed.later(0.05, lambda: self._send(order, record, on_ack, on_refused, producer))
        except Exception as exc:   # a KafkaException (too large, closed) or a bad value (TypeError)
            error = librdkafka_error(exc) or exc
            if counted and (_retriable(exc) or _producers_fault(error, exc)):   # closed, fatal: a new one sends it
                self._requeue(order, record, on_ack, on_refused, error, producer)
                return
            if counted:
                self._isolation.answered(producer)
            self._failed(record, on_ack, on_refused, error, order)

    def _requeue(self, order: int, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None,
                 error: Any, producer: Any) -> None:
        """At least once, a record ``producer`` failed: an error only the operator can fix stops the member;
        any other queues the record in its hand-over place, to be resent alone (never from the poll thread)."""
        exc = _exception(error)
        if Refusals.stops(exc) and not _producers_fault(error, exc):
            self._isolation.answered(producer)
            self._delayed.later(0.0, lambda: self._refuse(record, on_refused, exc))
            return
        if _name(error) in _UNSENT:   # never refused: back to a producer in its place, not sent alone
            self._isolation.add(order, record, on_ack, on_refused, producer, failed=False)
            return
        self._isolation.add(order, record, on_ack, on_refused, producer)
        if _timed_out(error):   # given up on: what the producer still queues behind it must not go out first
            producer.purge(in_queue=True, in_flight=False, blocking=False)
        self._delayed.later(0.0, partial(self._after_failure, record, error, producer))

    def _after_failure(self, record: Outgoing, error: Any, producer: Any) -> None:
        """A failed delivery whose record is queued for its ordered resend: replace a producer it left unable
        to send, say it, count it."""
        exc = _exception(error)
        # a refused batch left the producer fatal (gapless); so can a timeout while the broker answers: after a
        # broker restart that lost its state (a new in-memory broker) the idempotent producer can wait for ever
        # on its old producer id; a new producer starts afresh
        if fenced(exc) or _is_refusal(error) or (_timed_out(error) and reachable(self._bootstrap)):
            self._renew(producer, error)
        self._count_failure(record, exc)

    def _send_alone(self, record: Outgoing) -> BaseException | None:
        """Send one record on a producer of its own and wait for the broker (bounded); the error or None. Not
        idempotent, one request at a time: a refusal fails that record alone."""
        from confluent_kafka import KafkaError, KafkaException, Producer
        if self._closed:   # no new producer after close (nothing would close it)
            return KafkaPermanent("the sink is closed")
        answers: list[Any] = []
        try:
            if self._probe is None:
                self._probe = Producer({**self._settings, "enable.idempotence": False,
                                        "enable.gapless.guarantee": False,   # it needs idempotence
                                        "max.in.flight.requests.per.connection": 1, "linger.ms": 0})
            extra = {"headers": record.headers} if record.headers else {}
            self._probe.produce(record.topic, value=record.value, key=record.key,
                                on_delivery=lambda error, _message: answers.append(error), **extra)
            self._probe.flush(self._settings["message.timeout.ms"] / 1000 + CLIENT_TIMEOUT_S)
        except (BufferError, KafkaException, TypeError) as exc:
            return exc
        error = answers[0] if answers else KafkaError(KafkaError._MSG_TIMED_OUT)
        if error is None:
            return None
        if _retriable(error):
            self._failing(_exception(error))
        return _exception(error)

    def _retriable(self, exc: BaseException) -> bool:
        return _retriable(exc)

    def _refused_for_good(self, exc: BaseException) -> bool:
        return _is_refusal(exc)

    def _too_large(self, exc: BaseException) -> bool:
        error = librdkafka_error(exc)
        return error is not None and librdkafka_name(error) == "MSG_SIZE_TOO_LARGE"

    def _failed(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None, error: Any,
                order: int, reported: bool = False) -> None:
        """A failed delivery in a transaction (``reported``: in its delivery report, the broker's answer), or a
        record ``produce`` refused at once (at least once no longer counted against its producer)."""
        from confluent_kafka import KafkaError
        exc = _exception(error)
        refused = not isinstance(error, KafkaError) or librdkafka_kind(error) == REFUSED   # a bad value too
        if self.transactional and Refusals.stops(exc) and not _producers_fault(error, exc):
            self._refuse(record, on_refused, exc)   # the operator's to fix: each redone unit would fail alike
            return
        if self.transactional and (reported or not refused):
            # Any failed delivery makes librdkafka's open transaction abortable: it will be aborted and this
            # unit redone. A record produce() refused at once never entered it and is refused below.
            self._doom(record, on_ack, exc, error, probe=reported and refused)
            return
        instead = self._fallback(record, exc)
        if instead is not None:
            self.publish(instead, on_ack, on_refused, order)
            return
        self._refuse(record, on_refused, exc)

    def _transact_alone(self, record: Outgoing) -> BaseException | None:
        from confluent_kafka import KafkaError, KafkaException, Producer
        answers: list[Any] = []
        error: Any = None
        try:
            if self._probe is None:
                self._probe = Producer({**self._settings, "transactional.id": f"{self._transactional_id}-probe",
                                        "linger.ms": 0})
                self._probe.init_transactions(TRANSACTION_CALLS_S)   # aborts what an earlier probe left open
            self._probe.begin_transaction()
            extra = {"headers": record.headers} if record.headers else {}
            self._probe.produce(record.topic, value=record.value, key=record.key,
                                on_delivery=lambda failure, _message: answers.append(failure), **extra)
            self._probe.flush(self._settings["message.timeout.ms"] / 1000 + CLIENT_TIMEOUT_S)
            error = answers[0] if answers else KafkaError(KafkaError._MSG_TIMED_OUT)
        except KafkaException as failure:
            error = librdkafka_error(failure) or failure
        try:
            self._probe.abort_transaction(TRANSACTION_CALLS_S)
        except Exception:   # left unusable by the refusal: the next probe starts afresh (and aborts this one)
            self._probe = None
        return None if error is None else _exception(error)

    def _renew(self, producer: Any, error: Any) -> None:
        """Replace a producer in librdkafka's fatal state (every later send would fail); its records fail as
        its delivery reports are served and queue for their ordered resend (or, in a transaction, doom it)."""
        from confluent_kafka import KafkaException
        with self._lock:
            if self._producer is not producer or self._closed:
                return
            log.warning("the producer is in a fatal state (%s); replacing it with a new one", error.str())
            try:
                self._producer = self._new_producer()
            except KafkaException as exc:   # the retry will find the old one and try again
                log.warning("making a new producer failed (%s); will retry", exc)
                return
            self._retired[producer] = time.monotonic()   # served by _serve while it holds records
            found = librdkafka_error(error)
            if found is not None and (found.fatal() or _is_refusal(found)):   # fatal (a refusal is, gapless):
                self._dead.add(producer)   # produce() on it fails, so nothing more can enter it

    def commit_transaction(self, offsets: dict[Partition, int], group_metadata: Any) -> None:
        """Add the consumed offsets to the open transaction, commit it and begin the next. On failure the
        transaction is aborted (raises KafkaTransient or BrokerUnavailable) or, fenced, KafkaPermanent."""
        from confluent_kafka import KafkaException

        def commit() -> None:
            limit = time.monotonic() + TRANSACTION_CALLS_S
            self._producer.send_offsets_to_transaction(_offsets(offsets), group_metadata, _left(limit))
            self._producer.commit_transaction(_left(limit))
        with kafka_errors("transaction commit failed"):
            commit_unit(self._doomed, commit, self._sends_ok, self.abort_transaction, KafkaException,
                        lambda exc: self._fatal_check(exc, "committing the transaction"))
        self._begin()

    def abort_transaction(self) -> None:
        from confluent_kafka import KafkaException
        try:
            self._producer.abort_transaction(TRANSACTION_CALLS_S)
        except KafkaException as exc:
            self._fatal_check(exc, "aborting a transaction")
            raise KafkaPermanent(f"aborting a transaction failed ({exc}); exiting so a restart makes a new "
                                 f"producer") from exc
        finally:
            self._doomed = None
        self._begin()

    def _begin(self) -> None:
        from confluent_kafka import KafkaException
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:
            raise KafkaPermanent(f"beginning a transaction failed ({exc}); exiting so a restart makes a new "
                                 f"producer") from exc

    @staticmethod
    def _fatal_check(exc: BaseException, what: str) -> None:
        """A fatal transaction error (fenced: another member took over the transactional id) ends the member."""
        error = librdkafka_error(exc)
        if error is not None and (error.fatal() or librdkafka_kind(error) == PERMANENT):
            raise KafkaPermanent(f"{what}: {error.name()}: {error.str()}: this member's producer can send no more "
                                 f"(fenced when another member took over its transactional id); stopping") from exc

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            producer = self._producer
            try:
                left = producer.flush(max(0.0, min(0.1, deadline - time.monotonic())))
            except Exception as exc:   # the fatal error's event, served here rather than on the poll thread
                if not self._fatal(producer, exc):
                    raise
                continue
            if not left and not self.pending_retries():
                return True
        return not self.pending_retries() and not len(self._producer)

    def close(self) -> None:
        self.flush(CLIENT_TIMEOUT_S)
        self._closed = True
        self._delayed.close(timeout=1.0)
        self._isolation.close()
        self._poll_thread.join(1.0)
        if self._probe is not None:
            self._probe.flush(0)
        try:
            left = self._producer.flush(0)
        except Exception as exc:   # its fatal error, left unserved until now: said, and what it holds counted
            log.warning("closing the producer: %s", exc)
            left = len(self._producer)
        if left:
            log.warning("the producer closed with %d records undelivered (their inputs stay uncommitted and are "
                        "redelivered)", left)


def ensure_output_topics(cfg: StreamConfig) -> str:
    """:func:`.kafka_common.ensure_output_topics` with librdkafka's admin client (kafka-python's cannot talk to
    every broker librdkafka can: librdkafka's mock cluster answers it with ApiVersions it cannot decode)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": cfg.bootstrap_servers, **_QUIET, **client_settings(cfg)})
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


def _left(limit: float) -> float:
    """Seconds until ``limit`` (monotonic), at least a little: librdkafka's own bound on a transaction call."""
    return max(0.1, limit - time.monotonic())


class RdKafkaConnector:
    """Makes the librdkafka source and sink from the service config.

    ``assignment_strategy`` is librdkafka's ``partition.assignment.strategy``: eager ``range`` by default.
    ``cooperative-sticky`` (the source then adds and removes partitions incrementally) was tried against
    tansu 0.6: a member leaving left the group unable to finish its rebalance, and offset commits failed
    with ILLEGAL_GENERATION meanwhile, so it is not the default and not offered as a flag."""

    def __init__(self, cfg: StreamConfig, assignment_strategy: str = "range") -> None:
        try:   # its version is in the start-up line (stream.cli.client_version)
            import confluent_kafka  # noqa: F401
        except ImportError as exc:
            raise ConfigError("--kafka-client librdkafka needs confluent-kafka "
                              "(pip install 'sentiment-stream[librdkafka]')") from exc
        self.cfg, self.assignment_strategy = cfg, assignment_strategy

    def source(self, rebalance: RebalanceHandler) -> RdKafkaSource:
        return RdKafkaSource(self.cfg, rebalance, self.assignment_strategy)

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
