"""What a GPU host can prove about the TensorRT path; run by scripts/gpu-check.sh.

    python benchmarks/gpu_check.py versions            driver, CUDA, cuda-python, TensorRT, GPU
    python benchmarks/gpu_check.py cuda                pinned/device buffers, copies, two streams
    python benchmarks/gpu_check.py tensorrt [--artifact DIR] [--max-batch 64] [--repeats 20]
                                                       TensorRT throughput at batch 1/8/32/max

Each prints what it measured and ends with one ``proved: ...`` line saying what that showed;
``tensorrt`` also writes ``benchmarks/results/gpu-*.json``. Without ``--artifact`` it builds a
placeholder artifact (full size unless ``--width``) with an engine under ``--work`` first.
Nothing here needs TensorRT except the ``tensorrt`` step, which says so in one line.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.arguments import COUNT, number, output_folder, run  # noqa: E402
from engine_build.errors import BackendUnavailable, SentimentError  # noqa: E402
from engine_build.runtime import cuda_memory  # noqa: E402


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    """Driver and runtime CUDA versions, package versions, GPU: what this host offers."""
    rt = cuda_memory.cudart()
    out = {"python": platform.python_version(),
           "cuda_python": _version("cuda-python", "cuda-bindings"), "cuda_bindings": _version("cuda-bindings"),
           "tensorrt": _version("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
           "driver_cuda": cuda_memory.cuda_version(cuda_memory.driver_cuda_version())}
    err, runtime = rt.cudaRuntimeGetVersion()
    out["runtime_cuda"] = cuda_memory.cuda_version(runtime) if err == rt.cudaError_t.cudaSuccess else None
    count = cuda_memory.check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    out["gpus"] = [vars(cuda_memory.gpu_info(i)) for i in range(count)]
    return out


def cuda_roundtrip(mib: int = 64, repeats: int = 5) -> dict:
    """Pinned host -> device -> host on two streams at once; checks the bytes, times the copies."""
    rt = cuda_memory.cudart()
    check = cuda_memory.check
    streams = [check(rt.cudaStreamCreate(), "cudaStreamCreate") for _ in range(2)]
    buffers = [cuda_memory.PinnedBuffer((mib << 20,), np.uint8) for _ in range(2)]
    try:
        expected = [np.random.default_rng(i).integers(0, 256, mib << 20, dtype=np.uint8) for i in range(2)]
        seconds = []
        for _ in range(repeats):
            for buffer, data in zip(buffers, expected, strict=True):
                buffer.host[:] = data
            start = time.perf_counter()
            for buffer, stream in zip(buffers, streams, strict=True):
                buffer.to_device(buffer.nbytes, stream)
            for buffer in buffers:
                buffer.host[:] = 0
            for buffer, stream in zip(buffers, streams, strict=True):
                buffer.to_host(buffer.nbytes, stream)
            for stream in streams:
                check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            seconds.append(time.perf_counter() - start)
            for buffer, data in zip(buffers, expected, strict=True):
                if not np.array_equal(buffer.host, data):
                    raise AssertionError("bytes copied to the GPU and back differ")
        median = sorted(seconds)[len(seconds) // 2]
        return {"bytes_each_way": 2 * (mib << 20), "streams": 2, "repeats": repeats,
                "median_ms": round(median * 1e3, 2),
                "gib_per_s_both_ways": round(4 * (mib << 20) / median / 2**30, 2), "bytes_verified": True}
    finally:
        for buffer in buffers:
            buffer.free()
        for stream in streams:
            check(rt.cudaStreamDestroy(stream), "cudaStreamDestroy")


def tensorrt_throughput(artifact: Path, batches: list[int], repeats: int) -> list[dict]:
    """Median latency and images/s of the artifact's engine at each batch size (after warm-up)."""
    from engine_build.imaging import builtin_photos, photo_views
    from engine_build.manifest import Manifest
    from engine_build.runtime import open_backend
    entry = Manifest.read(artifact).files["tensorrt"]
    views = photo_views(builtin_photos())
    rows = []
    with open_backend("tensorrt", artifact / entry.file, "fp16", max(batches)) as backend:
        for batch in batches:
            images = np.resize(views, (batch, *views.shape[1:]))
            for _ in range(3):
                backend.infer(images)
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                backend.infer(images)
                seconds.append(time.perf_counter() - start)
            median = sorted(seconds)[len(seconds) // 2]
            rows.append({"runtime": "tensorrt", "file": "fp16", "batch": batch, "repeats": repeats,
                         "median_ms": round(median * 1e3, 3), "images_per_s": round(batch / median, 1)})
    return rows


def _tensorrt(args: argparse.Namespace) -> int:
    from engine_build.runtime import available_backends
    reason = available_backends()["tensorrt"]
    if reason:
        print(f"tensorrt: skipped: {reason}")
        return 0
    artifact = args.artifact if args.artifact is not None else placeholder_engine(args.work, args.width,
                                                                                  args.max_batch)
    batches = sorted({b for b in (1, 8, 32, args.max_batch) if b <= args.max_batch})
    rows = tensorrt_throughput(artifact, batches, args.repeats)
    for row in rows:
        print(f"tensorrt fp16 batch {row['batch']:>3}: {row['images_per_s']:>9.1f} img/s, median {row['median_ms']} ms")
    host = versions()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", host["gpus"][0]["name"]).strip("-").lower() if host["gpus"] else "gpu"
    path = args.output / f"gpu-{gpu}.json"
    path.write_text(json.dumps({"host": host, "artifact": str(artifact), "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    print(proved_tensorrt(artifact, host, rows))
    return 0


def placeholder_engine(work: Path, width: float, max_batch: int) -> Path:
    """Build (or keep, when still valid) a placeholder artifact with a TensorRT engine under ``work``."""
    from engine_build.build import BuildConfig, run_build
    from engine_build.placeholder import write_placeholder
    source = work / f"placeholder-w{width:g}"
    prototxt, caffemodel = source / "deploy.prototxt", source / "placeholder.caffemodel"
    if not (prototxt.exists() and caffemodel.exists()):
        prototxt, caffemodel = write_placeholder(source, width=width)
    artifact = work / f"gpu-artifact-w{width:g}-b{max_batch}"
    run_build(BuildConfig(prototxt=prototxt, caffemodel=caffemodel, output=artifact, precisions=("fp32", "fp16"),
                          tensorrt=True, max_batch=max_batch))
    return artifact


def proved_versions(host: dict) -> str:
    gpus = ", ".join(f"{g['name']} (compute {g['compute_capability']})" for g in host["gpus"]) or "no GPU"
    return (f"proved: cuda-python {host['cuda_python']} reaches the driver (CUDA {host['driver_cuda']}) and "
            f"runtime (CUDA {host['runtime_cuda']}) and sees {len(host['gpus'])} GPU(s): {gpus}; "
            f"TensorRT {host['tensorrt'] or 'not installed'}")


def proved_cuda(result: dict) -> str:
    mib = result["bytes_each_way"] >> 20
    return (f"proved: pinned host and device buffers ({mib} MiB each way) on {result['streams']} CUDA streams at "
            f"once, copied there and back {result['repeats']} times with every byte identical "
            f"({result['gib_per_s_both_ways']} GiB/s)")


def proved_tensorrt(artifact: Path, host: dict, rows: list[dict]) -> str:
    from engine_build.manifest import Manifest
    checks = [c for c in Manifest.read(artifact).validation.checks
              if c.get("runtime") == "tensorrt"]
    gate = ("passed its validation gate against ONNX Runtime FP32" if checks and all(c["passed"] for c in checks)
            else "has NO passing TensorRT validation record")
    gpu = host["gpus"][0]["name"] if host["gpus"] else "the GPU"
    batches = "/".join(str(r["batch"]) for r in rows)
    return (f"proved: TensorRT {host['tensorrt']} on {gpu}: the FP16 engine in {artifact} {gate} and ran "
            f"batches {batches} (peak {max(r['images_per_s'] for r in rows):.1f} img/s)")


UNAVAILABLE = 77   # exit status: what the step needs is not installed here (automake's "skipped"; 2 is a usage error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("versions")
    c = sub.add_parser("cuda")
    c.add_argument("--mib", type=COUNT, default=64)
    t = sub.add_parser("tensorrt")
    t.add_argument("--artifact", type=Path, help="artifact with an engine (default: build a full-size placeholder)")
    t.add_argument("--max-batch", type=COUNT, default=64)
    t.add_argument("--repeats", type=COUNT, default=20)
    t.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    t.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work",
                   help="where the default placeholder artifact is built and kept between runs")
    t.add_argument("--width", type=number(float, 0, above=True), default=1.0,
                   help="width of the default placeholder model (1 = the full-size network)")
    args = parser.parse_args(argv)
    if args.step == "tensorrt":
        output_folder(t, "--output", args.output)
    try:
        if args.step == "versions":
            host = versions()
            print(json.dumps(host, indent=2))
            print(proved_versions(host))
        elif args.step == "cuda":
            result = cuda_roundtrip(args.mib)
            print(json.dumps(result, indent=2))
            print(proved_cuda(result))
        else:
            return _tensorrt(args)
    except SentimentError as exc:   # BackendUnavailable: not this host's to prove (gpu-check.sh: skipped)
        print(f"gpu_check {args.step}: {exc}", file=sys.stderr)
        return UNAVAILABLE if isinstance(exc, BackendUnavailable) else 1
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "gpu_check.py"))
