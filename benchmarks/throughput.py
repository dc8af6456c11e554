"""Throughput side by side: every runtime and precision, OpenCV DNN, decoding, and the whole service.

    python benchmarks/throughput.py [--artifact DIR] [--batch-sizes 1 8 32] [--repeats 7]
    python benchmarks/throughput.py --quick          # the pipeline part only, shorter (about 2 min)

Model runs use the project's own backends on real photos (warm-up, then repeats;
medians and percentiles of per-batch latency). The pipeline part (``service_bench``)
runs the real service against the embedded broker: the machine's budget and the
service's efficiency against it, latency at a fixed rate and near saturation, the Kafka
client's own ceiling and 1 -> 2 process scaling, and a latency histogram. Results go to ``benchmarks/results/*.json``
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

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine_build.imaging import DecodeLimits, builtin_photos, decode, photo_views  # noqa: E402
from engine_build.manifest import read_manifest  # noqa: E402
from engine_build.runtime import available_backends, open_backend  # noqa: E402


def timed(fn, repeats: int, warmup: int = 2) -> list[float]:
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


def model_runs(artifact: Path, images: np.ndarray, batch_sizes: list[int], repeats: int) -> list[dict]:
    manifest = read_manifest(artifact)
    files = manifest["files"]
    reasons = available_backends()
    configs = []
    for precision in ("fp32", "fp16", "int8"):
        if precision in files:
            configs.append(("onnxruntime", precision, True))
            configs.append(("openvino", precision, False))
            if precision != "int8":
                configs.append(("openvino", precision, True))
    if "tensorrt" in files and not reasons["tensorrt"]:
        configs.append(("tensorrt", "fp16", True))
    rows = []
    for runtime, precision, exact in configs:
        if reasons.get(runtime):
            continue
        path = artifact / files["tensorrt" if runtime == "tensorrt" else precision]["file"]
        with open_backend(runtime, path, precision, max(batch_sizes), exact=exact) as backend:
            for batch in batch_sizes:
                x = np.ascontiguousarray(images[:batch])
                result = summary(timed(lambda: backend.infer(x), repeats), batch)
                rows.append({"runtime": runtime, "file": precision, "computes": backend.compute_precision,
                             "batch": batch, **result})
                print(f"  {runtime:<12} {precision:<5} computes {backend.compute_precision:<10} batch {batch:>3}: "
                      f"{result['images_per_s']:>7.1f} img/s  (median {result['median_ms']} ms, p90 {result['p90_ms']} ms)")
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
        label = f"{r['runtime']} {r['file']} ({r['computes']})"
        cv2.putText(img, label, (10, y + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        length = int((width - left - 90) * r["images_per_s"] / top)
        cv2.rectangle(img, (left, y + 4), (left + length, y + 26), (180, 120, 40), -1)
        cv2.putText(img, f"{r['images_per_s']:.0f}", (left + length + 8, y + 21), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, help="artifact to measure (default: build a full-size placeholder)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-models", action="store_true", help="skip the runtime/precision matrix")
    parser.add_argument("--skip-pipeline", action="store_true", help="skip the whole-service runs")
    parser.add_argument("--quick", action="store_true",
                        help="--skip-models, 8 s latency runs, a 1500-image backlog")
    parser.add_argument("--rate", type=float, default=80.0, help="the moderate rate for latency (img/s)")
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="length of each paced latency run")
    parser.add_argument("--backlog", type=int, default=3000, help="images in each backlog (throughput) run")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.skip_models, args.latency_seconds, args.backlog = True, min(args.latency_seconds, 8.0), 1500
    if args.artifact:
        artifact = args.artifact
        source = read_manifest(artifact)["model"]["source"]
        prototxt = Path(source.get("prototxt", {}).get("path", "-"))
        caffemodel = Path(source.get("caffemodel", {}).get("path", "-"))
    else:
        from engine_build.build import ensure_artifact
        from engine_build.placeholder import ensure_placeholder
        prototxt, caffemodel = ensure_placeholder(args.workdir / "model")
        artifact = ensure_artifact(prototxt, caffemodel, args.workdir / "artifact")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; artifact {artifact}")
    rows: list[dict] = []
    decoding: list[dict] = []
    if not args.skip_models:
        images = photo_views(builtin_photos())
        reps = max(args.batch_sizes)
        images = np.concatenate([images] * (1 + reps // len(images)))[:reps]
        print("model only (per batch, after warm-up):")
        rows = model_runs(artifact, images, args.batch_sizes, args.repeats)
        if caffemodel.exists():
            rows += opencv_dnn_runs(prototxt, caffemodel, images, args.batch_sizes, max(3, args.repeats // 2))
        print("decoding (one thread):")
        decoding = decode_runs(args.repeats)
    args.output.mkdir(parents=True, exist_ok=True)
    name = f"{platform.node() or 'host'}-{os.cpu_count()}cpu"
    pipeline, plot = {}, None
    if not args.skip_pipeline:
        from benchmarks.service_bench import histogram, run_all
        pipeline, runs = run_all(artifact, args.workdir / "service", args.rate, args.latency_seconds, args.backlog)
        plot = args.output / f"{name}-latency.png"
        pipeline["plot"] = {"file": plot.name, "drawn_with": histogram(runs, plot)}
        print(f"latency histogram: {plot} ({pipeline['plot']['drawn_with']})")
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()},
              "placeholder": read_manifest(artifact)["model"]["placeholder"],
              "model": rows, "decode": decoding, "pipeline": pipeline,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    suffix = "" if rows and pipeline else ("-pipeline" if pipeline else "-models")
    (args.output / f"{name}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    if rows:
        chart(rows, args.output / f"{name}.png", f"CaffeNet-Twitter on {os.cpu_count()} CPUs")
    print(f"wrote {args.output / (name + suffix + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
