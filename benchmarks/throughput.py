"""Throughput side by side: every runtime and precision, OpenCV DNN, decoding, and the whole service.

    python benchmarks/throughput.py [--artifact DIR] [--batch-sizes 1 8 32] [--repeats 7]
    python benchmarks/throughput.py --quick          # the pipeline part only, shorter (a few minutes)
    python benchmarks/throughput.py --sweep          # and each service default varied on its own

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
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.arguments import COUNT, number, output_folder, run  # noqa: E402
from benchmarks.service_bench import least_backlog  # noqa: E402
from engine_build.imaging import DecodeLimits, builtin_photos, decode, photo_views  # noqa: E402
from engine_build.manifest import Manifest  # noqa: E402
from engine_build.runtime import available_backends, open_backend  # noqa: E402
from engine_build.runtime.cpu import this_cpu  # noqa: E402


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


def model_configs(manifest: Manifest, variants: list[str]) -> list[tuple[str, str, str, bool, bool]]:
    """(runtime, variant, file, exact, used_by_service) for every file on every runtime that can read it.

    Every INT8 file runs on both CPU runtimes, so the choice of a file per runtime is measured,
    not assumed; ``used_by_service`` marks the file each runtime really gets.
    """
    files = manifest.files
    configs = []
    for precision in variants:
        if precision not in files:
            continue
        entry = files[precision]
        own = {runtime: e.file for runtime, e in entry.by_runtime.items()}
        for name in [entry.file, *own.values()]:
            for runtime, exact in (("onnxruntime", True), ("openvino", False), ("openvino", True)):
                if precision == "int8" and runtime == "openvino" and exact:
                    continue   # INT8 layers compute the same either way; default mode is the service's
                used = own.get(runtime, entry.file) == name
                configs.append((runtime, precision, name, exact, used))
    if "tensorrt" in files:
        configs.append(("tensorrt", "fp16", files["tensorrt"].file, True, True))
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
    manifest = Manifest.read(artifact)
    quantizer = {}
    int8_file = manifest.files.get("int8")
    for entry in [int8_file, *int8_file.by_runtime.values()] if int8_file else []:
        if entry.quantizer:
            quantizer[entry.file] = entry.quantizer["quantizer"]
    reasons = available_backends()
    groups: dict[tuple[str, bool], list] = {}
    for config in model_configs(manifest, list(variants)):
        if not reasons.get(config[0]):
            groups.setdefault((config[0], config[3]), []).append(config)
    rows = []
    for (runtime, exact), configs in groups.items():
        with contextlib.ExitStack() as stack:
            backends = [stack.enter_context(open_backend(runtime, artifact / name, precision, max(batch_sizes),
                                                         exact=exact))
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


def float_layer_cost(artifact: Path, images: np.ndarray, batch_sizes: list[int], repeats: int,
                     workdir: Path) -> list[dict]:
    """What keeping layers in float costs: each INT8 file against its all-INT8 twin, on the runtime that runs it.

    The twins are quantised here the same way (same quantiser, same calibration photos), with
    every layer in int8; each pair is timed in turns.
    """
    from engine_build.imagesets import builtin_set
    from engine_build.quantize import quantize_minmax, quantize_nncf
    manifest = Manifest.read(artifact)
    int8 = manifest.files.get("int8")
    kept = (manifest.int8 or {}).get("float_layers", {})
    if not int8 or not any(kept.values()):
        return []
    calibration = builtin_set("calibration").images
    makers = {"nncf": quantize_nncf, "onnxruntime": quantize_minmax}
    pairs = [("openvino", int8)] + [(runtime, own) for runtime, own in int8.by_runtime.items()]
    if not int8.by_runtime:
        pairs.append(("onnxruntime", int8))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for runtime, entry in pairs:
        assert entry.quantizer is not None, "an INT8 file records its quantiser"
        quantizer = entry.quantizer["quantizer"]
        floats = entry.quantizer["float_layers"]
        twin = workdir / f"all-int8.{quantizer}.onnx"
        makers[quantizer](artifact / "model.onnx", twin, calibration, ())
        with open_backend(runtime, artifact / entry.file, "int8", max(batch_sizes)) as built, \
                open_backend(runtime, twin, "int8", max(batch_sizes)) as every:
            for batch in batch_sizes:
                x = np.ascontiguousarray(images[:batch])
                as_built, all_int8 = interleaved([lambda x=x: built.infer(x), lambda x=x: every.infer(x)], repeats)
                a, b = summary(as_built, batch), summary(all_int8, batch)
                ratio = round(a["images_per_s"] / b["images_per_s"], 3)
                rows.append({"runtime": runtime, "file": entry.file, "quantizer": quantizer, "batch": batch,
                             "float_layers": kept, "as_built": a, "all_int8": b, "speed_vs_all_int8": ratio})
                print(f"  {runtime:<12} {quantizer:<11} batch {batch:>3}: {a['images_per_s']:>7.1f} img/s with "
                      f"{', '.join(floats) or 'nothing'} in float, {b['images_per_s']:>7.1f} all int8 (x{ratio})")
        twin.unlink()
    return rows


def opencv_dnn_runs(prototxt: Path, caffemodel: Path, images: np.ndarray, batch_sizes: list[int],
                    repeats: int) -> list[dict]:
    """The classic way to run a Caffe model without Caffe: OpenCV's own importer, FP32 on CPU."""
    from engine_build.preprocess import reference_crops
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    rows = []
    for batch in batch_sizes:
        def run(batch: int = batch) -> None:
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
            result = summary(timed(lambda data=data, limits=limits: [decode(data, limits) for _ in range(10)],
                                   repeats), 10)
            rows.append({"jpeg_px": size, "reduced_decode": reduced, **result})
            print(f"  decode JPEG {size:>4}px {'reduced' if reduced else 'full   '}: "
                  f"{result['images_per_s']:>7.1f} img/s per core")
    return rows


def chart(rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars of img/s at the largest batch, drawn with OpenCV."""
    largest = max(r["batch"] for r in rows)
    bars = sorted([r for r in rows if r["batch"] == largest], key=lambda r: r["images_per_s"])
    width, row_h, left = 900, 34, 330
    img = np.full((80 + row_h * len(bars), width, 3), 255, np.uint8)
    cv2.putText(img, f"{title} (batch {largest}, img/s)", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1,
                cv2.LINE_AA)
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
        source = Manifest.read(artifact).model.source
        return (artifact, Path(getattr(source.get("prototxt"), "path", "-")),
                Path(getattr(source.get("caffemodel"), "path", "-")))
    from engine_build.build import ensure_artifact
    from engine_build.placeholder import ensure_placeholder
    prototxt, caffemodel = ensure_placeholder(workdir / "model")
    return ensure_artifact(prototxt, caffemodel, workdir / "artifact"), prototxt, caffemodel


def cpu_kind(cpu: dict) -> str:
    """A results file's name for a kind of CPU: its vendor and the widest extension that picks its kernels
    (``intel-amx``, ``amd-avx2``, ...), so runs on different kinds of machine keep their own files."""
    model = cpu["model"].lower()
    vendor = next((v for v in ("intel", "amd", "ampere", "apple", "graviton") if v in model), cpu["machine"])
    extensions = set(cpu["extensions"])
    widest = next((name for name, flag in (("amx", "amx_int8"), ("avx512-vnni", "avx512_vnni"),
                                           ("avx512", "avx512f"), ("avx-vnni", "avx_vnni"), ("avx2", "avx2"),
                                           ("i8mm", "i8mm"), ("dotprod", "asimddp"), ("neon", "asimd"))
                   if flag in extensions), "baseline")
    return f"{vendor}-{widest}"


def options(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked and with the defaults that depend on other options filled in; a bad
    one is argparse's one-line usage error (exit 2) before anything is built or measured."""
    parser = argparse.ArgumentParser(prog="throughput.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, help="artifact to measure (default: build a full-size placeholder)")
    parser.add_argument("--batch-sizes", type=COUNT, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=COUNT, default=7)
    parser.add_argument("--variants", nargs="+", default=["fp32", "fp16", "int8"], choices=["fp32", "fp16", "int8"],
                        help="variants to measure (default all; e.g. --variants int8 to compare the INT8 files)")
    parser.add_argument("--opencv", action=argparse.BooleanOptionalAction, default=True,
                        help="also time OpenCV DNN on the Caffe files (--no-opencv: skip it)")
    parser.add_argument("--skip-models", action="store_true", help="skip the runtime/precision matrix")
    parser.add_argument("--skip-pipeline", action="store_true", help="skip the whole-service runs")
    parser.add_argument("--quick", action="store_true",
                        help="--skip-models, 8 s latency runs, a 6000-image backlog (unless given)")
    parser.add_argument("--sweep", action="store_true",
                        help="also vary each service default one at a time (fetch wait, linger, batching window, "
                             "decode workers, inference streams, batch size; about 8 more minutes)")
    parser.add_argument("--gpu-feed", action="store_true",
                        help="only the GPU feed: the service with a device stand-in (no CPU used for inference), "
                             "each Kafka client, 1 to N processes")
    parser.add_argument("--device-us", type=number(float, 0), default=None,
                        help="GPU feed: device time per image in microseconds (default 25: an H100's FP16 "
                             "CaffeNet, estimated; 0: the host alone)")
    parser.add_argument("--feed-processes", type=COUNT, nargs="+", default=None,
                        help="GPU feed: process counts to run (default 1 and the CPU count)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None,
                        help="pipeline: the variant the service and its budget run (default: what the service "
                             "picks, INT8 where it passed its gate)")
    parser.add_argument("--exact-precision", action="store_true",
                        help="pipeline: compute in the file's own precision (no OpenVINO bf16); with --precision "
                             "fp32 the budget is a quarter of INT8's on an AMX Xeon (inference six "
                             "times the core-ms), standing in for a CPU where the model dominates, as INT8 does on "
                             "an AVX2-only one")
    parser.add_argument("--max-cpu-isa", choices=["avx512_core", "avx512_core_vnni", "avx512_core_bf16"], default=None,
                        help="cap OpenVINO's CPU kernels at this instruction set (oneDNN's ONEDNN_MAX_CPU_ISA, set "
                             "for this process and every service it starts): avx512_core runs INT8 without VNNI, "
                             "bf16 or AMX (4 to 5 times the core-ms on an AMX Xeon), standing in for a CPU where INT8 "
                             "inference dominates; OpenVINO cannot compile this model capped at avx2")
    parser.add_argument("--latency-seconds", type=number(float, 1), default=None,
                        help="length of each paced latency run, 1 s or more (default 20; 8 with --quick)")
    parser.add_argument("--backlog", type=COUNT, default=None,
                        help=f"images in each backlog (throughput) run, at least {least_backlog()}; rate and CPU are "
                             "read over its steady middle (default 8000; 6000 with --quick)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.quick or args.gpu_feed:
        args.skip_models = True
    if args.skip_models and args.skip_pipeline:
        parser.error("nothing to measure: --skip-pipeline with --skip-models, --quick or --gpu-feed")
    if args.gpu_feed and args.sweep:
        parser.error("--sweep varies the CPU host's defaults, which --gpu-feed does not run")
    args.latency_seconds = args.latency_seconds or (8.0 if args.quick else 20.0)
    args.backlog = args.backlog or (6000 if args.quick else 8000)
    if not args.skip_pipeline and args.backlog < least_backlog():
        parser.error(f"--backlog {args.backlog} leaves too few steady results to read a rate from: use at least "
                     f"{least_backlog()}")
    output_folder(parser, "--output", args.output)
    return args


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    if args.max_cpu_isa:   # before OpenVINO first runs: oneDNN reads it once
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.max_cpu_isa.upper()
    artifact, prototxt, caffemodel = prepare(args.artifact, args.workdir)
    cpu = this_cpu()
    print(f"machine: {cpu['model']} ({platform.machine()}: {' '.join(cpu['extensions'])}), "
          f"{os.cpu_count()} CPUs; artifact {artifact}"
          + (f"; OpenVINO's kernels capped at {args.max_cpu_isa.upper()}" if args.max_cpu_isa else ""))
    rows: list[dict] = []
    decoding: list[dict] = []
    float_cost: list[dict] = []
    if not args.skip_models:
        images = photo_views(builtin_photos())
        reps = max(args.batch_sizes)
        images = np.concatenate([images] * (1 + reps // len(images)))[:reps]
        print("model only (per batch, after warm-up):")
        rows = model_runs(artifact, images, args.batch_sizes, args.repeats, args.variants)
        if "int8" in args.variants:
            print("INT8 layers kept in float, against every layer in int8 (timed in turns):")
            float_cost = float_layer_cost(artifact, images, args.batch_sizes, args.repeats, args.workdir / "int8")
        if caffemodel.exists() and args.opencv:
            rows += opencv_dnn_runs(prototxt, caffemodel, images, args.batch_sizes, max(3, args.repeats // 2))
        print("decoding (one thread):")
        decoding = decode_runs(args.repeats)
    name = f"{cpu_kind(cpu)}-{os.cpu_count()}cpu"
    model = {"precision": args.precision} if args.precision else {}
    model |= {"exact_precision": True} if args.exact_precision else {}
    variant = "".join(f"-{v}" for v in (args.precision, "exact" if args.exact_precision else None,
                                        args.max_cpu_isa and args.max_cpu_isa.replace("_", "-")) if v)
    pipeline, plot = {}, None
    if not args.skip_pipeline:
        from benchmarks.service_bench import DEVICE_US_PER_IMAGE, histogram, run_all
        pipeline, runs = run_all(artifact, args.workdir / "service", args.latency_seconds, args.backlog,
                                 args.sweep, DEVICE_US_PER_IMAGE if args.device_us is None else args.device_us,
                                 args.feed_processes,
                                 feed_only=args.gpu_feed, model=model)
        if runs:
            plot = args.output / f"{name}{variant}-latency.png"
            pipeline["plot"] = {"file": plot.name, "drawn_with": histogram(runs, plot)}
            print(f"latency histogram: {plot} ({pipeline['plot']['drawn_with']})")
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "cpu": cpu, "python": platform.python_version()},
              "placeholder": Manifest.read(artifact).model.placeholder,
              "service_model_options": model, "max_cpu_isa": args.max_cpu_isa, "model": rows,
              "int8_float_layers": float_cost, "decode": decoding,
              "pipeline": pipeline,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    suffix = "" if rows and pipeline else ("-gpu-feed" if args.gpu_feed else "-pipeline" if pipeline else "-models")
    suffix += variant if pipeline and not args.gpu_feed else ""
    (args.output / f"{name}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    if rows:
        chart(rows, args.output / f"{name}.png", f"CaffeNet-Twitter on {os.cpu_count()} CPUs")
    print(f"wrote {args.output / (name + suffix + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "throughput.py"))
