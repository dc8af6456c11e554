"""The Kafka branch of the project's one error tree.

    SentimentError (engine_build.errors)
    ├── UserError
    │   └── KafkaPermanent      a Kafka error that can never succeed (unsupported codec, authorisation,
    │                           corrupt batch, fenced producer); the service drains and exits
    ├── BrokerUnavailable       Kafka cannot be reached right now; the service retries and is not ready
    └── KafkaTransient          a Kafka client error worth retrying that is not an outage; retried with
                                backoff, fatal if it lasts past --fail-after-s

Client exceptions are translated into these where the connectors call the clients.
"""
from __future__ import annotations

from engine_build.errors import SentimentError, UserError


class BrokerUnavailable(SentimentError):
    """Kafka is unreachable; the service keeps retrying with backoff and reports not-ready."""


class KafkaTransient(SentimentError):
    """A Kafka client error worth retrying that is not an outage (the brokers answer)."""


class KafkaPermanent(UserError):
    """A Kafka client error that retrying cannot fix; the message says what to do."""
