"""The end-to-end demo: artifact, embedded broker, real photos in, labels out, everything stopped.

Uses the authors' real weights when ``models/twitter_finetuned_test4_iter_180.caffemodel``
and ``models/sentiment_deploy.prototxt`` exist; otherwise a placeholder model, flagged as such.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
import urllib.request
from pathlib import Path

from engine_build.errors import UserError
from engine_build.imaging import builtin_photos
from engine_build.options import OptionParser  # usage errors: one line and exit 1, as in python -m stream

MODELS = Path("models")
METRIC_LINES = ("sentiment_images_total", "sentiment_decode_failures_total", "sentiment_dead_letters_total",
                "sentiment_batch_size_count", "sentiment_batch_size_sum", "sentiment_end_to_end_seconds_count",
                "sentiment_end_to_end_seconds_sum", "sentiment_inference_seconds_sum", "sentiment_consumer_lag",
                "sentiment_ready")


def demo_artifact(workdir: Path, models: Path = MODELS) -> Path:
    """Built from the authors' weights when they are in models/, else from placeholder weights."""
    from engine_build.build import ensure_artifact
    from engine_build.placeholder import ensure_placeholder
    from engine_build.weights import CAFFEMODEL, fetched
    real = fetched(models)
    if real:
        prototxt, caffemodel = real
        print(f"using the authors' weights: {caffemodel}")
    else:
        print(f"real weights not found at {models / CAFFEMODEL}: using a PLACEHOLDER model (labels are "
              f"meaningless); python -m engine_build fetch-weights --dest {models} downloads them")
        print(f"placeholder model in {workdir / 'placeholder'}: written the first time (217 MiB of seeded weights)")
        prototxt, caffemodel = ensure_placeholder(workdir / "placeholder")
    from engine_build.cli import build_progress
    print(f"artifact in {workdir / 'artifact'}: reused when built from these files, else built (about a minute "
          "the first time on 2 cores)")
    with build_progress():
        return ensure_artifact(prototxt, caffemodel, workdir / "artifact")


def demo_inputs() -> list[tuple[bytes, bytes]]:
    import cv2
    import numpy as np
    items = [(p.name.encode(), p.read_bytes()) for p in builtin_photos()]
    coffee = cv2.imdecode(np.frombuffer(items[4][1], np.uint8), cv2.IMREAD_COLOR)
    assert coffee is not None, "the built-in coffee photo decodes"
    items.append((b"coffee.png", cv2.imencode(".png", coffee)[1].tobytes()))
    items.append((b"coffee.webp", cv2.imencode(".webp", coffee)[1].tobytes()))
    items.append((b"not-an-image.txt", b"this is text, not a photo"))
    return items


def main(argv: list[str] | None = None) -> int:
    parser = OptionParser(prog="python -m stream.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("demo-out"))
    parser.add_argument("--metrics-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--models", type=Path, default=MODELS,
                        help="folder with the authors' weights, as python -m engine_build fetch-weights writes them "
                             "(default: models; placeholder weights when they are not there)")
    try:
        args = parser.parse_args(argv)
    except UserError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)    # each step shows as it happens, through a pipe too
    print("loading the runtimes (ONNX Runtime, OpenVINO, OpenCV, Kafka client)")
    from stream.app import build
    from stream.config import StreamConfig
    from stream.embedded_broker import EmbeddedBroker, free_port
    try:
        args.workdir.mkdir(parents=True, exist_ok=True)
        artifact = demo_artifact(args.workdir, args.models)
        inputs = demo_inputs()
        print("starting the embedded Kafka-protocol broker")
        with EmbeddedBroker(log_path=args.workdir / "broker.log") as broker:
            print(f"embedded Kafka-protocol broker (tansu) on {broker.bootstrap}")
            broker.create_topics({"images": 2, "sentiment": 1, "sentiment-dead-letters": 1})
            from kafka import KafkaProducer
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
            for key, value in inputs:
                producer.send("images", key=key, value=value)
            producer.flush()
            producer.close()
            print(f"published {len(inputs)} messages to 'images' ({len(inputs) - 1} photos, 1 non-image)")
            port = args.metrics_port or free_port()
            cfg = StreamConfig(broker.bootstrap, ("images",), "sentiment", "sentiment-dead-letters", artifact,
                               group_id="demo", metrics_port=port, max_batch=8, commit_interval_ms=200,
                               session_timeout_ms=6000)
            print("starting the service: opening the artifact and choosing its runtime")
            service = build(cfg)
            print(f"service: {service.backend.describe()}, metrics on http://127.0.0.1:{port}/metrics")
            metrics_text: list[str] = []

            def scrape_when_done() -> None:
                while service.finished() < len(inputs):
                    time.sleep(0.05)
                time.sleep(0.5)   # one commit interval, so the lag gauge is current
                metrics_text.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
                service.stop()
            threading.Thread(target=scrape_when_done, daemon=True).start()
            started = time.monotonic()
            stats = service.run(timeout=120)
            print(f"processed {stats.finished} messages in {time.monotonic() - started:.1f} s")
            print_results(broker.bootstrap)
        print("\nmetrics endpoint reported:")
        for line in (metrics_text[0] if metrics_text else "").splitlines():
            if line.startswith(METRIC_LINES):
                print("  " + line)
        print("broker stopped; demo done")
        return 0
    except UserError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1


def print_results(bootstrap: str) -> None:
    from kafka import KafkaConsumer
    consumer = KafkaConsumer("sentiment", "sentiment-dead-letters", bootstrap_servers=bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=2000, group_id=None,
                             enable_auto_commit=False)
    rows, dead = [], []
    for record in consumer:
        if record.topic == "sentiment":
            rows.append((record.key.decode(), json.loads(record.value)))
        else:
            dead.append((record.key.decode(), dict(record.headers)))
    consumer.close()
    print(f"\n{'image':<24}{'label':<10}{'negative':>10}{'positive':>10}  model")
    for key, value in sorted(rows):
        flag = "PLACEHOLDER" if value["model"]["placeholder"] else value["model"]["name"]
        print(f"{key:<24}{value['label']:<10}{value['scores']['negative']:>10.3f}{value['scores']['positive']:>10.3f}"
              f"  {flag} {value['model']['precision']}")
    for key, headers in dead:
        print(f"{key:<24}dead letter: {headers['error.reason'].decode()} ({headers['error.message'].decode()})")


if __name__ == "__main__":
    sys.exit(main())
