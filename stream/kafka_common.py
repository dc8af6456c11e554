"""What the Kafka connectors share: reaching the brokers, the read isolation, the fetch size, the line that
says which output topics existed and which were made, the client timeout, the drain's step and the bound on the
transaction calls; and kafka-python's form of the project's offsets, for its source and sink.

Client errors leave here as the project's own, through :func:`.errors.kafka_errors`.
"""
from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import BrokerUnavailable, kafka_errors
from .ports import Partition

CLIENT_TIMEOUT_MS = 5_000   # commit, metadata and close: shutdown must end even with the broker gone
CLIENT_TIMEOUT_S = CLIENT_TIMEOUT_MS / 1000
DRAIN_STEP_S = 0.02   # how often a revocation's drain looks whether the revoked work is done
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


def fetch_bytes(max_in_flight_bytes: int) -> int:
    """The consumer's fetch size for a byte budget: a sixteenth of it, between 1 MiB and kafka-python's
    default of 50 MiB. A record larger than it is still fetched, alone. Small, because a fetched
    response costs several times its size on its way to the pipeline (the response, the parsed batch,
    each record's value), once for each partition fetched at the same time, and a poll may add it on
    top of the budget."""
    return max(1 << 20, min(50 << 20, max_in_flight_bytes // 16))


def kafka_offsets(offsets: dict[Partition, int]) -> dict[Any, Any]:
    """The project's offsets as kafka-python takes them (a commit, a transaction's offsets)."""
    from kafka import OffsetAndMetadata, TopicPartition
    extra = ("", -1) if len(OffsetAndMetadata._fields) == 3 else ("",)
    return {TopicPartition(t, p): OffsetAndMetadata(o, *extra) for (t, p), o in offsets.items()}


def output_topics_line(wanted: dict[str, str], missing: list[str], partitions: int) -> str:
    """One line saying which of the ``wanted`` topics (by kind) existed and which were made."""
    return "; ".join(f"{kind} topic {name!r} " + (f"created with {partitions} partitions" if name in missing
                                                   else "exists") for kind, name in wanted.items())
