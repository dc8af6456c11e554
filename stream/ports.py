"""The service's two ports to a broker, and the rebalance contract between them.

:class:`Source` (a consumer-group member) and :class:`Sink` (a producer) are what the
service needs from Kafka; :mod:`.kafka_io` and :mod:`.kafka_sink` implement them with kafka-python,
:mod:`.rdkafka_io` with librdkafka and :mod:`.fake` in memory. A :class:`Connector` makes both. A source calls its
:class:`RebalanceHandler` when partitions come and go; the handler is pure service
logic (what is drained, what may be committed) and never touches a client.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from .errors import KafkaPermanent
from .records import Message, Outgoing

Partition = tuple[str, int]
"""(topic, partition)."""

Refused = Callable[[BaseException], None]
"""Called with the error when the broker or client refuses a record for good (not retriable)."""


def show(partitions: Sequence[Partition]) -> str:
    """``topic[0], topic[1]`` for log lines."""
    return ", ".join(f"{t}[{p}]" for t, p in sorted(partitions)) or "none"


class OpenTransaction(Protocol):
    """What a source asks of the exactly-once transaction when partitions go
    (:class:`.transactions.Transactions` is the one implementation)."""

    def end_for_revocation(self, drained: bool) -> dict[Partition, int]:
        """Commit the open transaction if ``drained``, else abort it; returns the offsets committed."""
        ...

    def lost(self, partitions: list[Partition]) -> KafkaPermanent:
        """Abort the open transaction and fence the member; returns the failure that ends it."""
        ...


class RebalanceHandler(Protocol):
    """What a source asks of the service when the group moves partitions.

    On revocation a source waits (without blocking its client's IO) until
    :meth:`drained` or ``drain_timeout_s``, commits :meth:`committable`, reports
    what it committed through :meth:`committed`, then calls :meth:`released`.
    Lost partitions (the member was evicted) go straight to :meth:`released` (exactly once, after
    ``transactions.lost`` has aborted the open transaction; its failure goes to :meth:`fail`).
    """

    drain_timeout_s: float

    @property
    def transactions(self) -> OpenTransaction | None:
        """Exactly-once: the open transaction, committed or aborted on revocation; None otherwise."""
        ...

    def drained(self, partitions: Sequence[Partition]) -> bool: ...

    def committable(self, partitions: Sequence[Partition]) -> dict[Partition, int]: ...

    def committed(self, offsets: dict[Partition, int]) -> None: ...

    def released(self, partitions: Sequence[Partition], lost: bool) -> None: ...

    def assigned(self, partitions: Sequence[Partition]) -> None: ...

    def fail(self, failure: KafkaPermanent) -> None:
        """A rebalance step that can never succeed: the service drains and ends the member."""
        ...


class Source(Protocol):
    """A consumer-group member. Every call comes from the service's poll thread.

    ``poll`` raises :class:`~engine_build.errors.BrokerUnavailable` while Kafka is
    away, :class:`~engine_build.errors.KafkaTransient` for errors worth retrying and
    :class:`~engine_build.errors.KafkaPermanent` for those that can never succeed.
    """

    def poll(self, timeout_s: float, max_records: int) -> list[Message]: ...

    def commit(self, offsets: dict[Partition, int], *, wait: bool) -> dict[Partition, int]:
        """Commit ``offsets``; the offsets the broker has accepted by the time it returns (all of them
        when it waits). Without ``wait`` (the periodic commit) a client may return before the broker
        answers: it reports what the broker accepts through :meth:`RebalanceHandler.committed`, and
        raises an error the broker answered at the next commit."""
        ...

    def pause_all(self) -> None: ...

    def resume_all(self) -> None: ...

    def end_offsets(self) -> dict[Partition, int]: ...

    def reachable(self) -> bool: ...

    def missing_topics(self) -> list[str] | None:
        """Subscribed topics the cluster does not have (never created by consuming); None when the
        listing failed (not looked)."""
        ...

    def close(self) -> None: ...


class Sink(Protocol):
    """A producer. ``publish`` retries retriable errors until the broker acknowledges, then calls
    ``on_ack`` (from any thread); ``failing_since`` is set while sends fail. A record the broker
    will never take calls ``on_refused`` instead; with none given (the record is already a dead
    letter), or for an error only the operator can fix (it would refuse every record), the sink sets
    ``failure`` (:class:`~stream.failures.Refusals`), and the service stops the member with it."""

    failing_since: float | None

    @property
    def failure(self) -> KafkaPermanent | None: ...

    def publish(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None = None) -> None: ...

    def flush(self, timeout: float) -> bool: ...

    def pending_retries(self) -> int: ...

    def close(self) -> None: ...


class Connector(Protocol):
    """Makes the service's source and sink (Kafka in production, the fake broker in unit tests)."""

    def source(self, rebalance: RebalanceHandler) -> Source: ...

    def sink(self, on_retry: Callable[[], None]) -> Sink: ...
