"""Plain data that flows through the service, independent of any Kafka client.

:class:`Message` and :class:`Prediction` are what plugins are handed, so they live with the plugin
interface (:mod:`plugins.records`) and are named here too for the service's modules.
"""
from __future__ import annotations

from dataclasses import dataclass

from plugins.records import Headers, Message, Prediction

__all__ = ["Headers", "Message", "Prediction", "Outgoing", "dead_letter"]


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
