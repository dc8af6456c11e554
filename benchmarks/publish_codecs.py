"""Producer CPU and size per label record under each compression type (how the service's
``--compression-type`` default was chosen). Runs against the embedded broker:

    python -m benchmarks.publish_codecs [--records 20000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.arguments import COUNT, run

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")


def label_records(count: int) -> list[bytes]:
    """Records shaped like the JSON encoder's, with the fields that vary per image varied."""
    out = []
    for i in range(count):
        p = (i * 7919 % 10000) / 10000
        out.append(json.dumps({
            "label": "positive" if p > 0.5 else "negative", "scores": {"negative": 1 - p, "positive": p},
            "source": {"topic": "images", "partition": i % 6, "offset": i},
            "model": {"name": "campos2015-twitter", "sha256": "9f" * 32, "precision": "int8",
                      "placeholder": False, "runtime": "openvino (int8+bf16)"},
            "timing_ms": {"decode": round(1 + i % 13 * 0.1, 3), "queue": round(i % 29 * 0.7, 3),
                          "inference": round(30 + i % 97 * 0.37, 3), "total": round(40 + i % 89 * 0.9, 3)}},
            separators=(",", ":")).encode())
    return out


def measure(bootstrap: str, codec: str, records: list[bytes]) -> tuple[float, float]:
    """(producer CPU microseconds per record, compressed/uncompressed size) for one codec."""
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                             compression_type=None if codec == "none" else codec)
    producer.send(codec, b"warm-up").get(10)
    started = time.process_time()
    for i, value in enumerate(records):
        producer.send(codec, key=str(i).encode(), value=value)
    producer.flush()
    cpu = (time.process_time() - started) / len(records) * 1e6
    rate = [v for k, v in producer.metrics().get("producer-metrics", {}).items() if "compression-rate-avg" in k]
    producer.close()
    return cpu, rate[0] if rate else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=COUNT, default=20_000)
    parser.add_argument("--repeats", type=COUNT, default=3)
    args = parser.parse_args(argv)
    from stream.embedded_broker import EmbeddedBroker
    records = label_records(args.records)
    with EmbeddedBroker() as broker:
        broker.create_topics({codec: 1 for codec in CODECS})
        runs = {codec: [measure(broker.bootstrap, codec, records) for _ in range(args.repeats)] for codec in CODECS}
    print(f"{'codec':8s} {'CPU µs/record (median)':>24s} {'size ratio':>11s}")
    for codec, results in runs.items():
        print(f"{codec:8s} {statistics.median(r[0] for r in results):24.1f} {results[-1][1]:11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, "publish_codecs.py"))
