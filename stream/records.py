"""Plain data that flows through the service, independent of any Kafka client."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Message:
    """One input record, as any source (Kafka or the fake broker) delivers it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)
    timestamp_ms: int | None = None
    received: float = field(default_factory=time.monotonic)

    @property
    def position(self) -> tuple[str, int, int]:
        return self.topic, self.partition, self.offset


@dataclass
class Prediction:
    """The model's answer for one message, handed to the output encoder."""

    message: Message
    probs: np.ndarray                  # [2]: negative, positive
    metadata: dict                     # pass-through from the input codec
    timing_ms: dict[str, float]
    model: dict                        # name, sha256, precision, placeholder


@dataclass(frozen=True)
class Outgoing:
    """A record to publish: encoder output or a dead letter.

    ``fallback`` is published instead when the broker refuses this record as too
    large (a dead letter keeps its headers and drops the original value), so a huge
    bad input can never stall its partition.
    """

    topic: str
    key: bytes | None
    value: bytes | None                # None: a tombstone, kept as one
    headers: Headers
    fallback: Outgoing | None = None


def dead_letter(message: Message, topic: str, reason: str, text: str) -> Outgoing:
    """The original key and value (a tombstone's null value stays null), with why it was rejected and
    where it came from."""
    headers = list(message.headers) + [
        ("error.reason", reason.encode()),
        ("error.message", text.encode("utf-8", "replace")[:1000]),
        ("source.topic", message.topic.encode()),
        ("source.partition", str(message.partition).encode()),
        ("source.offset", str(message.offset).encode()),
    ]
    dropped = str(len(message.value or b"")).encode()
    slim = Outgoing(topic, message.key, b"", headers + [("error.value_dropped", dropped)])
    return Outgoing(topic, message.key, message.value, headers, fallback=slim)
