"""The composition root: every collaborator of the service built in one place, from the config.

:func:`build` picks the Kafka connector, loads the plugins, opens the artifact and starts the
health server, then hands them all to a :class:`~.service.Service`, which only runs. Tests
and benchmarks hand in what they replace (a fake broker's connector, a stand-in model, a
decoder, a core count) instead of patching modules.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import TYPE_CHECKING

import plugins
from engine_build.artifact import Selection, open_artifact
from engine_build.errors import ConfigError
from engine_build.imaging import DecodeLimits, decode
from engine_build.manifest import Manifest
from engine_build.runtime.base import Backend
from engine_build.runtime.cpu import usable_cores

from .config import StreamConfig, auto_decode_workers
from .metrics import HealthServer, Metrics
from .offsets import OffsetTracker
from .pipeline import Decoder, PipelineConfig
from .ports import Connector
from .service import DEAD_LETTER_REPORT_S, Service

if TYPE_CHECKING:
    from plugins.codecs import InputCodec
    from plugins.encoders import OutputEncoder

log = logging.getLogger(__name__)
Model = tuple[Manifest, Selection, Backend]   # what :func:`open_artifact` returns


def connector_for(cfg: StreamConfig) -> Connector:
    """The Kafka client ``cfg.kafka_client`` names, behind the service's ports."""
    if cfg.kafka_client == "librdkafka":
        from .rdkafka_io import RdKafkaConnector
        return RdKafkaConnector(cfg)
    from .kafka_io import KafkaConnector
    return KafkaConnector(cfg)


def open_model(cfg: StreamConfig) -> Model:
    """The artifact opened with the runtime, precision, batch and threads the config asks for."""
    return open_artifact(cfg.artifact, cfg.backend, cfg.precision, cfg.exact_precision, cfg.max_batch,
                         threads=cfg.inference_threads or None, streams=cfg.inference_streams,
                         latency_lane=cfg.latency_lane)


def pipeline_config(cfg: StreamConfig, backend: Backend, cores: int) -> PipelineConfig:
    """The processor's settings; ``cores``: the usable cores, for the automatic decode-worker count."""
    decoders = cfg.decode_workers or auto_decode_workers(cores)
    return PipelineConfig(cfg.output_topic, cfg.dead_letter_topic, cfg.max_batch, cfg.max_delay_ms,
                          decoders, cfg.adaptive_batching,
                          DecodeLimits(cfg.max_message_bytes, cfg.max_pixels, cfg.reduced_decode),
                          keep_order=not cfg.unordered)


def build(cfg: StreamConfig, *, connector: Connector | None = None, model: Model | None = None,
          metrics: Metrics | None = None, tracker: OffsetTracker | None = None, codec: InputCodec | None = None,
          encoder: OutputEncoder | None = None, decoder: Decoder = decode, cores: int | None = None,
          dead_letter_report_s: float = DEAD_LETTER_REPORT_S) -> Service:
    """The service for ``cfg``, ready to run. Everything not handed in is made from the config:
    the connector by ``cfg.kafka_client``, the codec and encoder plugins, the ``model`` by opening
    ``cfg.artifact``, ``cores`` by :func:`usable_cores`. Everything that can be wrong with the
    artifact, the plugins or the metrics port fails here (a :class:`ConfigError`), before anything
    is consumed; what was opened by then is closed again."""
    metrics = metrics or Metrics()
    connector = connector or connector_for(cfg)
    codec = codec or plugins.load(plugins.INPUT_GROUP, cfg.input_codec)
    encoder = encoder or plugins.load(plugins.OUTPUT_GROUP, cfg.output_codec)
    opened = model is None
    model = model or open_model(cfg)
    with ExitStack() as undo:   # closes what was opened here if the rest fails (a model handed in is the caller's)
        if opened:
            undo.callback(model[2].close)
        try:
            health = HealthServer(metrics, cfg.metrics_port).start() if cfg.metrics_port else None
        except OSError as exc:
            raise ConfigError(f"--metrics-port {cfg.metrics_port}: {exc.strerror or exc}") from exc
        if health is not None:
            undo.callback(health.close)
        pipeline = pipeline_config(cfg, model[2], usable_cores() if cores is None else cores)
        undo.pop_all()
    return Service(cfg, connector, model, codec, encoder, pipeline, metrics=metrics, tracker=tracker or OffsetTracker(),
                   health=health, decoder=decoder, dead_letter_report_s=dead_letter_report_s)
