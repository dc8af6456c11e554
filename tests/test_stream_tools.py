"""The tools a newcomer runs beside the service: ``python -m stream.broker`` (the bundled broker in the
foreground) and ``python -m stream.topics`` (list and create topics with no Kafka tools installed)."""
from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from stream.embedded_broker import free_port
from stream.topics import main as topics

from .waiting import ends_with_its_parent

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[1]


def _lines(stream) -> queue.Queue:
    """The lines a child writes, read on a thread so every wait for one can be bounded."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_the_broker_command_serves_until_ctrl_c_then_stops_and_frees_its_port(capsys):
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "stream.broker", "--port", str(port)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = _lines(child.stdout)
        assert f"listening on 127.0.0.1:{port}; Ctrl-C stops it" in out.get(timeout=60)
        bootstrap = f"127.0.0.1:{port}"
        assert topics(["--bootstrap-servers", bootstrap, "create", "walk-in", "walk-out", "--partitions", "3"]) == 0
        assert capsys.readouterr().out.splitlines() == ["walk-in: created with 3 partitions",
                                                        "walk-out: created with 3 partitions"]
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) == 0
        assert "broker stopped" in out.get(timeout=5)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    from stream.broker import _port_free
    assert _port_free(port), "the broker process is gone with the command"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_the_broker_ends_with_the_process_that_started_it_however_that_ends(how):
    """The broker (tansu, a child process holding every record in memory) outlived a parent killed with
    SIGKILL, or with SIGTERM where the parent has no handler for it (a test run or a benchmark stopped by a
    timeout): eight were found still running after one morning's runs."""
    script = ("import time; from stream.embedded_broker import EmbeddedBroker; "
              "print(EmbeddedBroker().start()._process.pid, flush=True); time.sleep(600)")
    ends_with_its_parent(script, how, "the broker", timeout=30)


def test_a_port_in_use_is_one_line(kafka_broker, capsys):
    from stream.broker import main as broker
    assert broker(["--port", str(kafka_broker.port)]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{kafka_broker.port} is in use" in err and err.count("\n") == 1


def test_topics_creates_lists_and_leaves_an_existing_topic_as_it_is(kafka_broker, capsys):
    base = ["--bootstrap-servers", kafka_broker.bootstrap]
    assert topics([*base, "create", "tools-a", "--partitions", "2"]) == 0
    assert topics([*base, "create", "tools-a", "tools-b", "--partitions", "5"]) == 0
    assert capsys.readouterr().out.splitlines() == ["tools-a: created with 2 partitions",
                                                    "tools-a: exists (2 partitions), left as it is",
                                                    "tools-b: created with 5 partitions"]
    assert topics(["list"], {"STREAM_BOOTSTRAP_SERVERS": kafka_broker.bootstrap}) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "tools-a\t2 partitions" in listed and "tools-b\t5 partitions" in listed
    kafka_broker.delete_topics(["tools-a", "tools-b"])


@pytest.mark.parametrize("argv,message", [
    (["list"], "missing --bootstrap-servers (or STREAM_BOOTSTRAP_SERVERS)"),
    (["--bootstrap-servers", "h:1", "create", "t"], "the following arguments are required: --partitions"),
    (["--bootstrap-servers", "h:1", "create", "t", "--partitions", "0"], "--partitions 0: from 1 to 10000"),
    (["--bootstrap-servers", "h:1", "create", "t", "--partitions", "100000000"], "--partitions 100000000: from 1"),
    (["--bootstrap-servers", "h:1", "create", "bad topic!", "--partitions", "1"], "'bad topic!': a Kafka topic name"),
    (["--bootstrap-servers", "h:1", "create", "t", "--partitions", "1", "--replication-factor", "0"],
     "--replication-factor 0: at least 1"),
    (["--bootstrap-servers", "h:1", "read", "t", "--idle-s", "nan"], "read: --idle-s must be a number above 0"),
    (["--bootstrap-servers", "h:1", "read", "t", "--idle-s", "inf"], "read: --idle-s must be a number above 0"),
    (["--bootstrap-servers", "h:1", "--security-protocol", "SASL_SSL", "list"], "needs --sasl-mechanism"),
])
def test_topics_usage_errors_are_one_line_exit_1(argv, message, capsys):
    assert topics(argv, {}) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_topics_publishes_files_and_reads_them_back(kafka_broker, tmp_path, capsys):
    from engine_build.imaging import builtin_photos
    base = ["--bootstrap-servers", kafka_broker.bootstrap]
    photo = builtin_photos()[0]
    note = tmp_path / "note.txt"
    note.write_text("not a photo")
    assert topics([*base, "create", "tools-in", "--partitions", "1"]) == 0
    assert topics([*base, "publish", "tools-in", str(photo), str(note)]) == 0
    assert "published 2 file(s) to 'tools-in'" in capsys.readouterr().out
    assert topics([*base, "read", "tools-in", "--max", "2", "--idle-s", "30"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{photo.name}\t<{photo.stat().st_size} bytes>", "note.txt\tnot a photo"]
    assert "read 2 record(s)" in captured.err
    kafka_broker.delete_topics(["tools-in"])


def test_reading_or_publishing_a_missing_topic_is_one_line_and_creates_nothing(kafka_broker, tmp_path, capsys):
    base = ["--bootstrap-servers", kafka_broker.bootstrap]
    assert topics([*base, "read", "tools-typo"]) == 1
    assert topics([*base, "publish", "tools-typo", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("topic 'tools-typo' does not exist") == 2 and err.count("\n") == 2, err
    assert topics([*base, "list"]) == 0
    assert "tools-typo" not in capsys.readouterr().out


def test_topics_read_shows_a_dead_letter_with_a_null_header_value():
    """A null header value goes on to a dead letter (librdkafka keeps it null); showing it raised AttributeError."""
    from types import SimpleNamespace

    from stream.topics import _shown
    record = SimpleNamespace(key=b"k", value=b"v", headers=[("error.reason", b"not_an_image"), ("trace", None),
                                                            ("error.message", b"no image")])
    assert _shown(record) == "k\tdead letter: not_an_image: no image"
