"""Throughput side by side: every runtime and precision, OpenCV DNN, decoding, and the whole service.

    python benchmarks/throughput.py [--artifact DIR] [--batch-sizes 1 8 32] [--repeats 7]

Model runs use the project's own backends on real photos (warm-up, then repeats;
medians and percentiles of per-batch latency). The end-to-end run is the real
service against the embedded broker. Results go to ``benchmarks/results/*.json``
and a bar chart ``*.png``. Without ``--artifact`` a full-size placeholder model is
built first (same architecture and cost as the published one).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine_build.imaging import DecodeLimits, builtin_photos, decode, photo_views  # noqa: E402
from engine_build.manifest import read_manifest  # noqa: E402
from engine_build.runtime import available_backends, open_backend  # noqa: E402


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(seconds: list[float], items: int) -> dict:
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    median = statistics.median(ordered)
    return {"median_ms": round(median * 1000, 2), "p90_ms": round(p90 * 1000, 2),
            "min_ms": round(ordered[0] * 1000, 2), "images_per_s": round(items / median, 1), "repeats": len(seconds)}


def model_configs(manifest: dict, variants: list[str]) -> list[tuple[str, str, str, bool, bool]]:
    """(runtime, variant, file, exact, used_by_service) for every file on every runtime that can read it.

    Every INT8 file runs on both CPU runtimes, so the choice of a file per runtime is measured,
    not assumed; ``used_by_service`` marks the file each runtime really gets.
    """
    files = manifest["files"]
    configs = []
    for precision in variants:
        if precision not in files:
            continue
        entry = files[precision]
        own = {runtime: e["file"] for runtime, e in entry.get("by_runtime", {}).items()}
        for name in [entry["file"], *own.values()]:
            for runtime, exact in (("onnxruntime", True), ("openvino", False), ("openvino", True)):
                if precision == "int8" and runtime == "openvino" and exact:
                    continue   # INT8 layers compute the same either way; default mode is the service's
                used = own.get(runtime, entry["file"]) == name
                configs.append((runtime, precision, name, exact, used))
    if "tensorrt" in files:
        configs.append(("tensorrt", "fp16", files["tensorrt"]["file"], True, True))
    return configs


def interleaved(fns: list[Callable[[], object]], repeats: int, warmup: int = 2) -> list[list[float]]:
    """Seconds per call of each function, the functions taking turns in every repeat.

    On a shared or throttling machine, load that comes and goes then hits every file alike,
    so their ratio holds even when the absolute numbers drift.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for times, fn in zip(out, fns, strict=True):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return out


def model_runs(artifact: Path, images: np.ndarray, batch_sizes: list[int], repeats: int,
               variants: list[str] = ("fp32", "fp16", "int8")) -> list[dict]:
    """Every file on every runtime; the files of one runtime and mode are timed in turns."""
    import contextlib
    manifest = read_manifest(artifact)
    quantizer = {}
    for entry in [manifest["files"].get("int8", {}), *manifest["files"].get("int8", {}).get("by_runtime", {}).values()]:
        if "quantizer" in entry:
            quantizer[entry["file"]] = entry["quantizer"]["quantizer"]
    reasons = available_backends()
    groups: dict[tuple[str, bool], list] = {}
    for config in model_configs(manifest, list(variants)):
        if not reasons.get(config[0]):
            groups.setdefault((config[0], config[3]), []).append(config)
    rows = []
    for (runtime, exact), configs in groups.items():
        with contextlib.ExitStack() as stack:
            backends = [stack.enter_context(open_backend(runtime, artifact / name, precision, max(batch_sizes), exact=exact))
                        for _, precision, name, _, _ in configs]
            for batch in batch_sizes:
                x = np.ascontiguousarray(images[:batch])
                timings = interleaved([lambda b=b, x=x: b.infer(x) for b in backends], repeats)
                for (_, precision, name, _, used), backend, seconds in zip(configs, backends, timings, strict=True):
                    label = f"{precision} ({quantizer[name]})" if name in quantizer else precision
                    result = summary(seconds, batch)
                    rows.append({"runtime": runtime, "file": label, "path": name, "computes": backend.compute_precision,
                                 "used_by_service": used, "batch": batch, **result})
                    print(f"  {runtime:<12} {label:<18} computes {backend.compute_precision:<10} batch {batch:>3}: "
                          f"{result['images_per_s']:>7.1f} img/s  (median {result['median_ms']} ms, "
                          f"p90 {result['p90_ms']} ms){'' if used else '  [not used on this runtime]'}")
    return rows


def opencv_dnn_runs(prototxt: Path, caffemodel: Path, images: np.ndarray, batch_sizes: list[int], repeats: int) -> list[dict]:
    """The classic way to run a Caffe model without Caffe: OpenCV's own importer, FP32 on CPU."""
    from engine_build.preprocess import reference_crops
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    rows = []
    for batch in batch_sizes:
        def run() -> None:
            net.setInput(reference_crops(np.ascontiguousarray(images[:batch]), False))
            net.forward()
        result = summary(timed(run, repeats), batch)
        rows.append({"runtime": "opencv-dnn", "file": "caffemodel", "computes": "fp32", "batch": batch, **result})
        print(f"  opencv-dnn   caffe computes fp32       batch {batch:>3}: {result['images_per_s']:>7.1f} img/s")
    return rows


def decode_runs(repeats: int) -> list[dict]:
    photo = cv2.imread(str(builtin_photos()[0]), cv2.IMREAD_COLOR)
    rows = []
    for size in (512, 2048, 4096):
        data = cv2.imencode(".jpg", cv2.resize(photo, (size, size), interpolation=cv2.INTER_CUBIC),
                            [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        for reduced in (False, True):
            limits = DecodeLimits(reduced_decode=reduced)
            result = summary(timed(lambda: [decode(data, limits) for _ in range(10)], repeats), 10)
            rows.append({"jpeg_px": size, "reduced_decode": reduced, **result})
            print(f"  decode JPEG {size:>4}px {'reduced' if reduced else 'full   '}: {result['images_per_s']:>7.1f} img/s per core")
    return rows


def end_to_end(artifact: Path, messages: int, backend: str, precision: str | None) -> dict:
    from kafka import KafkaProducer

    from stream.config import StreamConfig
    from stream.embedded_broker import EmbeddedBroker
    from stream.service import Service
    payloads = [p.read_bytes() for p in builtin_photos()]
    with EmbeddedBroker() as broker:
        broker.create_topics({"bench-in": 4, "bench-out": 1, "bench-dlq": 1})
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=20)
        for i in range(messages):
            producer.send("bench-in", key=str(i).encode(), value=payloads[i % len(payloads)])
        producer.flush()
        producer.close()
        cfg = StreamConfig(broker.bootstrap, ("bench-in",), "bench-out", "bench-dlq", artifact, group_id="bench",
                           backend=backend, precision=precision, metrics_port=0, max_batch=32, max_delay_ms=20,
                           decode_workers=os.cpu_count() or 2, max_in_flight=512, session_timeout_ms=6000)
        service = Service(cfg)
        describe = service.backend.describe()
        # Time from the first finished message, so group join is not counted.
        first = []

        def watch() -> None:
            while service.finished() == 0:
                time.sleep(0.001)
            first.append((time.monotonic(), service.finished()))
        import threading
        threading.Thread(target=watch, daemon=True).start()
        stats = service.run(count=messages, timeout=600)
        end = time.monotonic()
        e2e = service.metrics.end_to_end
        count = sum(s.value for m in e2e.collect() for s in m.samples if s.name.endswith("_count"))
        total = sum(s.value for m in e2e.collect() for s in m.samples if s.name.endswith("_sum"))
    start, done_then = first[0]
    rate = (stats.finished - done_then) / (end - start)
    print(f"  service end to end ({describe}): {rate:.1f} img/s over {stats.finished} messages, "
          f"mean poll-to-ack latency {1000 * total / max(count, 1):.0f} ms")
    return {"backend": describe, "messages": stats.finished, "images_per_s": round(rate, 1),
            "mean_end_to_end_ms": round(1000 * total / max(count, 1), 1)}


def chart(rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars of img/s at the largest batch, drawn with OpenCV."""
    largest = max(r["batch"] for r in rows)
    bars = sorted([r for r in rows if r["batch"] == largest], key=lambda r: r["images_per_s"])
    width, row_h, left = 900, 34, 330
    img = np.full((80 + row_h * len(bars), width, 3), 255, np.uint8)
    cv2.putText(img, f"{title} (batch {largest}, img/s)", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    top = max(r["images_per_s"] for r in bars)
    for i, r in enumerate(bars):
        y = 55 + i * row_h
        label = f"{r['runtime']} {r['file']} ({r['computes']})" + ("" if r.get("used_by_service", True) else " *")
        cv2.putText(img, label, (10, y + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        length = int((width - left - 90) * r["images_per_s"] / top)
        cv2.rectangle(img, (left, y + 4), (left + length, y + 26), (180, 120, 40), -1)
        cv2.putText(img, f"{r['images_per_s']:.0f}", (left + length + 8, y + 21), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def prepare(artifact: Path | None, workdir: Path) -> tuple[Path, Path, Path]:
    """(artifact, prototxt, caffemodel): the given artifact and its sources, or a full-size placeholder built once."""
    if artifact:
        source = read_manifest(artifact)["model"]["source"]
        return (artifact, Path(source.get("prototxt", {}).get("path", "-")),
                Path(source.get("caffemodel", {}).get("path", "-")))
    from engine_build.build import ensure_artifact
    from engine_build.placeholder import ensure_placeholder
    prototxt, caffemodel = ensure_placeholder(workdir / "model")
    return ensure_artifact(prototxt, caffemodel, workdir / "artifact"), prototxt, caffemodel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, help="artifact to measure (default: build a full-size placeholder)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", nargs="+", default=["fp32", "fp16", "int8"], choices=["fp32", "fp16", "int8"],
                        help="variants to measure (default all; e.g. --variants int8 to compare the INT8 files)")
    parser.add_argument("--no-opencv", action="store_true", help="skip OpenCV DNN")
    parser.add_argument("--e2e-messages", type=int, default=1500, help="messages through the real service (0 = skip)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    artifact, prototxt, caffemodel = prepare(args.artifact, args.workdir)
    images = photo_views(builtin_photos())
    reps = max(args.batch_sizes)
    images = np.concatenate([images] * (1 + reps // len(images)))[:reps]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; artifact {artifact}")
    print("model only (per batch, after warm-up):")
    rows = model_runs(artifact, images, args.batch_sizes, args.repeats, args.variants)
    if caffemodel.exists() and not args.no_opencv:
        rows += opencv_dnn_runs(prototxt, caffemodel, images, args.batch_sizes, max(3, args.repeats // 2))
    print("decoding (one thread):")
    decoding = decode_runs(args.repeats)
    e2e = []
    if args.e2e_messages:
        print("whole service through the embedded broker:")
        e2e.append(end_to_end(artifact, args.e2e_messages, "auto", None))
        e2e.append(end_to_end(artifact, args.e2e_messages, "onnxruntime", "fp32"))
    args.output.mkdir(parents=True, exist_ok=True)
    name = f"{platform.node() or 'host'}-{os.cpu_count()}cpu"
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()},
              "placeholder": read_manifest(artifact)["model"]["placeholder"],
              "model": rows, "decode": decoding, "end_to_end": e2e,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (args.output / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(rows, args.output / f"{name}.png", f"CaffeNet-Twitter on {os.cpu_count()} CPUs")
    print(f"wrote {args.output / (name + '.json')} and {args.output / (name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
