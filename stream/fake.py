"""An in-process fake broker implementing the service's ports (:mod:`.ports`).

For fast, honest unit tests of the service logic (batching, dead letters, offset
commits, draining, rebalances): it keeps partitioned logs, committed offsets and
consumer groups whose members rebalance eagerly (every member revokes, draining
and committing through its :class:`RebalanceHandler`, before any is assigned). As in
kafka-python under the eager protocol, a partition a member keeps across a rebalance
keeps its fetch position and paused flag; only a partition new to the member starts
from the group's committed offset (unpaused). It is not Kafka; integration tests use a
real broker.
"""
from __future__ import annotations

import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable

from .errors import KafkaPermanent, KafkaTransient
from .failures import Refusals
from .ports import Partition, RebalanceHandler, Refused
from .records import Headers, Message, Outgoing

Record = tuple[bytes | None, bytes | None, Headers]


class FakeBroker:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.topics: dict[str, list[list[Record]]] = {}
        self.committed: dict[str, dict[Partition, int]] = defaultdict(dict)
        self.fail_next_publishes = 0          # make the next N sends fail once each
        self.max_record_bytes: int | None = None   # like a broker's message.max.bytes (key, value, headers)
        self.poll_errors: list[BaseException] = []  # raised by the next polls, one each
        self.up = True                        # what reachable() answers
        self.errors: list[BaseException] = []       # a sink's assertion, re-raised on the poll thread
        self.refuse_topics: set[str] = set()  # sends to these fail: TopicAuthorizationFailed (no WRITE ACL)
        self.fail_next_commits = 0            # make the next N transaction commits fail (and abort)
        # as librdkafka: a commit that does not wait is answered at the member's next poll, refused where
        # refuse_commit says so (refused_commits counts them)
        self.commits_answered_later = False
        self.refuse_commit: Callable[[dict[Partition, int]], bool] = lambda offsets: False
        self.refused_commits = 0
        self.appended: list[tuple[str, Record]] = []   # every record as it was appended, across topics
        self._members: dict[str, list[FakeSource]] = defaultdict(list)
        self._generation: dict[str, int] = defaultdict(int)

    def create_topic(self, name: str, partitions: int = 1) -> None:
        with self.lock:
            self.topics.setdefault(name, [[] for _ in range(partitions)])

    def produce(self, topic: str, value: bytes | None, key: bytes | None = None, headers: Headers | None = None,
                partition: int | None = None) -> int:
        """Append a record; without a partition, a stable hash of the key chooses (keyless: partition 0)."""
        with self.lock:
            parts = self.topics.setdefault(topic, [[]])
            index = partition if partition is not None else (zlib.crc32(key) % len(parts) if key else 0)
            parts[index].append((key, value, list(headers or [])))
            self.appended.append((topic, parts[index][-1]))
            return len(parts[index]) - 1

    def records(self, topic: str) -> list[Record]:
        with self.lock:
            return [r for part in self.topics.get(topic, []) for r in part]

    def connector(self, topics: list[str], group_id: str, transactional: bool = False) -> FakeConnector:
        return FakeConnector(self, topics, group_id, transactional)

    def evict(self, member: FakeSource) -> None:
        """The coordinator drops a member whose session expired (a frozen process): the others rebalance
        without it; the member learns of it at its next poll, as kafka-python's does from a heartbeat."""
        with self.lock:
            member.evicted = True
            self._leave(member)

    # ---- consumer groups ----
    def _join(self, member: FakeSource) -> None:
        with self.lock:
            self._members[member.group].append(member)
            self._generation[member.group] += 1

    def _leave(self, member: FakeSource) -> None:
        with self.lock:
            if member in self._members[member.group]:
                self._members[member.group].remove(member)
                self._generation[member.group] += 1

    def _assignment(self, member: FakeSource) -> list[Partition] | None:
        """The member's share of the current generation, once every member has revoked; else None."""
        with self.lock:
            members = self._members[member.group]
            generation = self._generation[member.group]
            if any(m.revoked_generation < generation for m in members):
                return None
            partitions = sorted((t, i) for t in member.topics for i in range(len(self.topics.get(t, []))))
            return [p for n, p in enumerate(partitions) if members[n % len(members)] is member]


class FakeSource:
    """A group member: rebalances happen inside :meth:`poll`, as kafka-python's do."""

    def __init__(self, broker: FakeBroker, topics: list[str], group_id: str, rebalance: RebalanceHandler) -> None:
        self.broker, self.topics, self.group, self.rebalance = broker, topics, group_id, rebalance
        self.assigned: list[Partition] = []
        self.revoked_generation = -1
        self.generation = -1
        self._position: dict[Partition, int] = {}
        self.paused: set[Partition] = set()
        self.closed = False
        self.evicted = False
        self.joined = False   # like the Kafka source: no group membership until every input topic exists
        self._unanswered: list[dict[Partition, int]] = []   # commits sent without waiting (commits_answered_later)
        self._answered_error: KafkaTransient | None = None
        broker._join(self)

    def poll(self, timeout_s: float, max_records: int) -> list[Message]:
        self._answer_commits()
        with self.broker.lock:
            if self.broker.errors:
                raise self.broker.errors.pop(0)
            if self.broker.poll_errors:
                raise self.broker.poll_errors.pop(0)
        self.joined = self.joined or not self.missing_topics()
        if not self.joined or not self._stable():
            time.sleep(min(timeout_s, 0.01))
            return []
        out = self._fetch(max_records)
        if not out:
            time.sleep(min(timeout_s, 0.01))
        return out

    def _stable(self) -> bool:
        if self.evicted:
            self._lose()
        generation = self.broker._generation[self.group]
        if self.generation == generation:
            return True
        if self.revoked_generation < generation:
            self._revoke(self.assigned)
            self.assigned = []
            self.revoked_generation = generation
        share = self.broker._assignment(self)
        if share is None:
            return False
        self.generation = generation
        self.assigned = share
        start = self.broker.committed[self.group]
        # kafka-python's assign_from_subscribed: retained partitions keep their state, new ones get fresh
        self._position = {p: self._position[p] if p in self._position else start.get(p, 0) for p in share}
        self.paused &= set(share)
        self.rebalance.assigned(list(share))
        return True

    def _lose(self) -> None:
        """Evicted: the partitions are lost (exactly once, the open transaction is aborted first), every
        position is dropped, and the member joins again, as kafka-python's does."""
        lost, self.assigned, self._position = self.assigned, [], {}
        self.evicted, self.generation = False, -1
        if lost:
            transactions = self.rebalance.transactions
            if transactions is not None:
                self.rebalance.fail(transactions.lost(lost))
            self.rebalance.released(lost, lost=True)
        self.broker._join(self)

    def _revoke(self, partitions: list[Partition]) -> None:
        if not partitions:
            return
        deadline = time.monotonic() + self.rebalance.drain_timeout_s
        while not self.rebalance.drained(partitions) and time.monotonic() < deadline:
            time.sleep(0.005)
        transactions = self.rebalance.transactions
        if transactions is not None:   # as the Kafka source: commit or abort the open transaction
            try:
                self.rebalance.committed(transactions.end_for_revocation(self.rebalance.drained(partitions)))
            except KafkaPermanent as exc:
                self.rebalance.fail(exc)
            self.rebalance.released(partitions, lost=False)
            return
        offsets = self.rebalance.committable(partitions)
        if offsets:
            self.commit(offsets, wait=True)
            self.rebalance.committed(offsets)
        self.rebalance.released(partitions, lost=False)

    def _fetch(self, max_records: int) -> list[Message]:
        """Round-robin over the assigned partitions, one record at a time, as fair as Kafka's fetches."""
        out: list[Message] = []
        with self.broker.lock:
            progress = True
            while progress and len(out) < max_records:
                progress = False
                for (topic, index) in self.assigned:
                    if (topic, index) in self.paused:
                        continue
                    log = self.broker.topics[topic][index]
                    offset = self._position[(topic, index)]
                    if offset < len(log) and len(out) < max_records:
                        key, value, headers = log[offset]
                        out.append(Message(topic, index, offset, key, value, headers, int(time.time() * 1000)))
                        self._position[(topic, index)] += 1
                        progress = True
        return out

    def commit(self, offsets: dict[Partition, int], *, wait: bool) -> dict[Partition, int]:
        """Committed at once; with ``commits_answered_later``, one that does not wait is answered at the next
        poll, and a refusal there is raised by the next commit."""
        if wait or not self.broker.commits_answered_later:
            with self.broker.lock:
                self.broker.committed[self.group].update(offsets)
            return offsets
        error, self._answered_error = self._answered_error, None
        self._unanswered.append(dict(offsets))
        if error is not None:
            raise error
        return {}

    def _answer_commits(self) -> None:
        sent, self._unanswered = self._unanswered, []
        for offsets in sent:
            with self.broker.lock:
                refused = self.broker.refuse_commit(offsets)
                self.broker.refused_commits += refused
                if not refused:
                    self.broker.committed[self.group].update(offsets)
            if refused:
                self._answered_error = KafkaTransient("commit failed: refused by the fake broker")
            else:
                self.rebalance.committed(offsets)

    def group_metadata(self) -> tuple[int, int]:
        """(generation, member id); (-1, 0) once evicted, as kafka-python's after a heartbeat reset."""
        return (-1, 0) if self.evicted else (self.generation, id(self))

    def in_group(self) -> bool:
        return not self.evicted

    def position(self, partition: Partition) -> int | None:
        """The next offset this member fetches from ``partition`` (kafka-python's ``position``)."""
        return self._position.get(partition) if partition in self.assigned else None

    def rewind(self, partitions: list[Partition]) -> None:
        with self.broker.lock:
            start = self.broker.committed[self.group]
            for partition in partitions:
                if partition in self._position:
                    self._position[partition] = start.get(partition, 0)

    def pause_all(self) -> None:
        self.paused = set(self.assigned)

    def resume_all(self) -> None:
        self.paused = set()

    def end_offsets(self) -> dict[Partition, int]:
        with self.broker.lock:
            return {(t, i): len(self.broker.topics[t][i]) for t, i in self.assigned}

    def reachable(self) -> bool:
        return self.broker.up

    def missing_topics(self) -> list[str]:
        with self.broker.lock:
            return [t for t in self.topics if t not in self.broker.topics]

    def close(self) -> None:
        """Leave the group, revoking (draining, committing) what this member owns, as kafka-python does."""
        if not self.closed:
            self._revoke(self.assigned)
            self.assigned = []
            self.broker._leave(self)
            self.closed = True


class FakeSink:
    def __init__(self, broker: FakeBroker, on_retry: Callable[[], None] = lambda: None) -> None:
        self.broker, self._on_retry = broker, on_retry
        self.failing_since: float | None = None
        self._refusals = Refusals()   # as the Kafka sinks: dead-letter one record's input, or stop the member
        self._retrying = 0
        self._lock = threading.Lock()

    def publish(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None = None) -> None:
        from kafka.errors import TopicAuthorizationFailedError
        refusal = (TypeError(f"Unsupported type for serialized value: {type(record.value)}")
                   if not isinstance(record.value, (bytes, bytearray, memoryview, type(None)))
                   else TopicAuthorizationFailedError(record.topic)
                   if record.topic in self.broker.refuse_topics else None)
        if refusal is not None:   # like the Kafka sink: never retried
            self._refusals.refuse(record.topic, on_refused, refusal)
            return
        with self.broker.lock:
            fail = self.broker.fail_next_publishes > 0
            if fail:
                self.broker.fail_next_publishes -= 1
        if fail:   # like the Kafka sink: retried, never dropped
            self._on_retry()
            with self._lock:
                self._retrying += 1
            threading.Timer(0.01, self._retry, (record, on_ack, on_refused)).start()
            return
        limit = self.broker.max_record_bytes
        size = (len(record.value or b"") + len(record.key or b"")
                + sum(len(n) + len(v or b"") for n, v in record.headers))
        if limit is not None and size > limit:
            if record.fallback is None:   # like the Kafka sink: a record too large is refused, never retried
                too_large = ValueError(f"record of {size} bytes exceeds the broker's {limit}")
                self._refusals.refuse(record.topic, on_refused, too_large)
                return
            self.publish(record.fallback, on_ack, on_refused)
            return
        self._append(record)
        on_ack()

    @property
    def failure(self) -> KafkaPermanent | None:
        return self._refusals.failure

    def _append(self, record: Outgoing) -> None:
        self.broker.produce(record.topic, record.value, record.key, record.headers, partition=0)

    def _retry(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None) -> None:
        with self._lock:
            self._retrying -= 1
        self.publish(record, on_ack, on_refused)

    def flush(self, timeout: float) -> bool:
        """Wait until no retry is pending (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.pending_retries() and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self.pending_retries()

    def pending_retries(self) -> int:
        with self._lock:
            return self._retrying

    def close(self) -> None:
        pass


class FakeTransactionalSink(FakeSink):
    """The sink with a transactional id: records wait in the open transaction and reach the log (what a
    read_committed reader sees) only when it commits, with the consumed offsets; an abort drops them.
    Like tansu, it does not check the offsets' group generation or member id: the service fences itself."""

    def __init__(self, broker: FakeBroker, group: str, on_retry: Callable[[], None] = lambda: None) -> None:
        super().__init__(broker, on_retry)
        self.group = group
        self._open: list[Outgoing] = []
        self.metadata: list[object] = []   # the group metadata of each committed transaction

    def _append(self, record: Outgoing) -> None:
        with self._lock:
            self._open.append(record)

    def commit_transaction(self, offsets: dict[Partition, int], group_metadata: object) -> None:
        """Commit the open transaction; like the Kafka sink, a failed commit aborts it and raises KafkaTransient."""
        with self.broker.lock:
            fail = self.broker.fail_next_commits > 0
            if fail:
                self.broker.fail_next_commits -= 1
            else:
                with self._lock:
                    records, self._open = self._open, []
                for record in records:
                    self.broker.produce(record.topic, record.value, record.key, record.headers, partition=0)
                self.broker.committed[self.group].update(offsets)
                self.metadata.append(group_metadata)
        if fail:
            self.abort_transaction()
            raise KafkaTransient("transaction commit failed: the coordinator is not available")

    def abort_transaction(self) -> None:
        with self._lock:
            self._open = []

    def open_transaction(self) -> list[Outgoing]:
        """The records of the open transaction (on a broker they hold back read_committed readers)."""
        with self._lock:
            return list(self._open)


class FakeConnector:
    """Makes fake sources (one group member each) and sinks on one broker."""

    def __init__(self, broker: FakeBroker, topics: list[str], group_id: str, transactional: bool = False) -> None:
        self.broker, self.topics, self.group_id = broker, topics, group_id
        self.transactional = transactional
        # what it made, newest last: a test reaches a running service's ports through them
        self.sources: list[FakeSource] = []
        self.sinks: list[FakeSink] = []

    def source(self, rebalance: RebalanceHandler) -> FakeSource:
        self.sources.append(FakeSource(self.broker, self.topics, self.group_id, rebalance))
        return self.sources[-1]

    def sink(self, on_retry: Callable[[], None]) -> FakeSink:
        sink = FakeTransactionalSink(self.broker, self.group_id, on_retry) if self.transactional else \
            FakeSink(self.broker, on_retry)
        self.sinks.append(sink)
        return sink
