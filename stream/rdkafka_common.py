"""What librdkafka's source and sink (:mod:`.rdkafka_io`, :mod:`.rdkafka_sink`) share: librdkafka's own log
kept quiet, the TLS/SASL settings in its names, and offsets in its form."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .ports import Partition

if TYPE_CHECKING:
    from .config import StreamConfig

# librdkafka's own log, through logging, critical lines only: at its default level it writes a line for every
# failed reconnect while the broker is away (the service says that once); errors reach the service as events
QUIET: dict[str, Any] = {"logger": logging.getLogger("stream.librdkafka"), "log_level": 2}


def _not_gapless_fatal(record: logging.LogRecord) -> bool:
    """librdkafka logs the fatal error that keeps its gapless guarantee as an emergency; to the sink it is a
    refused batch, which it says itself (a warning), so it is left out here."""
    return "Gap-less ordering would not be guaranteed" not in record.getMessage()


QUIET["logger"].addFilter(_not_gapless_fatal)


def client_settings(cfg: StreamConfig) -> dict[str, Any]:
    """librdkafka's names for the TLS/SASL settings of ``cfg`` (only those that are set)."""
    options = {"security.protocol": cfg.security_protocol.lower(), "ssl.ca.location": cfg.ssl_cafile,
               "ssl.certificate.location": cfg.ssl_certfile, "ssl.key.location": cfg.ssl_keyfile,
               "sasl.mechanism": cfg.sasl_mechanism, "sasl.username": cfg.sasl_username,
               "sasl.password": cfg.sasl_password}
    return {k: v for k, v in options.items() if v is not None}


def topic_partitions(offsets: dict[Partition, int]) -> list[Any]:
    from confluent_kafka import TopicPartition
    return [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
