"""``python -m stream.topics``: list and create the service's topics with kafka-python's admin client, and
publish image files to a topic or read one back, so a machine with only this project on it needs no Kafka
command-line tools.

    python -m stream.topics --bootstrap-servers HOST:PORT list
    python -m stream.topics --bootstrap-servers HOST:PORT create TOPIC [TOPIC ...] --partitions N
                            [--replication-factor R]
    python -m stream.topics --bootstrap-servers HOST:PORT publish TOPIC FILE [FILE ...]
    python -m stream.topics --bootstrap-servers HOST:PORT read TOPIC [--max N] [--idle-s S]

TLS and SASL take the service's flags and environment twins (``--security-protocol``,
``STREAM_SASL_PASSWORD``, ...). Creating a topic that exists says so and is not an error.
Existence is decided by listing the cluster's topics, never by a request that could create one;
``publish`` and ``read`` refuse a topic that does not exist (a client asking for it could create it).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from engine_build.errors import ConfigError, SentimentError
from engine_build.options import OptionParser

from .config import TOPIC_RULE, StreamConfig, env_name, flag, legal_topic
from .errors import kafka_errors

SECURITY = ("security_protocol", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_mechanism", "sasl_username",
            "sasl_password")
CLIENT_NAMES = {"sasl_username": "sasl_plain_username", "sasl_password": "sasl_plain_password"}
TIMEOUT_MS = 15_000



def parser() -> argparse.ArgumentParser:
    p = OptionParser(prog="python -m stream.topics", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap-servers", help=f"Kafka bootstrap servers, HOST:PORT[,HOST:PORT] "
                                               f"[env {env_name('bootstrap_servers')}]")
    for f in fields(StreamConfig):
        if f.name in SECURITY:
            p.add_argument(flag(f.name), choices=f.metadata["choices"],
                           help=f"{f.metadata['help']} [env {env_name(f.name)}]")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="every topic and its partition count")
    c = sub.add_parser("create", help="create topics (an existing one is left as it is)")
    c.add_argument("topics", nargs="+", metavar="TOPIC", help="names of the topics to create")
    c.add_argument("--partitions", type=int, required=True, help="partitions of each new topic")
    c.add_argument("--replication-factor", type=int, default=-1,
                   help="replicas of each partition (default: the broker's default)")
    pub = sub.add_parser("publish", help="publish files to a topic, one record each (key: the file name)")
    pub.add_argument("topic", help="the topic to publish to (it must exist)")
    pub.add_argument("files", nargs="+", type=Path, metavar="FILE", help="files, one record each")
    r = sub.add_parser("read", help="print a topic's records from the start: key, then the value or its headers")
    r.add_argument("topic", help="the topic to read (it must exist)")
    r.add_argument("--max", type=int, default=0, help="stop after this many records (default: when idle)")
    r.add_argument("--idle-s", type=float, default=5.0, help="stop when no record came for this long (default 5)")
    return p


def client_options(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, Any]:
    """bootstrap_servers and the TLS/SASL settings from the flags, then their environment twins."""
    def value(name: str) -> Any:
        given = getattr(args, name)
        return given if given is not None else environ.get(env_name(name))
    servers = value("bootstrap_servers")
    if not servers:
        raise ConfigError(f"missing --bootstrap-servers (or {env_name('bootstrap_servers')})")
    options: dict[str, Any] = {"bootstrap_servers": servers}
    for name in SECURITY:
        if value(name) is not None:
            options[CLIENT_NAMES.get(name, name)] = value(name)
    if str(options.get("security_protocol", "")).startswith("SASL") and "sasl_mechanism" not in options:
        raise ConfigError(f"--security-protocol {options['security_protocol']} needs --sasl-mechanism")
    return options


def partition_counts(admin: Any) -> dict[str, int]:
    """Every topic of the cluster and its partitions, by listing (a request that creates nothing)."""
    return {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}


def create(admin: Any, topics: list[str], partitions: int, replication_factor: int) -> list[str]:
    """Create the topics that do not exist; one line per topic saying what happened."""
    existing = partition_counts(admin)
    lines = [f"{name}: exists ({existing[name]} partitions), left as it is" for name in topics if name in existing]
    new = {name: {"num_partitions": partitions, "replication_factor": replication_factor}
           for name in dict.fromkeys(topics) if name not in existing}
    if new:
        admin.create_topics(new, timeout_ms=TIMEOUT_MS)
        lines += [f"{name}: created with {partitions} partitions" for name in new]
    return lines


def _existing(admin: Any, topic: str) -> None:
    if topic not in partition_counts(admin):
        raise ConfigError(f"topic '{topic}' does not exist (create it first: python -m stream.topics ... create)")


def publish(options: dict[str, Any], topic: str, files: list[Path]) -> int:
    """Each file's bytes as one record, its name as the key; every send acknowledged (acks=all)."""
    from kafka import KafkaProducer
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{missing[0]}: no such file")
    producer = KafkaProducer(acks="all", request_timeout_ms=TIMEOUT_MS, **options)
    try:
        sent = [producer.send(topic, key=f.name.encode(), value=f.read_bytes()) for f in files]
        for future in sent:
            future.get(timeout=TIMEOUT_MS / 1000)
    finally:
        producer.close(timeout=TIMEOUT_MS / 1000)
    return len(sent)


def _shown(record: Any) -> str:
    key = record.key.decode(errors="replace") if record.key else "-"
    headers = {k: (v or b"").decode(errors="replace") for k, v in record.headers or []}
    if "error.reason" in headers:
        return f"{key}\tdead letter: {headers['error.reason']}: {headers.get('error.message', '')}"
    try:
        return f"{key}\t{record.value.decode()}"
    except (AttributeError, UnicodeDecodeError):
        return f"{key}\t<{len(record.value or b'')} bytes>"


def read(options: dict[str, Any], topic: str, most: int, idle_s: float) -> int:
    """Print the topic's records from the beginning (no consumer group) until ``most`` or ``idle_s`` idle."""
    from kafka import KafkaConsumer
    consumer = KafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=int(idle_s * 1000), **options)
    count = 0
    try:
        for record in consumer:
            print(_shown(record), flush=True)
            count += 1
            if most and count >= most:
                break
    finally:
        consumer.close()
    return count


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    try:
        args = parser().parse_args(argv)
        options = client_options(args, environ)
        _check(args)
        # the client's own errors (NoBrokersAvailable, TopicAuthorizationFailed, ...) as the project's
        with kafka_errors(options["bootstrap_servers"]):
            _run(args, options)
    except SentimentError as exc:
        print(f"stream.topics: error: {exc}", file=sys.stderr)
        return 1
    return 0


MAX_PARTITIONS = 10_000   # far past any topic this service reads; a broker given millions dies (tansu did)


def _check(args: argparse.Namespace) -> None:
    """The arguments' own mistakes, in one line, before any request."""
    topics = args.topics if args.command == "create" else [getattr(args, "topic", None)]
    for topic in topics:
        if topic is not None and not legal_topic(topic):
            raise ConfigError(f"{topic!r}: {TOPIC_RULE}")
    if args.command == "create":
        if not 1 <= args.partitions <= MAX_PARTITIONS:
            raise ConfigError(f"--partitions {args.partitions}: from 1 to {MAX_PARTITIONS}")
        if args.replication_factor == 0 or args.replication_factor < -1:
            raise ConfigError(f"--replication-factor {args.replication_factor}: at least 1 (or -1, the broker's "
                              f"default)")
    if args.command == "read" and (not math.isfinite(args.idle_s) or args.idle_s <= 0 or args.max < 0):
        raise ConfigError("read: --idle-s must be a number above 0 and --max 0 or more")


def _run(args: argparse.Namespace, options: dict[str, Any]) -> None:
    from kafka.admin import KafkaAdminClient
    admin = KafkaAdminClient(client_id="sentiment-topics", request_timeout_ms=TIMEOUT_MS, **options)
    try:
        if args.command == "list":
            counts = partition_counts(admin)
            for name in sorted(counts):
                print(f"{name}\t{counts[name]} partitions")
        elif args.command == "create":
            for line in create(admin, args.topics, args.partitions, args.replication_factor):
                print(line)
        else:
            _existing(admin, args.topic)
    finally:
        admin.close()
    if args.command == "publish":
        print(f"published {publish(options, args.topic, args.files)} file(s) to '{args.topic}'")
    elif args.command == "read":
        count = read(options, args.topic, args.max, args.idle_s)
        print(f"read {count} record(s) from '{args.topic}'", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
