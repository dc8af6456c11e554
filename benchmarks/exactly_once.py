"""What exactly-once costs: end-to-end images/s through the real service on the embedded
broker, at-least-once against exactly-once at several transaction (commit) intervals.

Each configuration runs ``--repeats`` times on fresh topics; the median is reported, timed
from the first finished message (group join excluded). Writes ``exactly_once.json`` under
``--output``. Without ``--artifact`` a full-size placeholder model is built (slow once).

    python -m benchmarks.exactly_once --artifact ARTIFACT --messages 600
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.arguments import COUNT, number, output_folder, run  # noqa: E402
from engine_build.imaging import builtin_photos  # noqa: E402

BATCH = 32   # the service's largest batch in these runs


def one_run(broker, artifact: Path, messages: int, guarantee: str, interval_ms: float) -> dict:
    from kafka import KafkaProducer

    from stream.app import build
    from stream.config import StreamConfig
    run = uuid.uuid4().hex[:8]
    topics = {"in": f"bench-in-{run}", "out": f"bench-out-{run}", "dlq": f"bench-dlq-{run}"}
    broker.create_topics({topics["in"]: 4, topics["out"]: 1, topics["dlq"]: 1})
    payloads = [p.read_bytes() for p in builtin_photos()]
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=20)
    for i in range(messages):
        producer.send(topics["in"], key=str(i).encode(), value=payloads[i % len(payloads)])
    producer.flush()
    producer.close()
    cfg = StreamConfig(broker.bootstrap, (topics["in"],), topics["out"], topics["dlq"], artifact,
                       group_id=f"bench-{run}", metrics_port=0, max_batch=BATCH, max_delay_ms=20,
                       session_timeout_ms=6000,
                       commit_interval_ms=interval_ms, processing_guarantee=guarantee)
    service = build(cfg)
    first: list[tuple[float, int]] = []

    def watch() -> None:
        while service.finished() == 0:
            time.sleep(0.001)
        first.append((time.monotonic(), service.finished()))
    threading.Thread(target=watch, daemon=True).start()
    stats = service.run(count=messages, timeout=600)
    end = time.monotonic()
    transactions = service.rebalance.transactions
    start, done_then = first[0]
    return {"images_per_s": (stats.finished - done_then) / (end - start), "finished": stats.finished,
            "transactions": transactions.commits if transactions else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, help="artifact to run (default: build a full-size placeholder)")
    parser.add_argument("--messages", type=number(int, 2 * BATCH), default=600,
                        help=f"messages per run, at least {2 * BATCH}: the rate is timed from the first finished "
                             f"batch (of up to {BATCH}), so one batch alone has none (default 600)")
    parser.add_argument("--repeats", type=COUNT, default=3)
    parser.add_argument("--intervals-ms", type=number(float, 0, above=True), nargs="+", default=[100, 300, 1000, 3000])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    output_folder(parser, "--output", args.output)
    import logging
    logging.basicConfig(level=logging.ERROR)
    artifact = args.artifact
    if artifact is None:
        from engine_build.build import ensure_artifact
        from engine_build.placeholder import ensure_placeholder
        artifact = ensure_artifact(*ensure_placeholder(args.workdir / "model"), args.workdir / "artifact")
    from stream.embedded_broker import EmbeddedBroker
    configs = [("at-least-once", 1000.0)] + [("exactly-once", i) for i in args.intervals_ms]
    rows = []
    with EmbeddedBroker() as broker:
        one_run(broker, artifact, 64, "at-least-once", 1000.0)   # warm-up: imports, model load, broker
        for guarantee, interval in configs:
            runs = [one_run(broker, artifact, args.messages, guarantee, interval) for _ in range(args.repeats)]
            rates = [r["images_per_s"] for r in runs]
            row = {"guarantee": guarantee, "interval_ms": interval, "messages": args.messages,
                   "median_images_per_s": round(statistics.median(rates), 1),
                   "runs_images_per_s": [round(r, 1) for r in rates],
                   "transactions": [r["transactions"] for r in runs]}
            rows.append(row)
            print(f"{guarantee:14s} interval {interval:6.0f} ms: {row['median_images_per_s']:7.1f} img/s "
                  f"(runs {row['runs_images_per_s']})", flush=True)
    base = rows[0]["median_images_per_s"]
    for row in rows[1:]:
        row["cost_vs_at_least_once"] = round(1 - row["median_images_per_s"] / base, 3)
    out = args.output / "exactly_once.json"
    out.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "artifact": str(artifact),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, "exactly_once.py"))
