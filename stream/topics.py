"""``python -m stream.topics``: list and create the service's topics with kafka-python's admin client, so a
machine with only this project on it needs no Kafka command-line tools.

    python -m stream.topics --bootstrap-servers HOST:PORT list
    python -m stream.topics --bootstrap-servers HOST:PORT create TOPIC [TOPIC ...] --partitions N
                            [--replication-factor R]

TLS and SASL take the service's flags and environment twins (``--security-protocol``,
``STREAM_SASL_PASSWORD``, ...). Creating a topic that exists says so and is not an error.
Existence is decided by listing the cluster's topics, never by a request that could create one.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Any

from engine_build.errors import ConfigError, UserError

from .config import StreamConfig, _Parser, env_name, flag

SECURITY = ("security_protocol", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_mechanism", "sasl_username",
            "sasl_password")
CLIENT_NAMES = {"sasl_username": "sasl_plain_username", "sasl_password": "sasl_plain_password"}
TIMEOUT_MS = 15_000



def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m stream.topics", description=__doc__,
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
    c.add_argument("topics", nargs="+", metavar="TOPIC")
    c.add_argument("--partitions", type=int, required=True, help="partitions of each new topic")
    c.add_argument("--replication-factor", type=int, default=-1,
                   help="replicas of each partition (default: the broker's default)")
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


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    from kafka.errors import KafkaError
    environ = dict(os.environ if environ is None else environ)
    try:
        args = parser().parse_args(argv)
        options = client_options(args, environ)
        if args.command == "create" and args.partitions < 1:
            raise ConfigError(f"--partitions {args.partitions}: must be at least 1")
        from kafka.admin import KafkaAdminClient
        admin = KafkaAdminClient(client_id="sentiment-topics", request_timeout_ms=TIMEOUT_MS, **options)
        try:
            if args.command == "list":
                counts = partition_counts(admin)
                for name in sorted(counts):
                    print(f"{name}\t{counts[name]} partitions")
            else:
                for line in create(admin, args.topics, args.partitions, args.replication_factor):
                    print(line)
        finally:
            admin.close()
    except UserError as exc:
        print(f"stream.topics: error: {exc}", file=sys.stderr)
        return 1
    except KafkaError as exc:     # the client's own errors, e.g. NoBrokersAvailable, TopicAuthorizationFailed
        print(f"stream.topics: error: {options['bootstrap_servers']}: {exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
