"""Plain data that flows through the service, independent of any Kafka client.

:class:`Message` and :class:`Prediction` are what plugins are handed, so they live with the plugin
interface (:mod:`plugins.records`) and are named here too for the service's modules.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from plugins.records import Headers, Message, Prediction

__all__ = ["Headers", "Message", "Prediction", "Outgoing", "dead_letter", "fingerprint"]


@dataclass(frozen=True)
class Outgoing:
    """A record to publish: encoder output or a dead letter.

    ``fallback`` is published instead when the broker refuses this record as too
    large (a dead letter drops oversized input headers, then the original value; see
    :func:`dead_letter`), so a huge bad input can never stall its partition.
    """

    topic: str
    key: bytes | None
    value: bytes | None                # None: a tombstone, kept as one
    headers: Headers
    fallback: Outgoing | None = None
    source: tuple[str, int, int] | None = None
    """The input it answers (topic, partition, offset): names it across a redo, whose result differs."""


HEADER_BUDGET = 64 * 1024
"""Input headers a dead letter's fallbacks keep, in bytes (names and values, in order)."""


def fingerprint(record: Outgoing) -> bytes:
    """What names a record across a redo: the topic and the input it answers (its content where unknown:
    a result's timings differ from one try to the next)."""
    digest = hashlib.blake2b(record.topic.encode(), digest_size=16)
    if record.source is not None:
        digest.update(repr(record.source).encode())
        return digest.digest()
    for part in (record.key or b"", record.value or b""):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def _within_budget(headers: Headers) -> tuple[Headers, list[str]]:
    """The headers that fit :data:`HEADER_BUDGET`, and ``name=bytes`` for each one dropped."""
    kept, dropped, used = [], [], 0
    for name, value in headers:
        size = len(name.encode("utf-8", "replace")) + len(value or b"")
        if used + size <= HEADER_BUDGET:
            kept.append((name, value))
            used += size
        else:
            dropped.append(f"{name}={size}")
    return kept, dropped


def dead_letter(message: Message, topic: str, reason: str, text: str) -> Outgoing:
    """The original key and value (a tombstone's null value stays null), with why it was rejected and
    where it came from.

    Should the broker refuse it as too large, its fallbacks drop the oversized parts and say so:
    first input headers beyond :data:`HEADER_BUDGET` (``error.headers_dropped``: ``name=bytes, ...``;
    only when there are such), then also the value (``error.value_dropped``: its length). An input
    with megabytes of headers thus still ends as a dead letter, never as a member that cannot go on.
    """
    about: Headers = [
        ("error.reason", reason.encode()),
        ("error.message", text.encode("utf-8", "replace")[:1000]),
        ("source.topic", message.topic.encode()),
        ("source.partition", str(message.partition).encode()),
        ("source.offset", str(message.offset).encode()),
    ]
    value = message.value
    kept, dropped = _within_budget(list(message.headers))
    trimmed = kept + about + ([("error.headers_dropped", ", ".join(dropped).encode()[:1000])] if dropped else [])
    source = message.position
    slim = Outgoing(topic, message.key, b"", trimmed + [("error.value_dropped", str(len(value or b"")).encode())],
                    source=source)
    if dropped:
        slim = Outgoing(topic, message.key, value, trimmed, fallback=slim, source=source)
    return Outgoing(topic, message.key, value, list(message.headers) + about, fallback=slim, source=source)
