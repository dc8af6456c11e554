"""The service's one frozen config, declared once: each field carries its flag's help and
choices; the command line and the environment twins (``STREAM_<FIELD>``) are derived
from the fields (:mod:`engine_build.options`, shared with ``python -m engine_build build``),
and every instance is validated when it is made."""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from engine_build.errors import ConfigError
from engine_build.options import Options, check_choices, option
from engine_build.runtime.base import LANE_WORTH_MS

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
# Exactly once: a transaction lives from one commit point to the next (--commit-interval-ms), plus the
# commit point's wait for its unit (--drain-timeout-s), plus the commit itself; this margin covers the
# commit and a late poll loop. A Kafka broker refuses a timeout above its transaction.max.timeout.ms.
TRANSACTION_MARGIN_MS = 20_000
BROKER_TRANSACTION_MAX_MS = 900_000   # transaction.max.timeout.ms, Kafka's default
LEGAL_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")   # what a Kafka broker accepts as a topic name
TOPIC_RULE = "a Kafka topic name is 1 to 249 of a-z, A-Z, 0-9, '.', '_' and '-' (and not '.' or '..')"
# The most each setting may be: past these a client refuses it after the model has loaded (librdkafka's
# ranges: linger.ms, max.poll.interval.ms, message.max.bytes, consume()'s batch; kafka-python's fetch wait
# under its request timeout; Kafka's default group.max.session.timeout.ms), OpenCV refuses the image
# (CV_IO_MAX_IMAGE_PIXELS, 2^30), or the machine cannot give it (a batch of millions of images, a thread
# per image). Times are bounded too: a wait built from them must stay under threading.TIMEOUT_MAX (a
# --max-delay-ms of 1e16 passed and then killed the inference thread), and past these bounds a setting
# only hides a hang (a batch held a minute, a drain or a commit interval past an hour, a stall or a
# failing client noticed after a day).
LIMITS = {"max_batch": 4096, "decode_workers": 1024, "inference_streams": 256, "inference_threads": 1024,
          "fetch_max_wait_ms": 29_000,   # under kafka-python's 30 s request timeout, which it must stay under
          "linger_ms": 900_000, "session_timeout_ms": 1_800_000, "max_poll_interval_ms": 86_400_000,
          "max_message_bytes": 1_000_000_000 - (64 << 10),   # the producer's limit is this plus 64 KiB
          "max_poll_records": 1_000_000, "max_in_flight": 1_000_000, "max_in_flight_bytes": 64 << 30,
          "max_pixels": 1 << 30, "processes": 256, "max_delay_ms": 60_000, "commit_interval_ms": 3_600_000,
          "drain_timeout_s": 3600, "fail_after_s": 86_400, "stall_timeout_s": 86_400}
PEM_MARKS = {"ssl_cafile": b"-----BEGIN CERTIFICATE-----", "ssl_certfile": b"-----BEGIN CERTIFICATE-----",
             "ssl_keyfile": b"PRIVATE KEY-----"}   # what each TLS file must hold (PEM, as both clients read)


def legal_topic(name: str) -> bool:
    """Whether a Kafka broker accepts ``name`` as a topic name (:data:`TOPIC_RULE`)."""
    return bool(LEGAL_TOPIC.fullmatch(name)) and name not in (".", "..")


@dataclass(frozen=True)
class StreamConfig:
    bootstrap_servers: str = option(help="Kafka bootstrap servers, HOST:PORT[,HOST:PORT]")
    input_topic: tuple[str, ...] = option(help="topic to consume (repeat for several; env: comma-separated)",
                                          repeat=True)
    output_topic: str = option(help="topic for one JSON label record per image")
    dead_letter_topic: str = option(help="topic for rejected inputs (original key/value + error.* headers)")
    artifact: Path = option(help="artifact directory made by python -m engine_build build")
    group_id: str = option("sentiment-stream", "consumer group; processes in one group share the partitions")
    backend: str = option("auto", "inference runtime; auto = TensorRT if a usable engine and GPU exist, "
                                  "else OpenVINO, else ONNX Runtime",
                          choices=("auto", "tensorrt", "openvino", "onnxruntime"))
    precision: str | None = option(None, "variant to run (default: fastest that passed its validation gate)",
                                   choices=("fp32", "fp16", "int8"))
    exact_precision: bool = option(False, "make runtimes compute in the file's own precision (no OpenVINO bf16)")
    max_batch: int = option(32, "a batch closes at this many images ...")
    max_delay_ms: float = option(20.0, "... or this long after its first image")
    adaptive_batching: bool = option(True, "a free inference slot runs the open batch at once when no image is "
                                           "queued or decoding (--no-adaptive-batching: always wait for "
                                           "--max-batch or --max-delay-ms)")
    decode_workers: int = option(0, "threads decoding images (0 = auto: one per core this process may use, "
                                    "whether inference runs on them too or on a GPU; measured in "
                                    "docs/performance.md)")
    inference_streams: int = option(0, "inference calls running at once, each forming its own batches with its "
                                       "share of the cores (0 = the runtime chooses: OpenVINO's throughput hint "
                                       "for this CPU, one per core up to 4 on ONNX Runtime, 2 TensorRT contexts; "
                                       "1 = one call on every core; measured in docs/performance.md). On CPU at "
                                       "most one per inference thread: more than --inference-threads is refused "
                                       "with --backend openvino or onnxruntime, and where the runtime grants fewer "
                                       "(auto on a CPU host, OpenVINO's own limit, more than the usable cores) the "
                                       "start-up line says so")
    inference_threads: int = option(0, "CPU threads for inference in all, shared by the streams, at least one "
                                       "each (0 = runtime default: every usable core)")
    latency_lane: bool = option(True, f"with several OpenVINO streams, where a lone image takes {LANE_WORTH_MS:g} ms "
                                      "or more on one (measured at start-up), a batch of at most a quarter of "
                                      "--max-batch that finds every stream idle runs on all the inference threads, "
                                      "so its inference takes about half as long (measured in "
                                      "docs/performance.md), for a second copy of the weights in memory; never in "
                                      "--processes children")
    max_in_flight: int = option(512, "messages in flight before partitions are paused (backpressure)")
    max_in_flight_bytes: int = option(256 * 1024 * 1024, "bytes of input values in flight before partitions are "
                                                          "paused (backpressure, with --max-in-flight); the "
                                                          "consumer fetches a sixteenth of it at once. The "
                                                          "default keeps a backlog of 16 MB photos within 1 GB of "
                                                          "the ready state (measured in the README)")
    input_codec: str = option("raw", "how a message value becomes image bytes (plugins: raw, json, or your own)")
    output_codec: str = option("json", "how a prediction becomes a record (plugins: json, or your own)")
    compression_type: str = option("zstd", "compression of the records the service publishes (zstd: a tenth of "
                                           "the bytes at no measurable producer CPU, python -m "
                                           "benchmarks.publish_codecs; gzip for readers without zstd)",
                                   choices=CODECS)
    unordered: bool = option(False, "publish each result as soon as it is ready instead of in each input "
                                    "partition's offset order (order costs no measurable throughput: see "
                                    "docs/operations.md)")
    max_message_bytes: int = option(20 * 1024 * 1024, "larger values are dead-lettered unread")
    max_pixels: int = option(64_000_000, "images declaring more pixels are dead-lettered before decoding")
    reduced_decode: bool = option(True, "decode a large JPEG at 1/2, 1/4 or 1/8 of its size where that still "
                                        "covers the 256x256 input (--no-reduced-decode: always at full size)")
    commit_interval_ms: float = option(1000.0, "how often acknowledged offsets are committed")
    processing_guarantee: str = option("at-least-once", "at-least-once: a crash can publish a result twice; "
                                       "exactly-once: results, dead letters and offsets commit in one Kafka "
                                       "transaction every --commit-interval-ms (read the output with "
                                       "isolation_level=read_committed)", choices=("at-least-once", "exactly-once"))
    transactional_id: str | None = option(None, "exactly-once: this member's stable transactional id (e.g. the pod "
                                                "name) so a restart aborts its predecessor's open transaction at "
                                                "once; with --processes N, child i uses ID-i (default: a new "
                                                "random id per process)")
    drain_timeout_s: float = option(30.0, "on shutdown or revocation, how long to finish in-flight work")
    fail_after_s: float = option(120.0, "a Kafka client error that is not an outage and keeps failing this long "
                                        "ends the process (exit 1) so its supervisor can restart it")
    stall_timeout_s: float = option(120.0, "work queued and none of it finished for this long while Kafka "
                                           "answers (an inference call that hangs, a sink that retries forever): "
                                           "/healthz fails and the process exits 1, so its supervisor restarts it "
                                           "and the group moves its partitions")
    auto_offset_reset: str = option("earliest", "where a new group starts", choices=("earliest", "latest"))
    max_poll_records: int = option(256, "records fetched per poll")
    fetch_max_wait_ms: int = option(10, "longest the broker holds a fetch waiting for data (kafka-python's 500 "
                                        "ms default set the latency at moderate load)")
    linger_ms: int = option(5, "producer batching window for result records (5 ms: a small share of the "
                               "latency at 80 img/s; lower was not shown to help on this machine)")
    processes: int = option(1, "consumer processes on this host, one group, each with its own backend and "
                               "decode pool; process i serves metrics on --metrics-port + i")
    session_timeout_ms: int = option(10_000, "group session timeout: a dead member's partitions move after "
                                             "this; joining waits about half of it")
    max_poll_interval_ms: int = option(60_000, "rebalance timeout: how long the group waits for every member "
                                               "to rejoin (a member gone mid-rebalance holds the others this "
                                               "long); above --drain-timeout-s, since revocation drains within "
                                               "it; the poll loop never blocks on inference")
    metrics_port: int = option(9108, "Prometheus /metrics, /healthz, /readyz (0 = off)")
    kafka_client: str = option("kafka-python", "Kafka client library: kafka-python (pure Python), or librdkafka "
                                               "(confluent-kafka: pip install 'sentiment-stream[librdkafka]'; "
                                               "a third to an eighth of kafka-python's CPU per record, and the "
                                               "lower latency near full load)",
                               choices=("kafka-python", "librdkafka"))
    assignment_strategy: str = option("range", "how the group shares partitions: range (eager: every rebalance "
                                               "stops every member's partitions) or, with librdkafka, "
                                               "cooperative-sticky (only the partitions that change owner stop); "
                                               "every member of a group must name the same, so change it with "
                                               "the whole group stopped",
                                      choices=("range", "cooperative-sticky"))
    security_protocol: str = option("PLAINTEXT", "Kafka security protocol",
                                    choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"))
    ssl_cafile: str | None = option(None, "CA bundle for TLS")
    ssl_certfile: str | None = option(None, "client certificate for TLS")
    ssl_keyfile: str | None = option(None, "client key for TLS")
    sasl_mechanism: str | None = option(None, "SASL mechanism (user name and password; OAUTHBEARER would need a "
                                        "token provider the service does not take)",
                                        choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"))
    sasl_username: str | None = option(None, "SASL user name")
    sasl_password: str | None = option(None, "SASL password (prefer the environment variable; never printed)",
                                       secret=True)
    log_level: str = option("INFO", "log verbosity (any case)", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_level", str(self.log_level).upper())
        object.__setattr__(self, "input_topic", tuple(self.input_topic))
        object.__setattr__(self, "artifact", Path(self.artifact))
        check_choices(self)
        self._check_numbers()
        self._check_kafka()

    def _check_numbers(self) -> None:
        for name in ("max_batch", "max_in_flight", "max_in_flight_bytes", "max_message_bytes", "max_pixels",
                     "max_poll_records", "session_timeout_ms", "max_poll_interval_ms", "processes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be at least 1")
        for name in ("decode_workers", "inference_streams", "inference_threads", "max_delay_ms", "fetch_max_wait_ms",
                     "linger_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be >= 0")
        for name in ("commit_interval_ms", "drain_timeout_s", "fail_after_s", "stall_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{flag(name)} must be > 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port}: not a port")
        if self.metrics_port and self.metrics_port + self.processes > 65536:
            raise ConfigError(f"--metrics-port {self.metrics_port} with --processes {self.processes}: the children's "
                              f"ports {self.metrics_port}..{self.metrics_port + self.processes - 1} pass 65535")
        for name, most in LIMITS.items():
            if getattr(self, name) > most:
                raise ConfigError(f"{flag(name)} {getattr(self, name)}: at most {most}")
        if self.session_timeout_ms < 1000:
            raise ConfigError("--session-timeout-ms must be at least 1000 (heartbeats go every quarter of it)")
        if self.stall_timeout_s < 1:
            raise ConfigError("--stall-timeout-s must be at least 1: a member is judged stalled only after its "
                              "batches have had time to finish")
        if self.max_poll_interval_ms < self.drain_timeout_s * 1000 + 5000:
            raise ConfigError("--max-poll-interval-ms must exceed --drain-timeout-s by 5 s or more: a revocation "
                              "drains within the group's rebalance timeout")
        if self.max_delay_ms >= self.stall_timeout_s * 1000:
            raise ConfigError("--max-delay-ms must be below --stall-timeout-s: a batch held that long finishes "
                              "nothing, and the member would be judged stalled")
        # a CPU backend named: with auto a GPU host runs TensorRT (streams are GPU contexts), a CPU one caps the
        # streams at the threads and says so in the start-up line
        if 0 < self.inference_threads < self.inference_streams and self.backend in ("openvino", "onnxruntime"):
            raise ConfigError(f"--inference-streams {self.inference_streams} with --inference-threads "
                              f"{self.inference_threads}: each stream needs an inference thread of its own (the "
                              f"streams share the threads); ask for fewer streams or more threads")
        if self.max_in_flight < self.max_batch:
            raise ConfigError("--max-in-flight must be at least --max-batch")
        if self.processing_guarantee == "exactly-once" and self.transaction_timeout_ms() > BROKER_TRANSACTION_MAX_MS:
            raise ConfigError(f"exactly-once: --commit-interval-ms + --drain-timeout-s + "
                              f"{TRANSACTION_MARGIN_MS // 1000} s is the transaction timeout and must stay within "
                              f"the broker's transaction.max.timeout.ms ({BROKER_TRANSACTION_MAX_MS // 1000} s)")

    def _check_kafka(self) -> None:
        for server in self.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or any(c.isspace() for c in host) or "/" in host or not port.isdigit() \
                    or not 0 < int(port) < 65536:
                raise ConfigError(f"--bootstrap-servers {self.bootstrap_servers!r}: expected HOST:PORT[,HOST:PORT]")
        if not self.input_topic or not all(self.input_topic):
            raise ConfigError("--input-topic: at least one topic name")
        for name, topics in (("input_topic", self.input_topic), ("output_topic", (self.output_topic,)),
                             ("dead_letter_topic", (self.dead_letter_topic,))):
            for topic in topics:
                if not legal_topic(topic):
                    raise ConfigError(f"{flag(name)} {topic!r}: {TOPIC_RULE}")
        if self.output_topic in self.input_topic or self.dead_letter_topic in self.input_topic:
            raise ConfigError("the output and dead-letter topics must differ from the input topics")
        if self.output_topic == self.dead_letter_topic:
            raise ConfigError("--output-topic and --dead-letter-topic must differ: a reader could not tell a result "
                              "from a dead letter")
        if self.assignment_strategy == "cooperative-sticky" and self.kafka_client != "librdkafka":
            raise ConfigError("--assignment-strategy cooperative-sticky needs --kafka-client librdkafka "
                              "(kafka-python has no cooperative rebalancing)")
        if self.transactional_id and self.processing_guarantee != "exactly-once":
            raise ConfigError("--transactional-id would be ignored without --processing-guarantee exactly-once")
        self._check_unused_security()
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ConfigError(f"--security-protocol {self.security_protocol} needs --sasl-mechanism")
        if self.sasl_mechanism and not (self.sasl_username and self.sasl_password):
            raise ConfigError(f"--sasl-mechanism {self.sasl_mechanism} needs --sasl-username and --sasl-password "
                              f"(or STREAM_SASL_PASSWORD)")
        for name, mark in PEM_MARKS.items():
            path = getattr(self, name)
            if path is None:
                continue
            if not Path(path).is_file():
                raise ConfigError(f"{flag(name)} {path}: no such file")
            try:
                pem = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"{flag(name)} {path}: cannot be read ({exc.strerror})") from exc
            if mark not in pem:
                raise ConfigError(f"{flag(name)} {path}: no {mark.decode().strip('-')} in it (a PEM file)")

    def _check_unused_security(self) -> None:
        """SASL or TLS settings the chosen protocol would silently ignore (the client never uses them)."""
        for prefix, needs in (("sasl_", ("SASL_PLAINTEXT", "SASL_SSL")), ("ssl_", ("SSL", "SASL_SSL"))):
            given = [flag(f.name) for f in fields(self) if f.name.startswith(prefix) and getattr(self, f.name)]
            if given and self.security_protocol not in needs:
                raise ConfigError(f"{', '.join(given)} would be ignored under --security-protocol "
                                  f"{self.security_protocol}: use {' or '.join(needs)}")

    def transaction_timeout_ms(self) -> int:
        """Exactly once: how long the coordinator lets a transaction stay open, derived so that it
        outlasts a commit interval plus the commit point's whole wait (with a margin); a shorter one
        lets the coordinator abort a unit the member is still waiting to commit."""
        return int(self.commit_interval_ms + self.drain_timeout_s * 1000) + TRANSACTION_MARGIN_MS

    def client_options(self) -> dict[str, Any]:
        """TLS/SASL settings for both Kafka clients (only those that are set)."""
        options = {"security_protocol": self.security_protocol, "ssl_cafile": self.ssl_cafile,
                   "ssl_certfile": self.ssl_certfile, "ssl_keyfile": self.ssl_keyfile,
                   "sasl_mechanism": self.sasl_mechanism, "sasl_plain_username": self.sasl_username,
                   "sasl_plain_password": self.sasl_password}
        return {k: v for k, v in options.items() if v is not None}


OPTIONS = Options(StreamConfig, "STREAM_")


def flag(name: str) -> str:
    return OPTIONS.flag(name)


def env_name(name: str) -> str:
    return OPTIONS.env_name(name)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per config field; a flag not given falls back to its environment twin, then the default."""
    return OPTIONS.parser(prog, description)


def from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> StreamConfig:
    """The config from parsed flags, then environment twins, then defaults (validated)."""
    return OPTIONS.from_args(args, environ)


def auto_decode_workers(cores: int) -> int:
    """Decode threads for ``--decode-workers 0``: one per core this process may use, whether inference
    runs on a GPU or on the same cores. Threads share the cores by demand, so a decoder with nothing
    to decode costs nothing, while too few starve inference: one decoder among two busy inference
    threads gets about a third of two cores, and decoding is 0.38 of the work once INT8 inference
    costs 1.7 core-ms an image (decode 1.05; 2026-12-07, 2-core Xeon with AMX). There two decoders
    drained a 6,000-image backlog at 574 and 592 img/s against one's 480 and 491 (alternating runs),
    and took p99 latency at half the budget from 1,464 ms to 302 ms. Half the cores, the rule before,
    was measured when inference cost 4.0 core-ms (1.1 % better than one per core then): a rule
    tuned to one cost ratio. Counted per process: ``--inference-threads`` does not change it."""
    return max(1, cores)


def markdown_table() -> str:
    """The README's configuration table, made from the fields (a test keeps the README equal to it)."""
    return OPTIONS.markdown_table()
