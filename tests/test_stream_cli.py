"""``python -m stream`` start-up: bad flags and bad artifacts end in one line before consuming."""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import fields

import pytest

from stream.cli import main
from stream.config import StreamConfig, env_name

BASE = ["--bootstrap-servers", "127.0.0.1:1", "--input-topic", "in", "--output-topic", "out",
        "--dead-letter-topic", "dlq", "--metrics-port", "0"]


def run(argv, capsys, environ=None):
    code = main(argv, environ or {})
    err = capsys.readouterr().err
    return code, err


def test_missing_required_flag_is_one_line(capsys):
    code, err = run(["--output-topic", "out"], capsys)
    assert code == 1 and err.strip() == "stream: error: missing --bootstrap-servers (or STREAM_BOOTSTRAP_SERVERS)"


def test_environment_twins_fill_every_flag(tmp_path, capsys, small_artifact):
    environ = {"STREAM_BOOTSTRAP_SERVERS": "h:1", "STREAM_INPUT_TOPIC": "a, b", "STREAM_OUTPUT_TOPIC": "o",
               "STREAM_DEAD_LETTER_TOPIC": "d", "STREAM_ARTIFACT": str(small_artifact), "STREAM_MAX_BATCH": "4",
               "STREAM_EXACT_PRECISION": "true", "STREAM_SASL_PASSWORD": "s3cret",
               "STREAM_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "STREAM_SASL_MECHANISM": "PLAIN",
               "STREAM_SASL_USERNAME": "u"}
    from stream.cli import parser
    from stream.config import from_args
    cfg = from_args(parser().parse_args(["--max-batch", "6"]), environ)
    assert cfg.input_topic == ("a", "b") and cfg.exact_precision is True
    assert cfg.max_batch == 6, "a flag wins over its environment twin"
    assert cfg.sasl_password == "s3cret" and "s3cret" not in repr(cfg)


def test_help_lists_every_environment_variable(capsys):
    with pytest.raises(SystemExit):
        main(["--help"], {})
    out = capsys.readouterr().out
    for f in fields(StreamConfig):
        assert env_name(f.name) in out


def test_help_lists_the_allowed_values_of_every_flag_that_has_them(capsys):
    with pytest.raises(SystemExit):
        main(["--help"], {})
    out = " ".join(capsys.readouterr().out.split())
    for f in fields(StreamConfig):
        if f.metadata["choices"]:
            assert f"--{f.name.replace('_', '-')} {{{','.join(f.metadata['choices'])}}}" in out, f.name


@pytest.mark.parametrize("extra,message", [
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--inference-streams", "-1"], "--inference-streams must be >= 0"),
    (["--decode-workers", "-1"], "--decode-workers must be >= 0"),
    (["--output-topic", "in"], "must differ from the input topics"),
    (["--input-topic", "photos:new"], "--input-topic 'photos:new': a Kafka topic name is 1 to 249 of a-z"),
    (["--dead-letter-topic", "x" * 250], "--dead-letter-topic 'xxxx"),
    (["--input-codec", "nope"], "--input-codec nope: no such plugin"),
    (["--precision", "fp16", "--backend", "tensorrt"], "TensorRT"),
    (["--bootstrap-servers", "kafka:notaport"], "expected HOST:PORT"),
    (["--security-protocol", "SSL", "--ssl-cafile", "/nonexistent/ca.pem"],
     "--ssl-cafile /nonexistent/ca.pem: no such file"),
    (["--security-protocol", "SSL", "--ssl-cafile", __file__], f"--ssl-cafile {__file__}: no BEGIN CERTIFICATE in it"),
    (["--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "PLAIN"],
     "--sasl-mechanism PLAIN needs --sasl-username and --sasl-password"),
    (["--session-timeout-ms", "1"], "--session-timeout-ms must be at least 1000"),
    (["--fetch-max-wait-ms", "30000"], "--fetch-max-wait-ms 30000: at most 29000"),
    (["--max-message-bytes", "1000000000"], "--max-message-bytes 1000000000: at most 999934464"),
    (["--max-batch", "100000000", "--max-in-flight", "100000000"], "--max-batch 100000000: at most 4096"),
    (["--decode-workers", "100000"], "--decode-workers 100000: at most 1024"),
    (["--stall-timeout-s", "0.001"], "--stall-timeout-s must be at least 1"),
    (["--bootstrap-servers", "127.0.0.1:1 127.0.0.2:1"], "expected HOST:PORT"),
    (["--bootstrap-servers", "http://127.0.0.1:1"], "expected HOST:PORT"),
    (["--dead-letter-topic", "out"], "--output-topic and --dead-letter-topic must differ"),
    (["--metrics-port", "65534", "--processes", "3"], "the children's ports 65534..65536 pass 65535"),
    (["--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "OAUTHBEARER", "--sasl-username", "u"],
     "--sasl-mechanism OAUTHBEARER: choose from PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    (["--transactional-id", "pod-a"],
     "--transactional-id would be ignored without --processing-guarantee exactly-once"),
    (["--compression-type", "brotli"], "--compression-type brotli: choose from"),
    (["--assignment-strategy", "cooperative-sticky"],
     "--assignment-strategy cooperative-sticky needs --kafka-client librdkafka"),
    (["--max-batch", "many"], "--max-batch='many': expected int"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--sasl-mechanism", "PLAIN", "--sasl-username", "bob"],
     "--sasl-mechanism, --sasl-username would be ignored under --security-protocol PLAINTEXT: use SASL_PLAINTEXT "
     "or SASL_SSL"),
    (["--security-protocol", "SSL", "--sasl-mechanism", "PLAIN"], "--sasl-mechanism would be ignored under "
                                                                   "--security-protocol SSL"),
    (["--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "PLAIN", "--ssl-cafile", __file__],
     "--ssl-cafile would be ignored under --security-protocol SASL_PLAINTEXT: use SSL or SASL_SSL"),
])
def test_bad_config_is_one_line(extra, message, capsys, small_artifact):
    code, err = run(BASE + ["--artifact", str(small_artifact)] + extra, capsys)
    assert code == 1 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_plugin_that_cannot_load_is_one_line_and_no_child_starts(broken_plugins, processes, capsys, small_artifact):
    def no_child(argv, index, port):
        raise AssertionError("a child was started")
    for name in broken_plugins:
        code = main(BASE + ["--artifact", str(small_artifact), "--input-codec", name, "--processes", processes], {},
                    child_command=no_child)
        err = capsys.readouterr().err
        assert code == 1 and err.startswith(f"stream: error: --input-codec {name}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("extra,message", [
    (["--max-delay-ms", "1e16", "--no-adaptive-batching"], "--max-delay-ms 1e+16: at most 60000"),
    (["--max-delay-ms", "5000", "--stall-timeout-s", "5"], "--max-delay-ms must be below --stall-timeout-s"),
    (["--commit-interval-ms", "1e300"], "--commit-interval-ms 1e+300: at most 3600000"),
    (["--drain-timeout-s", "7200", "--max-poll-interval-ms", "86400000"], "--drain-timeout-s 7200.0: at most 3600"),
    (["--fail-after-s", "1e10"], "--fail-after-s 10000000000.0: at most 86400"),
    (["--stall-timeout-s", "1e10"], "--stall-timeout-s 10000000000.0: at most 86400"),
    (["--max-in-flight", "10000000000"], "--max-in-flight 10000000000: at most 1000000"),
    (["--max-in-flight-bytes", "100000000000"], "--max-in-flight-bytes 100000000000: at most 68719476736"),
    (["--max-pixels", "2000000000"], "--max-pixels 2000000000: at most 1073741824"),
    (["--max-poll-records", "2000000"], "--max-poll-records 2000000: at most 1000000"),
    (["--processes", "100000"], "--processes 100000: at most 256"),
    (["--backend", "openvino", "--inference-streams", "3", "--inference-threads", "1"],
     "--inference-streams 3 with --inference-threads 1: each stream needs an inference thread of its own"),
])
def test_a_value_the_config_refuses_is_one_line_before_anything_is_built(extra, message, capsys):
    """Before: each of these passed validation; --max-delay-ms 1e16 then killed the inference thread
    (OverflowError in its queue wait) and the member exited as stalled, and 3 streams asked with 1
    thread ran 1 stream on OpenVINO (said nowhere) or 3 one-thread sessions on ONNX Runtime."""
    def accepted(*args):
        raise AssertionError(f"accepted: {extra}")
    code = main(BASE + ["--artifact", "a"] + extra, {}, build=accepted, child_command=accepted)
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("backend", ["tensorrt", "auto"])
def test_streams_beyond_the_threads_are_refused_only_where_threads_bound_them(backend):
    """TensorRT's streams are GPU contexts; auto may run TensorRT, and on a CPU host the runtime caps the streams at
    the threads and the start-up line says so (auto was refused: a valid GPU setting could not start)."""
    StreamConfig(bootstrap_servers="h:1", input_topic=("in",), output_topic="out", dead_letter_topic="dlq",
                 artifact="a", backend=backend, inference_streams=3, inference_threads=1)


def test_an_env_twin_is_named_only_for_the_flag_the_error_is_about(capsys):
    """A check that named six flags at once blamed whichever of them came from the environment: a valid
    STREAM_LINGER_MS was named for a bad --decode-workers."""
    code = main(BASE + ["--artifact", "a", "--decode-workers", "-1"], {"STREAM_LINGER_MS": "5"})
    err = capsys.readouterr().err
    assert code == 1 and "--decode-workers must be >= 0" in err and "STREAM_LINGER_MS" not in err, err


def test_every_number_option_has_a_bound():
    """Every size and time is bounded (a wait built from one must stay under threading.TIMEOUT_MAX);
    the metrics port has its own check."""
    import threading

    from stream.config import LIMITS, OPTIONS
    numbers = {f.name for f in OPTIONS.fields if OPTIONS.kind(f.name) in (int, float)} - {"metrics_port"}
    assert sorted(numbers - set(LIMITS)) == []
    assert all(LIMITS[n] / (1 if n.endswith("_s") else 1000) < threading.TIMEOUT_MAX for n in numbers)


def test_tampered_artifact_is_refused_before_consuming(small_artifact, tmp_path, capsys):
    from engine_build.artifact import select
    copy = tmp_path / "art"
    shutil.copytree(small_artifact, copy)
    chosen = select(copy, "onnxruntime")[1].file          # the file ONNX Runtime would run
    data = bytearray(chosen.read_bytes())
    data[-10] ^= 0xFF
    chosen.write_bytes(bytes(data))
    code, err = run(BASE + ["--artifact", str(copy), "--backend", "onnxruntime"], capsys)
    assert code == 1 and "does not match its manifest" in err and err.count("\n") == 1


def test_missing_artifact_is_refused(capsys, tmp_path):
    code, err = run(BASE + ["--artifact", str(tmp_path / "none")], capsys)
    assert code == 1 and "does not exist" in err


def test_gate_failure_for_lowered_precision_is_respected(small_artifact, tmp_path):
    """A runtime that lowers precision must have passed its gate, or be told to run exact."""
    import json

    from engine_build.artifact import select
    from engine_build.errors import ArtifactError
    copy = tmp_path / "art"
    shutil.copytree(small_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for check in manifest["validation"]["checks"]:
        if check["runtime"] == "openvino" and check["mode"] == "default":
            check["passed"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="failed its validation gate; --exact-precision"):
        select(copy, "openvino")
    _, choice = select(copy, "openvino", exact=True)
    assert choice.exact and choice.precision == "int8"
    _, auto = select(copy, "auto")
    assert auto.backend == "onnxruntime" and auto.precision == "int8"


def test_default_precision_is_fastest_passing(small_artifact):
    from engine_build.artifact import select
    _, choice = select(small_artifact, "openvino")
    assert choice.precision == "int8" and not choice.exact
    cfg = StreamConfig("h:1", ("in",), "out", "dlq", small_artifact)
    assert cfg.precision is None


def test_metrics_port_in_use_is_one_line(small_artifact, capsys):
    import socket
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = BASE[:-1] + [str(port), "--artifact", str(small_artifact)]
        code, err = run(argv, capsys)
    assert code == 1 and f"--metrics-port {port}:" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("name,value,message", [
    ("STREAM_EXACT_PRECISION", "maybe", "STREAM_EXACT_PRECISION='maybe': expected one of"),
    ("STREAM_BOOTSTRAP_SERVERS", "kafka:notaport", "expected HOST:PORT"),
    ("STREAM_MAX_BATCH", "-3", "--max-batch must be at least 1"),
    ("STREAM_INFERENCE_STREAMS", "two", "STREAM_INFERENCE_STREAMS='two': expected int"),
])
def test_bad_environment_values_are_one_line_before_the_model_loads(name, value, message, capsys, tmp_path):
    environ = {"STREAM_BOOTSTRAP_SERVERS": "127.0.0.1:1", "STREAM_INPUT_TOPIC": "in", "STREAM_OUTPUT_TOPIC": "out",
               "STREAM_DEAD_LETTER_TOPIC": "dlq", "STREAM_METRICS_PORT": "0",
               "STREAM_ARTIFACT": str(tmp_path / "no-artifact"), name: value}
    code, err = run([], capsys, environ)
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert "artifact" not in err, "config is validated before the artifact is opened"


def test_log_level_is_accepted_in_any_case(small_artifact):
    from stream.cli import parser
    from stream.config import from_args
    cfg = from_args(parser().parse_args([]), {"STREAM_LOG_LEVEL": "info", "STREAM_BOOTSTRAP_SERVERS": "h:1",
                                              "STREAM_INPUT_TOPIC": "i", "STREAM_OUTPUT_TOPIC": "o",
                                              "STREAM_DEAD_LETTER_TOPIC": "d", "STREAM_ARTIFACT": str(small_artifact)})
    assert cfg.log_level == "INFO"


def test_switches_have_a_no_form_and_their_twins_take_true_or_false():
    """A switch that is on by default is turned off by ``--no-x`` or ``STREAM_X=false``; a flag wins."""
    from stream.cli import parser
    from stream.config import from_args
    assert from_args(parser().parse_args(BASE + ["--artifact", "a"]), {}).adaptive_batching is True
    off = from_args(parser().parse_args(BASE + ["--artifact", "a", "--no-adaptive-batching", "--no-reduced-decode"]),
                    {})
    assert off.adaptive_batching is False and off.reduced_decode is False
    environ = {"STREAM_ADAPTIVE_BATCHING": "false", "STREAM_UNORDERED": "yes"}
    cfg = from_args(parser().parse_args(BASE + ["--artifact", "a"]), environ)
    assert cfg.adaptive_batching is False and cfg.unordered is True
    cfg = from_args(parser().parse_args(BASE + ["--artifact", "a", "--adaptive-batching", "--no-unordered"]), environ)
    assert cfg.adaptive_batching is True and cfg.unordered is False


def test_processes_start_children_that_share_the_flags_and_their_failure_is_the_exit_code(tmp_path, capsys):
    from stream.supervisor import child_argv
    assert child_argv(["--group-id", "g"], 2, 9108)[-7:] == ["--group-id", "g", "--processes", "1",
                                                             "--metrics-port", "9110", "--no-latency-lane"]
    assert child_argv([], 1, 0)[-2] == "0"
    code = main(BASE + ["--artifact", str(tmp_path / "missing"), "--processes", "2"], {})
    assert code == 1


def test_the_failing_child_s_code_is_returned_not_the_sigterm_it_caused_a_sibling():
    """One child fails while the other still runs: the supervisor stops the other, which then dies of
    SIGTERM (143), and must exit with the failure's own code, whichever child failed."""
    from stream.supervisor import supervise
    commands = [[sys.executable, "-c", "import time; time.sleep(30)"], [sys.executable, "-c", "raise SystemExit(3)"]]
    started = time.monotonic()
    assert supervise([], 2, 0, command=lambda argv, index, port: commands[index]) == 3
    assert time.monotonic() - started < 20      # the sleeper was stopped, not waited for


def test_processes_give_each_child_its_own_stable_transactional_id(tmp_path, small_artifact):
    """Children sharing one transactional id fence each other: each gets the id plus its index,
    whether the id came as a flag or as its environment twin."""
    seen: list[list[str]] = []

    def record(argv, index, port):
        seen.append(list(argv))
        return [sys.executable, "-c", "pass"]
    flags = BASE + ["--artifact", str(small_artifact), "--processing-guarantee", "exactly-once", "--processes", "2"]
    assert main(flags, {"STREAM_TRANSACTIONAL_ID": "pod-a"}, child_command=record) == 0
    assert main(flags + ["--transactional-id", "pod-b"], {}, child_command=record) == 0
    ids = [argv[len(argv) - argv[::-1].index("--transactional-id")] for argv in seen]   # the last one wins
    assert ids == ["pod-a-0", "pod-a-1", "pod-b-0", "pod-b-1"]


def test_each_child_s_log_lines_carry_its_index_and_start_with_what_it_runs(small_artifact, tmp_path):
    """``--processes 2`` with the broker away: both children keep retrying, each line tagged with its
    child's index; each child's first line names the guarantee, the Kafka client and the runtime."""
    import signal
    import subprocess
    from importlib.metadata import version
    log = tmp_path / "supervisor.log"
    argv = [sys.executable, "-m", "stream", *BASE, "--artifact", str(small_artifact), "--processes", "2",
            "--decode-workers", "1"]
    process = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        # each child says once that connecting fails and it retries (readiness was never up: no line of its own)
        while time.monotonic() < deadline and not all(f"[p{i}] stream.failures" in log.read_text() for i in (0, 1)):
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    text = log.read_text()
    assert code == 0, text[-2000:]
    for i in (0, 1):
        starts = [line for line in text.splitlines() if f"[p{i}] stream: starting:" in line]
        assert len(starts) == 1 and "at-least-once" in starts[0], text[-2000:]
        assert f"kafka-python {version('kafka-python')}" in starts[0] and "inference runtime" in starts[0]
        assert f"[p{i}] stream.service" in text


def test_metrics_include_the_standard_process_metrics():
    from stream.metrics import Metrics
    text = Metrics().render().decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds"):
        assert f"\n{name} " in text, name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_children_end_when_their_supervisor_is_killed(tmp_path):
    """kill -9 (or the OOM killer) of the --processes supervisor: its children get SIGTERM instead of consuming
    on, orphaned, beside the set its restart starts."""
    import os
    import signal
    import subprocess
    child = f"import time; open({str(tmp_path / 'started')!r}, 'w').close(); time.sleep(120)"
    script = ("import sys; from stream.supervisor import supervise; "
              f"sys.exit(supervise([], 1, 0, command=lambda argv, i, port: [sys.executable, '-c', {child!r}]))")
    supervisor = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        children = (f"/proc/{supervisor.pid}/task/{supervisor.pid}/children")
        (pid,) = [int(p) for p in open(children).read().split()]
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait(10)

        def ended() -> bool:   # gone, or a zombie not yet reaped by init
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    return stat.read().rsplit(") ", 1)[-1].startswith("Z")
            except FileNotFoundError:
                return True
        deadline = time.monotonic() + 20
        while not ended() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not ended():
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the child ran on after its supervisor was killed")
    finally:
        supervisor.kill()


def _sighup_default(argv: list[str]) -> list[str]:
    """``argv`` run with SIGHUP's default disposition, whatever this test run inherited (a suite started under
    nohup ignores it, and its children would too)."""
    return [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
            "os.execv(sys.argv[1], sys.argv[1:])", *argv]


def test_a_listener_the_client_cannot_start_a_session_with_is_said_with_what_to_check(small_artifact, tmp_path):
    """A port that accepts TCP but where the Kafka client cannot bootstrap (here: not Kafka at all; in
    production a broker still starting, or a TLS or SASL mismatch) is waited out as an outage, and the line
    says what to check instead of only 'cannot reach Kafka'. Then its terminal goes away (SIGHUP): it drains
    and exits 0, saying so, as after SIGTERM, instead of dying at once with no line (exit 129)."""
    import signal
    import socket
    import subprocess
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def hang_up_on_everyone() -> None:   # what a TLS listener does to a plaintext client
        while True:
            try:
                listener.accept()[0].close()
            except OSError:
                return
    threading.Thread(target=hang_up_on_everyone, daemon=True).start()
    log = tmp_path / "service.log"
    argv = [sys.executable, "-m", "stream", "--bootstrap-servers", f"127.0.0.1:{listener.getsockname()[1]}",
            "--input-topic", "in", "--output-topic", "out", "--dead-letter-topic", "dlq", "--metrics-port", "0",
            "--artifact", str(small_artifact), "--decode-workers", "1", "--fail-after-s", "2"]
    process = subprocess.Popen(_sighup_default(argv), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "cannot start a session" not in log.read_text():
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGHUP)
        code = process.wait(60)
        listener.close()
    text = log.read_text()
    assert "accepts connections but the Kafka client cannot start a session there" in text, text[-2000:]
    assert "check --security-protocol" in text, text[-2000:]
    assert code == 0 and "SIGHUP: draining" in text, text[-2000:]


def test_a_service_started_under_nohup_keeps_ignoring_sighup():
    """``nohup python -m stream ... &``: SIGHUP was ignored when it started and stays ignored (only SIGTERM and
    SIGINT stop it); otherwise SIGHUP drains it as SIGTERM does."""
    import subprocess
    probe = ("import signal; from stream.supervisor import stop_signals; "
             "print(sorted(s.name for s in stop_signals()))")
    plain = subprocess.run(_sighup_default([sys.executable, "-c", probe]), capture_output=True, text=True, timeout=60)
    ignored = subprocess.run([sys.executable, "-c", "import signal, subprocess, sys; "
                              "signal.signal(signal.SIGHUP, signal.SIG_IGN); "
                              f"sys.exit(subprocess.call([sys.executable, '-c', {probe!r}]))"],
                             capture_output=True, text=True, timeout=60)
    assert plain.stdout.strip() == "['SIGHUP', 'SIGINT', 'SIGTERM']", plain.stderr
    assert ignored.stdout.strip() == "['SIGINT', 'SIGTERM']", ignored.stderr
