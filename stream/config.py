"""The service's one frozen config; every flag has an environment twin, declared once here."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from engine_build.errors import ConfigError


@dataclass(frozen=True)
class Option:
    flag: str
    type: type = str
    default: object = None
    help: str = ""
    required: bool = False
    repeat: bool = False
    secret: bool = False
    choices: tuple | None = None
    switch: bool = False

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return "STREAM_" + self.dest.upper()


OPTIONS = [
    Option("--bootstrap-servers", help="Kafka bootstrap servers, HOST:PORT[,HOST:PORT]", required=True),
    Option("--input-topic", help="topic to consume (repeat for several; env: comma-separated)", required=True, repeat=True),
    Option("--output-topic", help="topic for one JSON label record per image", required=True),
    Option("--dead-letter-topic", help="topic for rejected inputs (original key/value + error.* headers)", required=True),
    Option("--group-id", default="sentiment-stream", help="consumer group; processes in one group share the partitions"),
    Option("--artifact", type=Path, help="artifact directory made by python -m engine_build build", required=True),
    Option("--backend", default="auto", choices=("auto", "tensorrt", "openvino", "onnxruntime"),
           help="inference runtime; auto = TensorRT if a usable engine and GPU exist, else OpenVINO, else ONNX Runtime"),
    Option("--precision", choices=("fp32", "fp16", "int8"), help="variant to run (default: fastest that passed its validation gate)"),
    Option("--exact-precision", switch=True, default=False,
           help="make runtimes compute in the file's own precision (no OpenVINO bf16)"),
    Option("--max-batch", type=int, default=32, help="a batch closes at this many images ..."),
    Option("--max-delay-ms", type=float, default=20.0, help="... or this long after its first image"),
    Option("--decode-workers", type=int, default=max(1, os.cpu_count() or 1), help="threads decoding images"),
    Option("--inference-threads", type=int, default=0, help="CPU threads per inference call (0 = runtime default)"),
    Option("--max-in-flight", type=int, default=512, help="messages in flight before partitions are paused (backpressure)"),
    Option("--input-codec", default="raw", help="how a message value becomes image bytes (plugins: raw, json, or your own)"),
    Option("--output-codec", default="json", help="how a prediction becomes a record (plugins: json, or your own)"),
    Option("--max-message-bytes", type=int, default=20 * 1024 * 1024, help="larger values are dead-lettered unread"),
    Option("--max-pixels", type=int, default=64_000_000, help="images declaring more pixels are dead-lettered before decoding"),
    Option("--no-reduced-decode", switch=True, default=False, help="always decode JPEGs at full size"),
    Option("--commit-interval-ms", type=float, default=1000.0, help="how often acknowledged offsets are committed"),
    Option("--drain-timeout-s", type=float, default=30.0, help="on shutdown or revocation, how long to finish in-flight work"),
    Option("--auto-offset-reset", default="earliest", choices=("earliest", "latest"), help="where a new group starts"),
    Option("--max-poll-records", type=int, default=256, help="records fetched per poll"),
    Option("--session-timeout-ms", type=int, default=10_000,
           help="group session timeout: a dead member's partitions move after this; joining waits about half of it"),
    Option("--max-poll-interval-ms", type=int, default=300_000,
           help="rebalance timeout; the poll loop never blocks on inference, so it is not reached in normal work"),
    Option("--metrics-port", type=int, default=9108, help="Prometheus /metrics, /healthz, /readyz (0 = off)"),
    Option("--security-protocol", default="PLAINTEXT", choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
           help="Kafka security protocol"),
    Option("--ssl-cafile", help="CA bundle for TLS"),
    Option("--ssl-certfile", help="client certificate for TLS"),
    Option("--ssl-keyfile", help="client key for TLS"),
    Option("--sasl-mechanism", choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"), help="SASL mechanism"),
    Option("--sasl-username", help="SASL user name"),
    Option("--sasl-password", help="SASL password (prefer the environment variable; never printed)", secret=True),
    Option("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log verbosity"),
]


@dataclass(frozen=True)
class StreamConfig:
    bootstrap_servers: str
    input_topic: tuple[str, ...]
    output_topic: str
    dead_letter_topic: str
    artifact: Path
    group_id: str = "sentiment-stream"
    backend: str = "auto"
    precision: str | None = None
    exact_precision: bool = False
    max_batch: int = 32
    max_delay_ms: float = 20.0
    decode_workers: int = 2
    inference_threads: int = 0
    max_in_flight: int = 512
    input_codec: str = "raw"
    output_codec: str = "json"
    max_message_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 64_000_000
    no_reduced_decode: bool = False
    commit_interval_ms: float = 1000.0
    drain_timeout_s: float = 30.0
    auto_offset_reset: str = "earliest"
    max_poll_records: int = 256
    session_timeout_ms: int = 10_000
    max_poll_interval_ms: int = 300_000
    metrics_port: int = 9108
    security_protocol: str = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    log_level: str = "INFO"

    def client_options(self) -> dict:
        """TLS/SASL settings for both Kafka clients (only those that are set)."""
        options = {"security_protocol": self.security_protocol, "ssl_cafile": self.ssl_cafile,
                   "ssl_certfile": self.ssl_certfile, "ssl_keyfile": self.ssl_keyfile,
                   "sasl_mechanism": self.sasl_mechanism, "sasl_plain_username": self.sasl_username,
                   "sasl_plain_password": self.sasl_password}
        return {k: v for k, v in options.items() if v is not None}

    def validate(self) -> "StreamConfig":
        for name in ("max_batch", "decode_workers", "max_in_flight", "max_message_bytes", "max_pixels", "max_poll_records",
                     "session_timeout_ms", "max_poll_interval_ms"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_delay_ms < 0 or self.commit_interval_ms <= 0 or self.drain_timeout_s <= 0:
            raise ConfigError("--max-delay-ms must be >= 0; --commit-interval-ms and --drain-timeout-s > 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port}: not a port")
        if self.max_in_flight < self.max_batch:
            raise ConfigError("--max-in-flight must be at least --max-batch")
        if self.output_topic in self.input_topic or self.dead_letter_topic in self.input_topic:
            raise ConfigError("the output and dead-letter topics must differ from the input topics")
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ConfigError(f"--security-protocol {self.security_protocol} needs --sasl-mechanism")
        return self


def _typed(option: Option, text: str):
    if option.switch:
        return text.strip().lower() in ("1", "true", "yes", "on")
    if option.repeat:
        return [t.strip() for t in text.split(",") if t.strip()]
    try:
        return option.type(text)
    except ValueError:
        raise ConfigError(f"{option.env}={text!r}: expected {option.type.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser, environ: dict) -> None:
    for option in OPTIONS:
        default = _typed(option, environ[option.env]) if option.env in environ else option.default
        text = f"{option.help} [env {option.env}" + (f"; default {option.default}" if option.default not in (None, False) else "") + "]"
        if option.switch:
            parser.add_argument(option.flag, action="store_true", default=default, help=text)
        elif option.repeat:
            parser.add_argument(option.flag, action="append", default=None, help=text, metavar=option.dest.upper())
        else:
            parser.add_argument(option.flag, type=option.type, default=default, choices=option.choices, help=text,
                                metavar=option.dest.upper() if not option.choices else None)
    parser.set_defaults(_environ=environ)


def from_namespace(args: argparse.Namespace) -> StreamConfig:
    environ = args._environ
    values = {}
    for option in OPTIONS:
        value = getattr(args, option.dest)
        if option.repeat and value is None and option.env in environ:
            value = _typed(option, environ[option.env])
        if option.required and not value:
            raise ConfigError(f"missing {option.flag} (or {option.env})")
        if option.choices and value is not None and value not in option.choices:
            raise ConfigError(f"{option.env}={value}: choose from {', '.join(option.choices)}")
        values[option.dest] = tuple(value) if option.repeat else value
    known = {f.name for f in fields(StreamConfig)}
    return StreamConfig(**{k: v for k, v in values.items() if k in known}).validate()
