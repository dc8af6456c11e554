"""The whole service through the embedded broker: budget, efficiency, latency, client ceiling, scaling.

Used by ``benchmarks/throughput.py``. The service runs as its own process (``python -m
stream`` through :func:`child_main`, which only names OS threads so their CPU can be read
from ``/proc/PID/task``, and for the client-only runs builds the service with no-ops for
the model, or the model and the decoder), so the benchmark's producer and reader (:mod:`benchmarks.harness`) never
share its GIL.

* budget: decode core-seconds and inference core-seconds per image on the same 600x400
  JPEGs, each the median of three passes; the machine's budget is ``cpus / (decode +
  inference)`` images per second.
* efficiency: the service's rate draining a backlog over the budget around it (the mean per-image
  cost of budgets measured just before and just after it); the median of three such rounds, with
  each Kafka client.
* sweep (optional): each default varied on its own.
* latency: input record to result record, from a send time embedded in the key (the
  service passes keys through) to the moment a reader sees the result; at 0.2 and 0.5 of the
  budget (so the figures mean the same on any CPU), with the old defaults at 0.2, and mixed sizes
  at 0.2 (a 62-megapixel PNG among every 150 images; the small images' latency reported apart).
* client ceiling: consume + produce with no decoding and no inference, one process;
  then consume + decode + produce in one and in two processes of one group.
* GPU feed: the service with a device stand-in that holds each batch for a GPU's time and uses no
  CPU, each client, 1 to N processes: images per second and core-ms per image by part.
"""
from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # imported, and run as a script: the service child (see child_main)
from benchmarks.harness import Producer, Reader, paced  # noqa: E402
from engine_build.runtime.base import Backend, Outputs  # noqa: E402
from stream.death_signal import die_with  # noqa: E402

# kafka-python's consumer default fetch wait and the old producer linger, batching without the adaptive
# rule, one inference call on every core
OLD_DEFAULTS = {"fetch_max_wait_ms": 500, "linger_ms": 5, "adaptive_batching": False, "inference_streams": 1}


# ---------------------------------------------------------------- inputs and budget
def jpegs(size: tuple[int, int] = (600, 400), quality: int = 90) -> list[bytes]:
    from engine_build.imaging import builtin_photos
    out = []
    for path in builtin_photos():
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        out.append(cv2.imencode(".jpg", cv2.resize(image, size, interpolation=cv2.INTER_AREA),
                                [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes())
    return out


@functools.lru_cache(maxsize=1)
def huge_png() -> bytes:
    """A 62-megapixel PNG (9000 x 6900, smooth gradients: 0.8 MB on the wire, about a second of decoding
    on one core), the mixed-size case: the 64 MP default accepts it."""
    height, width = 6900, 9000
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    image = np.stack(np.broadcast_arrays(x, y, (x + y) / 2), axis=2).astype(np.uint8)
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


class DeviceStandIn(Backend):
    """An accelerator's place in the pipeline with no accelerator: each batch is held for its device time
    (``us_per_image`` x its images) without using the CPU, ``concurrency`` batches at once (the TensorRT
    backend's two execution contexts). It copies nothing: the batch array it is handed is the one buffer
    the images were copied into from the decoder (pinned memory with TensorRT)."""
    name = "device stand-in"
    on_cpu = False

    def __init__(self, us_per_image: float, concurrency: int = 2) -> None:
        super().__init__(Path("device"), "fp16", max_batch=1 << 16)
        self.us_per_image, self.concurrency = us_per_image, concurrency

    def _infer_impl(self, images: np.ndarray) -> Outputs:
        threading.Event().wait(self.us_per_image * len(images) / 1e6)
        probs = np.full((len(images), 2), 0.5, np.float32)
        return Outputs(probs, probs)

    def describe(self) -> str:
        return f"device stand-in, {self.us_per_image:g} us per image"


def budget(artifact: Path, payloads: list[bytes], images: int = 640, batch: int = 32, repeats: int = 3,
           model: dict | None = None) -> dict:
    """Core-seconds per image of decoding (one thread) and of inference (whole process CPU, all its
    threads) on the same photos, with the runtime, precision and streams the service picks (one
    caller thread per stream, as in the service; ``model``: the service's ``precision`` and
    ``exact_precision`` options where the benchmark sets them). Each is the median of ``repeats`` passes: one pass
    on this shared machine once read 1.43 core-ms of decoding where the passes around it read 0.96,
    which made a backlog run look faster than its budget; the median drops such a pass without taking
    the machine's luckiest moment for its capacity (the backlog rate it is compared with is a mean)."""
    from engine_build.artifact import open_artifact
    from engine_build.imaging import decode
    from engine_build.runtime.cpu import usable_cores
    for payload in payloads:     # warm-up: the first decodes of a process pay for the library's set-up
        decode(payload)
    decode_passes = []
    for _ in range(repeats):
        started = time.thread_time()
        decoded = [decode(payloads[i % len(payloads)]) for i in range(images)]
        decode_passes.append((time.thread_time() - started) / images)
    x = np.stack(decoded)
    model = model or {}
    _, selection, backend = open_artifact(artifact, "auto", model.get("precision"), model.get("exact_precision", False),
                                          batch, streams=0)
    infer_passes, wall_passes = [], []
    try:
        with ThreadPoolExecutor(backend.concurrency) as callers:
            for warm in [callers.submit(backend.infer, x[:batch]) for _ in range(2 * backend.concurrency)]:
                warm.result()     # every stream's first calls, outside the timing
            for _ in range(repeats):
                cpu, wall = time.process_time(), time.perf_counter()
                for done in [callers.submit(backend.infer, x[i:i + batch]) for i in range(0, images, batch)]:
                    done.result()
                infer_passes.append((time.process_time() - cpu) / images)
                wall_passes.append((time.perf_counter() - wall) / images)
        describe = f"{backend.describe()}, {backend.concurrency} stream(s)"
    finally:
        backend.close()
    decode_s, infer_s, infer_wall = (float(np.median(p)) for p in (decode_passes, infer_passes, wall_passes))
    cpus = usable_cores()
    rate = cpus / (decode_s + infer_s)
    print(f"  budget on {cpus} cores: decode {decode_s * 1000:.2f} + inference {infer_s * 1000:.2f} core-ms/image "
          f"({describe}, batch {batch}; median of {repeats} passes) = {rate:.0f} img/s")
    return {"decode_core_ms": round(decode_s * 1000, 3), "inference_core_ms": round(infer_s * 1000, 3),
            "inference_wall_ms": round(infer_wall * 1000, 3), "backend": describe, "batch": batch,
            "cpus": cpus, "images_per_s": round(rate, 1),
            "passes_core_ms": {"decode": [round(p * 1000, 3) for p in decode_passes],
                               "inference": [round(p * 1000, 3) for p in infer_passes]}}


# ---------------------------------------------------------------- the service as a child process
def _name_threads(interval_s: float = 0.5) -> None:
    """Give every thread of this process an OS-level name, for /proc (Python 3.11 names none): each
    Python thread its own (``Thread.native_id`` is its /proc/self/task entry), the main thread, which
    runs the poll loop, ``poll-loop``; threads with no Python thread are the runtime's (``runtime``),
    but for librdkafka's, which name themselves (``rdk:``). A daemon thread renames them as they come;
    its own CPU is a few /proc reads every ``interval_s``."""
    tasks = Path("/proc/self/task")

    def rename() -> None:
        named: dict[int, str] = {}
        while True:
            python = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
            python[threading.main_thread().native_id or os.getpid()] = "poll-loop"
            for task in tasks.iterdir():
                try:
                    tid = int(task.name)
                    name = python.get(tid)
                    if name is None and named.get(tid) is None:
                        name = None if (task / "comm").read_text().startswith("rdk:") else "runtime"
                    if name is not None and named.get(tid) != name:
                        (task / "comm").write_text(name[:15])
                        named[tid] = name
                except (OSError, ValueError):   # the thread ended meanwhile
                    continue
            time.sleep(interval_s)
    threading.Thread(target=rename, name="thread-names", daemon=True).start()


def child_main(mode: str, argv: list[str]) -> int:
    """``python benchmarks/service_bench.py MODE ARGS``: the service; MODE service|decode|kafka|gpu:US
    (decode: no model; kafka: no model and no decoding; gpu:US: a :class:`DeviceStandIn` taking US
    microseconds of device time per image)."""
    from stream.cli import main
    _name_threads()
    if mode == "service":
        return main(argv)
    from benchmarks.processor_overhead import ConstantModel, still_image
    from engine_build.imaging import decode
    from stream.app import build, open_model
    from stream.config import StreamConfig
    from stream.service import Service
    kind, _, device_us = mode.partition(":")
    stand_in = DeviceStandIn(float(device_us)) if kind == "gpu" else ConstantModel(concurrency=1)

    def without_model(cfg: StreamConfig) -> Service:
        manifest, selection, backend = open_model(cfg)   # the artifact's manifest, as the service reports it
        backend.close()
        return build(cfg, model=(manifest, selection, stand_in), decoder=still_image if mode == "kafka" else decode)
    return main(argv, build=without_model)


def start_service(bootstrap: str, topic: str, group: str, artifact: Path, log: Path, mode: str = "service",
                  **options) -> subprocess.Popen:
    argv = ["--bootstrap-servers", bootstrap, "--input-topic", topic, "--output-topic", f"{topic}-out",
            "--dead-letter-topic", f"{topic}-dlq", "--group-id", group, "--artifact", str(artifact),
            "--metrics-port", "0", "--session-timeout-ms", "6000", "--log-level", "WARNING"]
    for key, value in options.items():   # a switch as True or False: --key or --no-key
        name = key.replace("_", "-")
        argv += [f"--{name}" if value else f"--no-{name}"] if isinstance(value, bool) else [f"--{name}", str(value)]
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), mode, *argv], cwd=ROOT,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, preexec_fn=die_with(os.getpid()))


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def status_mb(pid: int, field: str = "VmHWM") -> float:
    """A memory figure of a process from /proc/<pid>/status, in MB (VmHWM: its peak RSS so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread group (by OS thread name, digits dropped) of a process."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip().rstrip("0123456789_-") or "?"
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def cpu_delta(before: dict[str, float], after: dict[str, float], images: int) -> dict[str, float]:
    """Core-milliseconds per image of each thread group between two readings."""
    return {k: round(1000 * (after.get(k, 0.0) - before.get(k, 0.0)) / images, 3)
            for k in sorted(after) if after.get(k, 0.0) - before.get(k, 0.0) > 0}


def percentiles(latencies: list[float]) -> dict:
    ms = np.array(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1),
            "samples": len(ms)}


def _ahead(processes: int, options: dict) -> int:
    """How many messages the members run ahead of their results (max_in_flight + max_poll_records each)."""
    from stream.config import StreamConfig
    return processes * (int(options.get("max_in_flight", StreamConfig.max_in_flight))
                        + int(options.get("max_poll_records", StreamConfig.max_poll_records)))


def steady_window(messages: int, processes: int = 1, **options: object) -> tuple[int, int]:
    """The results [lo, hi) of a backlog of ``messages`` that :meth:`Bench.backlog` reads its rate over."""
    ahead = _ahead(processes, options)
    return max(int(0.1 * messages), 3 * ahead), min(int(0.9 * messages), messages - 2 * ahead)


def least_backlog(processes: int = 1, **options: object) -> int:
    """The smallest backlog whose steady window holds 0.3 of it: [3 x ahead, m - 2 x ahead] binds there."""
    return int(5 * _ahead(processes, options) / 0.7) + 1


# ---------------------------------------------------------------- the runs
class Bench:
    def __init__(self, broker, artifact: Path, payloads: list[bytes], workdir: Path, partitions: int = 4,
                 model: dict | None = None) -> None:
        """``model``: the service options choosing the variant (``precision``, ``exact_precision``), given
        to every service this starts and to :func:`budget`."""
        self.broker, self.artifact, self.payloads, self.partitions = broker, artifact, payloads, partitions
        self.model = model or {}
        self.log = workdir / "service.log"
        self.prod = Producer(broker.bootstrap)
        self._n = 0

    def topic(self, name: str) -> str:
        """A fresh input topic with its result and dead-letter topics; :meth:`drop` removes them."""
        self._n += 1
        topic = f"{name}-{self._n}"
        self.broker.create_topics({topic: self.partitions, f"{topic}-out": 1, f"{topic}-dlq": 1})
        return topic

    def warm(self, topic: str, reader: Reader, count: int = 40) -> int:
        """Until the service answers (group joined, model warm); returns how many were sent."""
        paced(self.prod, topic, self.payloads, 40, count / 40, first=-count)
        if not reader.wait_for(count, 120):
            raise RuntimeError(f"the service did not answer; see {self.log}")
        return count

    def latency(self, label: str, rates: list[tuple[str, float]], seconds: float, payloads: list[bytes] | None = None,
                **options) -> dict:
        """One service process; for each (name, rate): a paced run, latencies of what it sent.
        ``payloads`` (default the JPEGs) are sent in turn; the results of those larger than the largest
        JPEG (the mixed-size run's huge PNG) are reported apart, as ``large``."""
        topic = self.topic("latency")
        proc = start_service(self.broker.bootstrap, topic, f"g-{topic}", self.artifact, self.log,
                             **(self.model | options))
        reader = Reader(self.broker.bootstrap, f"{topic}-out")
        reader.start()
        out = {}
        try:
            done = self.warm(topic, reader)
            for name, rate in rates:
                busy, mine, started = machine_busy(), time.process_time(), time.perf_counter()
                cpu0, broker0 = thread_cpu(proc.pid), thread_cpu(self.broker.pid)
                sent = paced(self.prod, topic, payloads or self.payloads, rate, seconds, first=done)
                reader.wait_for(done + sent, 60)
                elapsed = time.perf_counter() - started
                load, harness = (machine_busy() - busy) / elapsed, (time.process_time() - mine) / elapsed
                threads = cpu_delta(cpu0, thread_cpu(proc.pid), sent)
                broker_ms = sum(cpu_delta(broker0, thread_cpu(self.broker.pid), sent).values())
                cycle, small_max = payloads or self.payloads, max(len(p) for p in self.payloads)
                with reader.lock:
                    large = [len(cycle[(seq - done) % len(cycle)]) > small_max for seq in reader.seqs[done:done + sent]]
                    window = [lat for (_, lat), big in zip(reader.seen[done:done + sent], large, strict=True)
                              if not big]
                    large_window = [lat for (_, lat), big in zip(reader.seen[done:done + sent], large, strict=True)
                                    if big]
                    inside = reader.inside[done:done + sent]
                done = len(reader.seen)
                # Where the time goes, medians: the service's poll-to-send parts; the rest is Kafka
                # (send to poll, send to the reader's fetch) and the producer's linger and ack.
                parts = {k: round(float(np.median([t.get(k, 0.0) for t in inside])), 1)
                         for k in ("wait", "decode", "queue", "inference", "output", "total")}
                out[name] = {"rate": round(rate, 1), "settings": label, **percentiles(window),
                             "service_poll_to_send_median_ms": parts, "machine_busy_cores": round(load, 2),
                             "harness_cores": round(harness, 2), "thread_core_ms_per_image": threads,
                             "broker_core_ms_per_image": round(broker_ms, 3),
                             "latencies_ms": [round(x * 1000, 2) for x in window]}
                if large_window:
                    out[name]["large"] = percentiles(large_window)
                big = (f"; the {len(large_window)} huge PNGs: p50 {out[name]['large']['p50_ms']:.0f} ms, max "
                       f"{out[name]['large']['max_ms']:.0f} ms" if large_window else "")
                print(f"  {name:<22} {rate:6.0f} img/s: p50 {out[name]['p50_ms']:6.1f} ms  "
                      f"p99 {out[name]['p99_ms']:6.1f} ms  ({len(window)} images{big}; inside the service, medians "
                      f"{parts}; machine busy {load:.2f} cores, {harness:.2f} of them this benchmark's producer "
                      f"and reader; service core-ms/image {threads}, broker {broker_ms:.2f})")
        finally:
            reader.close()
            stop(proc)
            self.drop(topic)
        return out

    def drop(self, topic: str) -> None:
        """Delete a run's topics, so the in-memory broker starts every run as small as the first."""
        from kafka.errors import KafkaError
        try:
            self.broker.delete_topics([topic, f"{topic}-out", f"{topic}-dlq"])
        except KafkaError as exc:   # never at the cost of the run's result: the broker just stays larger
            print(f"  (could not delete {topic}: {exc})")

    def backlog(self, messages: int, mode: str = "service", processes: int = 1, label: str = "", **options) -> dict:
        """Fill a topic, then start ``processes`` consumers of one group; rate and CPU over the results
        of the steady middle. A member runs up to max_in_flight + max_poll_records (``ahead``) messages
        ahead of its results. It fills that lead first, decoding more than it answers; within ``ahead``
        of the end it has nothing left to decode and inference runs alone, faster. Counted in the
        service (decode calls against results over the window), a 4,000-image run read over
        [ahead, end - ahead] decoded 6.5 % fewer images than it answered, the old 10-90 % window of
        3,000 4.5 % fewer, and [3 x ahead, end - 2 x ahead] of 8,000 1.6 % more: that window is used."""
        lo, hi = steady_window(messages, processes, **options)
        if hi - lo < 0.3 * messages:
            raise ValueError(f"a backlog of {messages} leaves too few steady results for {processes} member(s): "
                             f"use at least {least_backlog(processes, **options)}")
        topic = self.topic(f"backlog-{mode.replace(':', '-').replace('.', '_')}")
        for i in range(messages):
            self.prod.send(topic, self.payloads[i % len(self.payloads)], i)
        self.prod.flush()
        reader = Reader(self.broker.bootstrap, f"{topic}-out", fetch_wait_ms=100)
        reader.start()
        procs = [start_service(self.broker.bootstrap, topic, f"g-{topic}", self.artifact, self.log, mode,
                               **(self.model | options)) for _ in range(processes)]
        try:
            if not reader.wait_for(lo, 180):
                raise RuntimeError(f"the service did not drain the backlog; see {self.log}")
            t0, cpu0, broker0 = time.perf_counter(), [thread_cpu(p.pid) for p in procs], thread_cpu(self.broker.pid)
            machine0 = machine_busy()
            reader.wait_for(hi, 600)
            t1, cpu1, broker1 = time.perf_counter(), [thread_cpu(p.pid) for p in procs], thread_cpu(self.broker.pid)
            machine1 = machine_busy()
            peak_rss = max(status_mb(p.pid) for p in procs)
        finally:
            reader.close()
            for p in procs:
                stop(p)
            self.drop(topic)
        images = hi - lo
        threads: dict[str, float] = {}
        for a, b in zip(cpu0, cpu1, strict=True):   # one sample per process each
            for k, v in cpu_delta(a, b, images).items():
                threads[k] = round(threads.get(k, 0.0) + v, 3)
        broker_ms = sum(cpu_delta(broker0, broker1, images).values())
        rate = images / (t1 - t0)
        service_ms = sum(threads.values())
        # Cores busy with anything but this service and the broker (the benchmark's reader, other users).
        other = max(0.0, (machine1 - machine0) / (t1 - t0) - (service_ms + broker_ms) * rate / 1000)
        print(f"  {label or mode:<8} x{processes}: {rate:6.1f} img/s draining {messages}; core-ms/image by thread "
              f"{threads}, broker {broker_ms:.2f}; other load {other:.2f} cores; peak RSS {peak_rss:.0f} MB")
        return {"mode": mode, "processes": processes, "messages": messages, "images_per_s": round(rate, 1),
                "thread_core_ms_per_image": threads, "broker_core_ms_per_image": round(broker_ms, 3),
                "service_core_ms_per_image": round(service_ms, 3), "other_load_cores": round(other, 2),
                "service_peak_rss_mb": peak_rss}

    def close(self) -> None:
        self.prod.close()


def histogram(runs: dict[str, dict], path: Path) -> str:
    """Latency histograms (log-spaced bins): matplotlib if installed, else drawn with OpenCV."""
    bins = np.logspace(0, np.log10(2000), 40)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for name, run in runs.items():
            ax.hist(run["latencies_ms"], bins=bins, histtype="step", linewidth=1.5,
                    label=f"{name}: p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms")
        ax.set_xscale("log")
        ax.set_xlabel("input record to result record (ms)")
        ax.set_ylabel("images")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return "matplotlib"
    width, height, left, bottom = 900, 420, 60, 360
    img = np.full((height, width, 3), 255, np.uint8)
    colours = [(40, 40, 200), (180, 120, 40), (40, 150, 40), (150, 40, 150)]
    counts = {n: np.histogram(r["latencies_ms"], bins=bins)[0] for n, r in runs.items()}
    top = max(1, max(int(c.max()) for c in counts.values()))
    x_of = lambda ms: int(left + (width - left - 20) * np.log10(ms) / np.log10(bins[-1]))  # noqa: E731
    for i, (name, c) in enumerate(counts.items()):
        pts = [(x_of(bins[j]), bottom - int((bottom - 60) * c[j] / top)) for j in range(len(c))]
        for (xa, ya), (xb, yb) in itertools.pairwise(pts):
            cv2.line(img, (xa, ya), (xb, yb), colours[i % 4], 2, cv2.LINE_AA)
        run = runs[name]
        cv2.putText(img, f"{name}: p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms", (left + 10, 25 + 20 * i),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, colours[i % 4], 1, cv2.LINE_AA)
    cv2.line(img, (left, bottom), (width - 20, bottom), (0, 0, 0), 1)
    for ms in (1, 10, 100, 1000):
        cv2.putText(img, f"{ms} ms", (x_of(ms) - 15, bottom + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.putText(img, "input record to result record (log scale); images per bin", (left, bottom + 45),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)
    return "opencv (matplotlib is not installed)"


# Each default the service's latency or throughput hangs on, and the values tried against it.
LATENCY_KNOBS = {"fetch_max_wait_ms": (5, 10, 100, 500), "linger_ms": (0, 5, 20), "max_delay_ms": (5, 20, 50)}
THROUGHPUT_KNOBS = {"decode_workers": (1, 2, 4), "inference_streams": (1, 0), "max_batch": (8, 32, 64)}


def sweep(bench: Bench, rate: float, seconds: float, backlog: int) -> dict:
    """One setting changed at a time from the defaults: latency at ``rate`` for the Kafka and batching
    windows; backlog rate (two rounds, values alternating) for the decode pool, inference streams and
    batch size."""
    out: dict = {"latency": {}, "backlog": {}}
    for knob, values in LATENCY_KNOBS.items():
        for value in values:
            name = f"{knob}={value}"
            run = bench.latency(name, [(name, rate)], seconds, **{knob: value})[name]
            out["latency"][name] = {k: run[k] for k in ("p50_ms", "p99_ms", "machine_busy_cores")}
    for knob, values in THROUGHPUT_KNOBS.items():
        runs: dict[str, list[dict]] = {}
        for _ in range(2):          # the values take turns, twice: drift in the machine's speed hits all alike
            for value in values:
                name = f"{knob}={value}"
                runs.setdefault(name, []).append(bench.backlog(backlog, label=name, **{knob: value}))
        for name, pair in runs.items():
            rates = [r["images_per_s"] for r in pair]
            out["backlog"][name] = {"images_per_s": round(float(np.mean(rates)), 1), "runs_images_per_s": rates,
                                    "service_core_ms_per_image": round(float(np.mean(
                                        [r["service_core_ms_per_image"] for r in pair])), 3)}
            print(f"  {name}: {np.mean(rates):.0f} img/s (mean of {rates})")
    return out


def budget_around(before: dict, after: dict) -> dict:
    """One budget from those measured just before and just after a run: the mean of their per-image
    costs (each the median of three passes), so a machine drifting steadily in speed during the run
    (several per cent within minutes here) moves the budget as much as the run."""
    decode_ms, infer_ms = ((before[k] + after[k]) / 2 for k in ("decode_core_ms", "inference_core_ms"))
    return {**before, "decode_core_ms": round(decode_ms, 3), "inference_core_ms": round(infer_ms, 3),
            "inference_wall_ms": round((before["inference_wall_ms"] + after["inference_wall_ms"]) / 2, 3),
            "images_per_s": round(before["cpus"] / (decode_ms + infer_ms) * 1000, 1),
            "passes_core_ms": {"before": before["passes_core_ms"], "after": after["passes_core_ms"]},
            "before_after_images_per_s": [before["images_per_s"], after["images_per_s"]]}


def efficiency(bench: Bench, artifact: Path, payloads: list[bytes], backlog: int, result: dict,
               rounds: int = 3, kafka_client: str = "kafka-python") -> dict:
    """Rounds of (budget, backlog run, budget) plus the same backlog ``--unordered``, which goes after the
    second budget in even rounds and before the first in odd ones, so the drift between the ordered and
    unordered runs cancels across rounds too. Each backlog run is judged against the budget around it
    (:func:`budget_around`); the round with the median efficiency is reported. Returns its backlog run."""
    runs = []
    for index in range(rounds):
        unordered = bench.backlog(backlog, unordered=True, kafka_client=kafka_client) if index % 2 else None
        before = budget(artifact, payloads, model=bench.model)
        sat = bench.backlog(backlog, kafka_client=kafka_client)
        cost = budget_around(before, budget(artifact, payloads, model=bench.model))
        print(f"  budget around that run: {cost['images_per_s']:.0f} img/s "
              f"(before {cost['before_after_images_per_s'][0]:.0f}, after {cost['before_after_images_per_s'][1]:.0f})")
        unordered = unordered or bench.backlog(backlog, unordered=True, kafka_client=kafka_client)
        need = cost["decode_core_ms"] + cost["inference_core_ms"]
        runs.append({"budget": cost, "saturation": sat,
                     "efficiency": round(sat["images_per_s"] / cost["images_per_s"], 3),
                     "cpu_efficiency": round(need / (sat["service_core_ms_per_image"]
                                                     + sat["broker_core_ms_per_image"]), 3),
                     "cpu_efficiency_without_broker": round(need / sat["service_core_ms_per_image"], 3),
                     "ordered_over_unordered": round(sat["images_per_s"] / unordered["images_per_s"], 3),
                     "unordered_images_per_s": unordered["images_per_s"]})
    median = sorted(runs, key=lambda r: r["efficiency"])[len(runs) // 2]
    result.update({k: median[k] for k in ("budget", "saturation", "efficiency", "cpu_efficiency",
                                          "cpu_efficiency_without_broker")})
    result["efficiency_rounds"] = [r["efficiency"] for r in runs]
    # rate x (service + broker) core-ms = efficiency / CPU efficiency x the cores
    result["busy_share_of_cores"] = round(median["efficiency"] / median["cpu_efficiency"], 3)
    result["rounds"] = [{"budget": r["budget"], "images_per_s": r["saturation"]["images_per_s"],
                         "thread_core_ms_per_image": r["saturation"]["thread_core_ms_per_image"],
                         "unordered_images_per_s": r["unordered_images_per_s"]} for r in runs]
    result["ordering"] = {"ordered_over_unordered_rounds": [r["ordered_over_unordered"] for r in runs],
                          "ordered_over_unordered": round(float(np.median([r["ordered_over_unordered"]
                                                                           for r in runs])), 3)}
    sat = median["saturation"]
    print(f"  {kafka_client}: efficiency under backlog (median of {result['efficiency_rounds']}): rate "
          f"{median['efficiency']:.2f} of "
          f"the budget (wall clock; other load {sat['other_load_cores']:.2f} cores); "
          f"CPU {median['cpu_efficiency']:.2f} (budget core-ms / service + broker core-ms per image: the most the "
          f"rate could reach with every core busy), {median['cpu_efficiency_without_broker']:.2f} without the broker; "
          f"the service and broker kept {result['busy_share_of_cores']:.0%} of the cores busy")
    print(f"  per-partition order: ordered / --unordered throughput x{result['ordering']['ordered_over_unordered']} "
          f"(median of {result['ordering']['ordered_over_unordered_rounds']})")
    return sat


# An H100's FP16 CaffeNet engine, batch 64: about 1.6 ms a batch, 40,000 images a second. An estimate for
# an AlexNet-sized network on that GPU (no GPU was lent to measure it); --device-us sets another.
DEVICE_US_PER_IMAGE = 25.0
FEED_GROUPS = (("kafka client", ("poll-loop", "kafka", "rdk:", "producer-poll")), ("decode", ("decode",)),
               ("batching and copies", ("infer",)))


def feed_split(threads: dict[str, float]) -> dict[str, float]:
    """Core-ms per image by thread group: the Kafka client (its own threads and the poll loop that calls
    it), decoding, batching and copies (the inference threads: with the stand-in they only stack and
    hand over), and the rest."""
    out = {group: 0.0 for group, _ in FEED_GROUPS} | {"rest": 0.0}
    for name, ms in threads.items():
        group = next((g for g, prefixes in FEED_GROUPS if name.startswith(prefixes)), "rest")
        out[group] = round(out[group] + ms, 3)
    return out


def gpu_feed(bench: Bench, backlog: int, device_us: float, processes: list[int]) -> dict:
    """The host side of a GPU host, measured with no GPU: the service with a :class:`DeviceStandIn`
    (real Kafka, real decoding) draining a backlog, for each client and process count; images per second
    and core-ms per image by part. From these: the cores a GPU of a given speed needs on this CPU."""
    device_rate = round(1e6 / device_us) if device_us else None   # 0: no device time, the host alone
    out: dict = {"device_us_per_image": device_us, "device_images_per_s": device_rate, "runs": {}}
    holding = (f"holding each batch {device_us:g} us an image (about {device_rate:,} img/s)" if device_rate
               else "taking no device time (the host alone)")
    print(f"GPU feed: a device stand-in {holding}, real Kafka and decoding, max batch 64:")
    for client in ("kafka-python", "librdkafka"):
        for count in processes:
            run = bench.backlog(backlog * count, f"gpu:{device_us:g}", processes=count, label=f"{client[:8]}",
                                kafka_client=client, max_batch=64)
            split = feed_split(run["thread_core_ms_per_image"])
            per_image = sum(split.values())
            entry = {"images_per_s": run["images_per_s"], "core_ms_per_image": split,
                     "service_core_ms_per_image": round(per_image, 3),
                     "broker_core_ms_per_image": run["broker_core_ms_per_image"],
                     "cores_per_10k_images_per_s": round(per_image * 10, 1)}
            out["runs"][f"{client} x{count}"] = entry
            print(f"    {client:<12} x{count}: {run['images_per_s']:7.0f} img/s, core-ms/image {split} "
                  f"= {per_image:.3f}: {entry['cores_per_10k_images_per_s']} cores per 10,000 img/s")
    return out


def run_all(artifact: Path, workdir: Path, seconds: float, backlog: int, with_sweep: bool = False,
            device_us: float = DEVICE_US_PER_IMAGE, feed_processes: list[int] | None = None,
            feed_only: bool = False, model: dict | None = None) -> tuple[dict, dict]:
    """Everything above, in one run (``with_sweep``: and :func:`sweep`; ``feed_only``: only
    :func:`gpu_feed`; ``model``: see :class:`Bench`); returns (results, latency runs for the plot).
    Latency is measured at rates that follow this machine's budget (0.2 and 0.5 of it), so its figures
    mean the same on any CPU."""
    from stream.embedded_broker import EmbeddedBroker
    payloads = jpegs()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"whole pipeline on 600x400 JPEGs ({np.mean([len(p) for p in payloads]) / 1024:.0f} KiB mean):")
    busy, started = machine_busy(), time.perf_counter()
    time.sleep(2)
    background = (machine_busy() - busy) / (time.perf_counter() - started)
    print(f"  background load before starting: {background:.2f} cores busy"
          + ("  (NOT a quiet machine: wall-clock rates and latencies below suffer)" if background > 0.2 else ""))
    result: dict = {"background_load_cores": round(background, 2)}
    runs: dict = {}
    with EmbeddedBroker() as broker:
        broker.pid = broker._process.pid
        bench = Bench(broker, artifact, payloads, workdir, model=model)
        try:
            if not feed_only:
                runs = _cpu_host(bench, artifact, payloads, seconds, backlog, with_sweep, result)
            result["gpu_feed"] = gpu_feed(bench, backlog, device_us, feed_processes or [1, os.cpu_count() or 1])
        finally:
            bench.close()
    if not feed_only:
        result["targets"] = {"kafka_python_efficiency_ge_0.9": result["efficiency"] >= 0.9,
                             "librdkafka_efficiency_ge_0.95": result["librdkafka"]["efficiency"] >= 0.95}
        said = []
        for client, prefix in (("kafka_python", ""), ("librdkafka", "librdkafka at ")):
            low, mid = (result["latency"][f"{prefix}{f} of the budget"] for f in ("0.2", "0.5"))
            result["targets"] |= {f"{client}_p50_le_40ms_at_0.2_of_budget": low["p50_ms"] <= 40,
                                  f"{client}_p99_le_100ms_at_0.2_of_budget": low["p99_ms"] <= 100,
                                  f"{client}_p99_le_250ms_at_0.5_of_budget": mid["p99_ms"] <= 250}
            said.append(f"{client}: at 0.2 of the budget p50 {low['p50_ms']} ms (<= 40), p99 {low['p99_ms']} ms "
                        f"(<= 100), at 0.5 p99 {mid['p99_ms']} ms (<= 250)")
        print(f"  targets: {'; '.join(said)}; efficiency kafka-python {result['efficiency']} (>= 0.9), "
              f"librdkafka {result['librdkafka']['efficiency']} (>= 0.95): {result['targets']}")
    return result, runs


def _cpu_host(bench: Bench, artifact: Path, payloads: list[bytes], seconds: float, backlog: int, with_sweep: bool,
              result: dict) -> dict:
    """The CPU host: efficiency with each client, latency at fractions of the budget (mixed sizes
    too), the client ceiling; fills ``result`` and returns the latency runs."""
    efficiency(bench, artifact, payloads, backlog, result)
    result["librdkafka"] = {}
    efficiency(bench, artifact, payloads, backlog, result["librdkafka"], kafka_client="librdkafka")
    rate = result["budget"]["images_per_s"]
    low, mid = 0.2 * rate, 0.5 * rate
    print(f"  latency at fractions of the budget ({rate:.0f} img/s):")
    before = bench.latency("old", [("old defaults at 0.2", low)], seconds, **OLD_DEFAULTS)
    after = bench.latency("new", [("0.2 of the budget", low), ("0.5 of the budget", mid)], seconds)
    librdkafka = bench.latency("librdkafka", [("librdkafka at 0.2 of the budget", low),
                                              ("librdkafka at 0.5 of the budget", mid)], seconds,
                               kafka_client="librdkafka")
    mixed_cycle = [huge_png(), *itertools.islice(itertools.cycle(payloads), 149)]
    mixed = bench.latency("mixed", [("mixed sizes at 0.2", low)], seconds, payloads=mixed_cycle)
    runs = {**before, **after, **librdkafka, **mixed}
    result["latency"] = {k: {f: v for f, v in run.items() if f != "latencies_ms"} for k, run in runs.items()}
    kafka = bench.backlog(backlog, "kafka")
    one = bench.backlog(2 * backlog, "decode")      # two members need twice the steady middle
    two = bench.backlog(2 * backlog, "decode", processes=2)
    result["client"] = {"kafka_only_1_process": kafka, "kafka_decode_1_process": one,
                        "kafka_decode_2_processes": two,
                        "scaling_1_to_2": round(two["images_per_s"] / one["images_per_s"], 2)}
    print(f"  client ceiling (consume + produce, one process): {kafka['images_per_s']:.0f} img/s; "
          f"kafka + decode 1 -> 2 processes: {one['images_per_s']:.0f} -> {two['images_per_s']:.0f} img/s "
          f"(x{result['client']['scaling_1_to_2']})")
    if with_sweep:
        print("  defaults, one at a time:")
        result["sweep"] = sweep(bench, low, seconds, backlog)
    return runs


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1], sys.argv[2:]))
