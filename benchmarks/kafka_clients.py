"""Client-process CPU per record for each ``--kafka-client``: the service's own source consumes image-sized
records and its own sink publishes one label record per input (acknowledged), committing as it goes; no
decoding, no model. Same embedded broker, same records, rounds alternating between the clients:

    python -m benchmarks.kafka_clients [--records 5000] [--value-bytes 52000] [--rounds 2] [--out FILE]
                                       [--session-timeout-ms 10000]

The broker runs in its own process, so ``time.process_time`` here is the client's cost (all its threads).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.arguments import COUNT, number, run

CLIENTS = ("kafka-python", "librdkafka")


class _Handler:
    """A RebalanceHandler with nothing in flight (the benchmark acknowledges before it commits)."""

    drain_timeout_s, transactions = 5.0, None

    def drained(self, partitions: Any) -> bool:
        return True

    def committable(self, partitions: Any) -> dict:
        return {}

    def committed(self, offsets: dict) -> None: ...

    def released(self, partitions: Any, lost: bool) -> None: ...

    def assigned(self, partitions: Any) -> None: ...

    def fail(self, failure: Any) -> None:
        raise failure


def round_config(bootstrap: str, client: str, topic: str, tmp: Path, session_timeout_ms: int) -> Any:
    """The service's config for one round's consumer and producer (a new group each time); checked as the
    service checks it, so a bad setting is a :class:`~engine_build.errors.ConfigError`."""
    from stream.config import StreamConfig
    return StreamConfig(bootstrap, (topic,), f"{topic}-out", f"{topic}-dlq", tmp,
                        group_id=f"bench-{uuid.uuid4().hex[:8]}", kafka_client=client, metrics_port=0,
                        compression_type="zstd", session_timeout_ms=session_timeout_ms)


def one_round(bootstrap: str, client: str, topic: str, records: int, tmp: Path,
              session_timeout_ms: int = 10_000) -> dict[str, float]:
    """Consume ``records`` from ``topic`` with a new group, publish and acknowledge a label record for each,
    commit every 1,000 and at the end; the process CPU and wall time that took. Joining the new group
    waits about half of ``session_timeout_ms`` (the service's default, 10 s, unless told otherwise)."""
    from stream.records import Outgoing
    cfg = round_config(bootstrap, client, topic, tmp, session_timeout_ms)
    if client == "librdkafka":
        from stream.rdkafka_io import RdKafkaConnector
        connector: Any = RdKafkaConnector(cfg)
    else:
        from stream.kafka_io import KafkaConnector
        connector = KafkaConnector(cfg)
    sink = connector.sink(lambda: None)
    source = connector.source(_Handler())
    acked = threading.Semaphore(0)
    label = json.dumps({"label": "positive", "scores": {"negative": 0.3, "positive": 0.7}}).encode()
    done, offsets = 0, {}
    deadline = time.monotonic() + 600
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        while done < records and time.monotonic() < deadline:
            for m in source.poll(0.5, cfg.max_poll_records):
                sink.publish(Outgoing(cfg.output_topic, m.key, label, []), acked.release)
                offsets[(m.topic, m.partition)] = m.offset + 1
                done += 1
                if done % 1000 == 0:   # as the service's periodic commit, which need not wait
                    source.commit(dict(offsets), wait=False)
        for _ in range(done):
            if not acked.acquire(timeout=60):
                raise RuntimeError("a label record was never acknowledged")
        source.commit(dict(offsets), wait=True)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        source.close()
        sink.close()
    if done < records:
        raise RuntimeError(f"{client}: only {done} of {records} records consumed")
    return {"core_ms_per_record": cpu / done * 1000, "records_per_s": done / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kafka_clients.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=COUNT, default=5000)
    parser.add_argument("--value-bytes", type=number(int, 0), default=52_000, help="input record size (a typical JPEG)")
    parser.add_argument("--rounds", type=COUNT, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--session-timeout-ms", type=COUNT, default=10_000,
                        help="the group session timeout of each round's consumer (default: the service's); "
                             "each round's join waits about half of it, so a short run (a test) gives less")
    args = parser.parse_args(argv)
    from engine_build.errors import ConfigError
    try:   # here, before the broker starts and takes every record, not when the first round begins
        round_config("127.0.0.1:9092", CLIENTS[0], "bench", Path("."), args.session_timeout_ms)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.out is not None and not (args.out.parent.is_dir() and os.access(args.out.parent, os.W_OK)):
        parser.error(f"--out {args.out}: cannot write in {args.out.parent}")
    from engine_build.runtime.cpu import this_cpu
    from stream.embedded_broker import EmbeddedBroker
    from stream.kafka_sink import KafkaSink
    from stream.records import Outgoing
    cpu = this_cpu()
    print(f"CPU: {cpu['model']} ({cpu['machine']}; {', '.join(cpu['extensions']) or 'no vector extensions'}), "
          f"{os.cpu_count()} logical cores")
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in CLIENTS}
    with EmbeddedBroker() as broker:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        broker.create_topics({topic: 2})
        feeder = KafkaSink(broker.bootstrap, {})
        acked = threading.Semaphore(0)
        value = os.urandom(args.value_bytes)
        for i in range(args.records):
            feeder.publish(Outgoing(topic, str(i).encode(), value, []), acked.release)
        for _ in range(args.records):
            acked.acquire(timeout=60)
        feeder.close()
        one_round(broker.bootstrap, "kafka-python", topic, min(500, args.records), Path("."),   # warm-up
                  args.session_timeout_ms)
        for _ in range(args.rounds):
            for client in CLIENTS:
                runs[client].append(one_round(broker.bootstrap, client, topic, args.records, Path("."),
                                              args.session_timeout_ms))
        broker.kill()   # its records live in memory and go with it: tansu's graceful stop only costs 5 s
    print(f"{'client':14s} {'core-ms/record (median)':>24s} {'each round':>24s} {'records/s (median)':>19s}")
    for client, results in runs.items():
        each = ", ".join(f"{r['core_ms_per_record']:.3f}" for r in results)
        print(f"{client:14s} {statistics.median(r['core_ms_per_record'] for r in results):24.3f} {each:>24s} "
              f"{statistics.median(r['records_per_s'] for r in results):19.0f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"cpu": cpu, "records": args.records, "value_bytes": args.value_bytes,
                                        "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, "kafka_clients.py"))
