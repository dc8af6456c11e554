"""The records a plugin is handed: one input message, and the model's prediction for it.

They belong to the plugin interface (an output encoder turns a :class:`Prediction` into the
record to publish); the service (:mod:`stream`) makes them from whatever its broker delivers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

Headers = list[tuple[str, bytes | None]]
"""A record's headers: Kafka allows a null value (a Java producer's ``headers.add(key, null)``)."""


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
    # why the client could not read its headers (then ``headers`` is empty, and the service dead-letters it)
    unreadable_headers: str | None = None

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
