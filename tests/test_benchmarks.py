"""The benchmarks that need no broker still run (their numbers are read by people, never asserted), and
the arithmetic they report with is right."""
from __future__ import annotations

import json
import re

import pytest

import stream.pipeline
from benchmarks import processor_overhead

from .waiting import ends_with_its_parent


def test_processor_overhead_runs_and_every_message_is_acknowledged(capsys: pytest.CaptureFixture[str]) -> None:
    decode_before = stream.pipeline.decode
    # one_run raises if any message is never acknowledged or a thread does not stop; 1,500 messages
    # run into the 512 pause mark more than once
    assert processor_overhead.main(["--messages", "1500", "--runs", "2"]) == 0
    line = capsys.readouterr().out
    assert re.match(r"processor overhead: \d+\.\d us of CPU a message", line), line
    assert stream.pipeline.decode is decode_before   # the stub decoder does not leak into later tests


def test_the_budget_around_a_run_is_the_mean_cost_of_the_two_not_the_mean_rate() -> None:
    from benchmarks.service_bench import budget_around

    def cost(decode_ms: float, infer_ms: float) -> dict:
        return {"decode_core_ms": decode_ms, "inference_core_ms": infer_ms, "inference_wall_ms": infer_ms / 2,
                "cpus": 2, "images_per_s": round(2000 / (decode_ms + infer_ms), 1), "batch": 32,
                "passes_core_ms": {"decode": [decode_ms] * 3, "inference": [infer_ms] * 3}}
    both = budget_around(cost(1.0, 4.0), cost(0.9, 3.1))     # 400 and 500 img/s
    assert (both["decode_core_ms"], both["inference_core_ms"]) == (0.95, 3.55)
    assert both["images_per_s"] == 444.4                 # 2 cores / 4.5 ms, not (400 + 500) / 2
    assert both["before_after_images_per_s"] == [400.0, 500.0]
    assert both["passes_core_ms"]["after"]["decode"] == [0.9] * 3 and both["batch"] == 32


def test_gpu_check_runs_every_step_on_the_tensorrt_double(trt_double, tmp_path, capsys) -> None:
    """scripts/gpu-check.sh's default path (no --artifact: build a placeholder with an engine, then
    measure it) raised TypeError on every GPU host; each step must run and say what it proved."""
    from benchmarks import gpu_check
    assert gpu_check.main(["versions"]) == 0
    assert "proved: cuda-python" in capsys.readouterr().out
    assert gpu_check.main(["cuda", "--mib", "1"]) == 0
    assert "every byte identical" in capsys.readouterr().out
    assert gpu_check.main(["tensorrt", "--max-batch", "8", "--repeats", "2", "--width", "0.25",
                           "--work", str(tmp_path / "work"), "--output", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "passed its validation gate" in out and "batches 1/8" in out, out
    assert json.loads((tmp_path / "results" / "gpu-nvidia-h200.json").read_text())["rows"][1]["batch"] == 8
    assert trt_double.builds, "an engine was built"


def test_gpu_check_steps_run_one_at_a_time_and_say_what_they_skipped() -> None:
    import subprocess
    import sys
    from pathlib import Path

    from engine_build.runtime import available_backends
    reason = available_backends()["tensorrt"]
    if not reason:
        pytest.skip("TensorRT is present here: scripts/gpu-check.sh tests runs the real gpu tests")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["bash", str(script), "tests"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== tests:" in done.stdout and "== versions" not in done.stdout and "== throughput" not in done.stdout
    assert f"skipped: gpu tests (tests/test_gpu.py): {reason}" in done.stdout
    assert "nothing failed; what was skipped above was not proved on this host" in done.stdout
    wrong = subprocess.run(["bash", str(script), "everything"], capture_output=True, text=True, timeout=60, env=env)
    assert wrong.returncode == 1 and wrong.stderr == "usage: gpu-check.sh [versions|tests|throughput]\n"


def test_gpu_check_versions_skips_what_this_host_lacks_instead_of_failing(tmp_path) -> None:
    """No NVIDIA driver: the versions step is skipped, saying so; a driver without cuda-python: its two
    cuda-python parts are skipped with the install line; neither is a failure (exit 0)."""
    import importlib.util
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    if importlib.util.find_spec("cuda") is not None or shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        pytest.skip("cuda-python or an NVIDIA driver is installed here: the versions step runs for real")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"
    no_driver = subprocess.run(["bash", str(script), "versions"], capture_output=True, text=True, timeout=120,
                               env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert no_driver.returncode == 0, no_driver.stdout + no_driver.stderr
    assert "skipped: versions and cuda-python buffers: no NVIDIA driver on this host" in no_driver.stdout
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'a GPU, 580.00, 9.0, 80000 MiB'\n")
    fake.chmod(0o755)
    driver = subprocess.run(["bash", str(script), "versions"], capture_output=True, text=True, timeout=120,
                            env={"PYTHON": sys.executable, "PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert driver.returncode == 0, driver.stdout + driver.stderr
    for step in ("versions", "cuda-python buffers/copies/streams"):
        assert f"skipped: {step}: cuda-python is not installed: pip install" in driver.stdout, driver.stdout
    assert "FAILED" not in driver.stdout


@pytest.mark.kafka
def test_kafka_clients_benchmark_runs_both_clients_and_names_the_cpu(tmp_path, capsys) -> None:
    import json

    from benchmarks import kafka_clients
    out = tmp_path / "clients.json"
    # a short session timeout: each round joins a new group, and a join waits about half of it (10 s by default)
    assert kafka_clients.main(["--records", "60", "--value-bytes", "2000", "--rounds", "1", "--out", str(out),
                               "--session-timeout-ms", "3000"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("CPU: ") and "kafka-python" in text and "librdkafka" in text
    results = json.loads(out.read_text())
    assert results["cpu"]["model"] and set(results["runs"]) == {"kafka-python", "librdkafka"}
    assert all(r["core_ms_per_record"] > 0 for runs in results["runs"].values() for r in runs)


def test_throughput_caps_openvinos_kernels_for_itself_and_says_so(small_artifact, tmp_path, capsys,
                                                                  monkeypatch) -> None:
    """--max-cpu-isa sets oneDNN's cap in the benchmark's environment, which every service it starts inherits,
    names it in the machine line and records it in the results file."""
    import json
    import os

    from benchmarks.throughput import main
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)   # restored after the test
    assert main(["--artifact", str(small_artifact), "--skip-pipeline", "--variants", "fp32", "--batch-sizes", "1",
                 "--repeats", "1", "--no-opencv", "--max-cpu-isa", "avx512_core", "--output", str(tmp_path)]) == 0
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
    assert "OpenVINO's kernels capped at AVX512_CORE" in capsys.readouterr().out
    (written,) = tmp_path.glob("*.json")
    assert json.loads(written.read_text())["max_cpu_isa"] == "avx512_core"


@pytest.mark.parametrize(("argv", "said"), [
    (["--gpu-feed", "--feed-processes", "0"], "argument --feed-processes: 0 is not allowed: must be at least 1"),
    (["--gpu-feed", "--device-us", "-5"], "argument --device-us: -5 is not allowed: must be at least 0"),
    (["--quick", "--latency-seconds", "0"], "argument --latency-seconds: 0 is not allowed: must be at least 1"),
    (["--quick", "--latency-seconds", "0.01"], "argument --latency-seconds: 0.01 is not allowed: must be at least 1"),
    (["--quick", "--latency-seconds", "nan"], "argument --latency-seconds: nan is not allowed"),
    (["--skip-pipeline", "--batch-sizes", "0"], "argument --batch-sizes: 0 is not allowed: must be at least 1"),
    (["--skip-pipeline", "--repeats", "0"], "argument --repeats: 0 is not allowed: must be at least 1"),
    (["--quick", "--backlog", "100"], "--backlog 100 leaves too few steady results to read a rate from"),
    (["--quick", "--skip-pipeline"], "nothing to measure"),
    (["--gpu-feed", "--sweep"], "--sweep varies the CPU host's defaults, which --gpu-feed does not run"),
])
def test_throughput_refuses_a_bad_option_in_one_line_before_building_or_measuring_anything(
        argv: list[str], said: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each of these ran for minutes and then raised a traceback (ZeroDivisionError, IndexError, an empty
    max(), a backlog too small for a steady window) or measured nothing (a negative device time)."""
    from benchmarks.throughput import main
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--workdir", str(work), "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("throughput.py: error: ") and said in last, last
    assert not work.exists(), "nothing was built"


def test_throughput_quick_keeps_an_explicit_backlog_and_latency_length(tmp_path) -> None:
    """--quick shortened the runs by overwriting --backlog and --latency-seconds even when they were given."""
    from benchmarks.throughput import options
    given = options(["--quick", "--backlog", "9000", "--latency-seconds", "3", "--output", str(tmp_path)])
    assert (given.backlog, given.latency_seconds, given.skip_models) == (9000, 3.0, True)
    default = options(["--quick", "--output", str(tmp_path)])
    assert (default.backlog, default.latency_seconds) == (6000, 8.0)
    assert (options(["--output", str(tmp_path)]).backlog, options(["--output", str(tmp_path)]).latency_seconds) \
        == (8000, 20.0)


@pytest.mark.parametrize("script", ["throughput", "exactly_once"])
def test_a_benchmark_says_a_missing_artifact_in_one_line(script: str, tmp_path) -> None:
    """A missing --artifact was an ArtifactError traceback."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / f"{script}.py"), "--artifact",
                           str(tmp_path / "absent"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == f"{script}.py: error: artifact directory {tmp_path / 'absent'} does not exist"


@pytest.mark.parametrize(("script", "argv"), [("throughput", ["--skip-pipeline", "--workdir"]),
                                              ("gpu_check", ["tensorrt", "--work"])])
def test_a_benchmark_refuses_an_output_it_cannot_make_before_measuring(script: str, argv: list[str], tmp_path,
                                                                        capsys) -> None:
    """An --output that could not be made failed with a traceback after the whole run (minutes; gpu_check:
    after the engine was built and timed)."""
    import importlib
    main = importlib.import_module(f"benchmarks.{script}").main
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main([*argv, str(tmp_path / "work"), "--output", str(blocker / "out")])
    assert exit_.value.code == 2
    assert f"--output {blocker / 'out'}: Not a directory" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_the_gpu_feed_with_no_device_time_measures_the_host_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """--device-us 0 ("the host alone", as its help says) was let through to the GPU feed, which divided
    by it: a ZeroDivisionError once the broker was up (after the whole CPU-host run, without --gpu-feed)."""
    from benchmarks.service_bench import gpu_feed

    class Drained:   # what Bench.backlog reports, without a broker or a service
        def backlog(self, messages: int, mode: str, processes: int, **_: object) -> dict:
            assert mode == "gpu:0"
            return {"images_per_s": 1000.0, "thread_core_ms_per_image": {"decode": 0.9, "poll-loop": 0.1},
                    "broker_core_ms_per_image": 0.1}
    out = gpu_feed(Drained(), 6000, 0.0, [1])   # type: ignore[arg-type]
    assert out["device_us_per_image"] == 0 and out["device_images_per_s"] is None
    assert out["runs"]["kafka-python x1"]["service_core_ms_per_image"] == 1.0
    assert "no device time" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "said"), [
    (["--messages", "32"], "argument --messages: 32 is not allowed: must be at least 64"),
    (["--output", "{blocker}/out"], "--output {blocker}/out: Not a directory"),
])
def test_exactly_once_refuses_a_bad_option_in_one_line_before_starting_anything(
        argv: list[str], said: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """--messages of one batch or less (32) ran every configuration at 0 img/s (the rate is timed from
    the first finished batch) and then raised a ZeroDivisionError; an --output it could not make was a
    traceback after the whole run."""
    from benchmarks.exactly_once import main
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = [a.format(blocker=blocker) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(["--artifact", str(tmp_path / "absent"), "--output", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert said.format(blocker=blocker) in last, last



@pytest.mark.parametrize(("argv", "said"), [
    (["--session-timeout-ms", "999"], "--session-timeout-ms must be at least 1000"),
    (["--session-timeout-ms", "1800001"], "--session-timeout-ms 1800001: at most 1800000"),
    (["--out", "{blocker}/out.json"], "--out {blocker}/out.json: cannot write in {blocker}"),
])
def test_kafka_clients_refuses_a_bad_option_in_one_line_before_starting_the_broker(
        argv: list[str], said: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """The service's own check refused these only once each round built its consumer: after the broker had
    started and taken every record (260 MB by default), and an --out it could not write after every round."""
    from benchmarks import kafka_clients
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:
        kafka_clients.main(["--records", "1", *(a.format(blocker=blocker) for a in argv)])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("kafka_clients.py: error: ") and said.format(blocker=blocker) in last, last


def test_a_service_the_benchmark_started_ends_when_the_benchmark_is_killed(small_artifact, tmp_path) -> None:
    """A benchmark stopped with SIGKILL left its service running, retrying a broker that had gone with it."""
    import signal
    script = ("import sys, time; sys.path.insert(0, '.'); from pathlib import Path; "
              "from benchmarks.service_bench import start_service; "
              f"p = start_service('127.0.0.1:9', 'in', 'g', Path({str(small_artifact)!r}), "
              f"Path({str(tmp_path / 'service.log')!r})); print(p.pid, flush=True); time.sleep(600)")
    ends_with_its_parent(script, signal.SIGKILL, "the service")

