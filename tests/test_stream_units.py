"""Service logic against the in-process fake broker: fast, no Kafka client involved."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine_build.errors import ConfigError
from engine_build.runtime.base import Backend, Outputs
from plugins.codecs import RawCodec
from plugins.encoders import JsonEncoder
from stream.app import build
from stream.batching import Batcher
from stream.config import StreamConfig
from stream.fake import FakeBroker
from stream.metrics import Metrics
from stream.offsets import OffsetTracker
from stream.pipeline import PipelineConfig, Processor, _Stacker
from stream.ports import Refused
from stream.records import Message, Outgoing
from stream.service import Service

from .images import bad_images, good_images
from .standins import ARTIFACT, PixelModel, stand_in
from .waiting import wait_until


def test_batch_closes_at_max_batch_or_delay():
    b = Batcher(3, 0.05)
    assert b.add("a", 0.0) is None and b.add("b", 0.01) is None
    assert b.add("c", 0.02) == ["a", "b", "c"]
    assert b.add("d", 1.0) is None
    assert b.due(1.04) is None
    assert b.wait_time(1.02) == pytest.approx(0.03)
    assert b.due(1.05) == ["d"]
    assert b.flush() is None


def test_a_free_slot_runs_the_open_batch_when_nothing_more_is_arriving():
    b = Batcher(4, 0.05)
    assert b.add("a", 0.0) is None
    assert b.ready(0.001, arriving=2) is None        # more decoding: wait for them
    assert b.add("b", 0.002) is None and b.add("c", 0.003) is None
    assert b.ready(0.003, arriving=0) == ["a", "b", "c"]   # nothing more: run now, not at 0.05
    assert b.ready(0.004, arriving=0) is None        # no open batch
    assert b.add("d", 1.0) is None
    assert b.ready(1.04, arriving=5) is None and b.ready(1.05, arriving=5) == ["d"]   # the window still bounds


def test_under_backlog_batches_fill():
    b = Batcher(3, 0.05)
    batches = []
    for i in range(7):                                # 7 items queued at once: always more arriving
        batch = b.add(i, 0.0) or b.ready(0.0, arriving=6 - i)
        if batch:
            batches.append(batch)
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]


def test_fixed_batching_waits_out_the_window():
    b = Batcher(4, 0.05, adaptive=False)
    b.add("a", 0.0)
    assert b.ready(0.01, arriving=0) is None and b.ready(0.05, arriving=0) == ["a"]


def test_the_reused_batch_array_holds_exactly_each_batch():
    rng = np.random.default_rng(0)
    stack = _Stacker(4, lambda rows: np.empty((rows, 8, 8, 3), np.uint8))
    first = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    a = stack(first)
    assert np.array_equal(a, np.stack(first))
    second = first[2:]
    b = stack(second)
    assert np.array_equal(b, np.stack(second)) and np.shares_memory(a, b)   # the same memory, refilled
    other = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)]
    assert np.array_equal(stack(other), np.stack(other))                     # a new shape: a new array
    with pytest.raises(ValueError):
        stack([first[0], other[0]])                                          # mixed shapes fail as np.stack does
    more = [other[0]] * 6
    assert np.array_equal(stack(more), np.stack(more))                       # more than its rows: a larger array
    with pytest.raises(TypeError):
        stack([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint16)])   # no silent cast


def test_offsets_commit_only_below_the_oldest_unacknowledged():
    t = OffsetTracker()
    for offset in range(5):
        t.add(("in", 0), offset)
    t.done(("in", 0), 0)
    t.done(("in", 0), 2)
    t.done(("in", 0), 3)
    assert t.committable() == {("in", 0): 1}          # 1 is still in flight
    t.done(("in", 0), 1)
    assert t.committable() == {("in", 0): 4}
    t.committed({("in", 0): 4})
    assert t.committable() == {}
    t.done(("in", 0), 4)
    assert t.committable() == {("in", 0): 5} and t.wait_idle(0.1)


def config(artifact: Path, **overrides) -> StreamConfig:
    values = dict(bootstrap_servers="fake:9092", input_topic=("in",), output_topic="out", dead_letter_topic="dlq",
                  artifact=artifact, metrics_port=0, max_batch=8, max_delay_ms=5, commit_interval_ms=50)
    values.update(overrides)
    return StreamConfig(**values)


def service(broker: FakeBroker, cfg: StreamConfig, backend: Backend | None = None, artifact: bool = False,
            **handed: Any) -> Service:
    """A service on the fake broker; its model is a stand-in (``backend``, a PixelModel by default)
    unless the test is about the model from the ``artifact``; ``handed``: what else the test hands
    to :func:`stream.app.build`."""
    return build(cfg, connector=broker.connector(list(cfg.input_topic), cfg.group_id),
                 model=None if artifact else stand_in(backend), **handed)


def fill(broker: FakeBroker, partitions: int = 2) -> tuple[int, int]:
    broker.create_topic("in", partitions)
    good, bad = good_images(), bad_images()
    for name, data in good.items():
        broker.produce("in", data, key=name.encode(), headers=[("trace-id", name.encode())])
    for name, (data, _) in bad.items():
        broker.produce("in", data, key=name.encode())
    return len(good), len(bad)


def test_every_message_gets_one_record_and_offsets_reach_the_end(small_artifact):
    broker = FakeBroker()
    good, bad = fill(broker)
    stats = service(broker, config(small_artifact), artifact=True).run(count=good + bad, timeout=60)
    assert stats.finished == good + bad
    out = broker.records("out")
    assert sorted(k.decode() for k, _, _ in out) == sorted(good_images())
    for key, value, headers in out:
        record = json.loads(value)
        assert record["label"] in ("negative", "positive")
        assert abs(sum(record["scores"].values()) - 1) < 1e-5
        assert record["model"]["placeholder"] is True and len(record["model"]["sha256"]) == 64
        assert set(record["timing_ms"]) == {"wait", "decode", "queue", "inference", "output", "total"}
        assert ("trace-id", key) in headers
    dead = {k.decode(): dict(h) for k, _, h in broker.records("dlq")}
    assert {name: h["error.reason"].decode() for name, h in dead.items()} == \
        {name: reason for name, (_, reason) in bad_images().items()}
    assert all({"error.message", "source.topic", "source.partition", "source.offset"} <= set(h) for h in dead.values())
    ends = {(t, p): len(broker.topics[t][p]) for t, p in [("in", 0), ("in", 1)]}
    assert broker.committed["sentiment-stream"] == ends


def test_a_lone_image_is_not_held_for_the_batch_window():
    """Adaptive batching on the fake broker: with a 60 s window, one image still finishes at once."""
    broker = FakeBroker()
    broker.create_topic("in", 1)
    broker.produce("in", next(iter(good_images().values())), key=b"lone")
    svc = service(broker, config(ARTIFACT, max_delay_ms=60_000))
    stats = svc.run(count=1, timeout=20)
    # Finished by count, not by the run's timeout (the drain at close would publish it too).
    assert stats.finished == 1 and stats.seconds < 20 and len(broker.records("out")) == 1


def test_failed_publishes_are_retried_not_lost():
    broker = FakeBroker()
    good, bad = fill(broker, partitions=1)
    broker.fail_next_publishes = 7
    svc = service(broker, config(ARTIFACT))
    svc.run(count=good + bad, timeout=60)
    assert len(broker.records("out")) + len(broker.records("dlq")) == good + bad
    assert "sentiment_publish_retries_total 7.0" in svc.metrics.render().decode()
    assert broker.committed["sentiment-stream"] == {("in", 0): good + bad}


def test_a_periodic_commit_the_broker_refused_is_still_made_by_the_last_commit():
    """A periodic commit need not wait for its answer (librdkafka's): one the broker refuses must leave its
    offsets committable, so that the next commit, and at the latest the last one, carries them. The service
    once counted such a commit as made when it was sent: here the broker refuses every commit that reaches
    the end of the input, and nothing past what it accepted before was committed at the end."""
    broker = FakeBroker()
    good, bad = fill(broker, partitions=1)
    broker.commits_answered_later = True
    broker.refuse_commit = lambda offsets: offsets.get(("in", 0), 0) >= good + bad
    svc = service(broker, config(ARTIFACT))
    running = threading.Thread(target=svc.run, kwargs={"timeout": 120})
    running.start()
    try:
        wait_until(lambda: broker.refused_commits > 0, "a periodic commit covering every input refused")
    finally:
        svc.stop()
        running.join(60)
    assert broker.committed["sentiment-stream"] == {("in", 0): good + bad}


def test_stop_mid_stream_drains_and_commits_exactly_what_was_published():
    broker = FakeBroker()
    broker.create_topic("in", 1)
    data = good_images()["jpeg_chelsea"]
    total = 3000
    for i in range(total):
        broker.produce("in", data, key=str(i).encode())
    svc = service(broker, config(ARTIFACT, max_in_flight=16, max_batch=4))

    def stop_once_flowing() -> None:
        while len(broker.records("out")) < 50:
            threading.Event().wait(0.005)
        svc.stop()
    threading.Thread(target=stop_once_flowing, daemon=True).start()
    stats = svc.run(timeout=60)
    published = len(broker.records("out"))
    assert 50 <= published < total, "stopped mid-stream"
    assert stats.consumed == published, "everything consumed was finished before exit"
    assert broker.committed["sentiment-stream"] == {("in", 0): published}


class PeakTracker(OffsetTracker):
    """Notes how many messages are in flight after each one is added."""

    def __init__(self) -> None:
        super().__init__()
        self.peaks: list[int] = []

    def add(self, partition, offset) -> None:
        super().add(partition, offset)
        self.peaks.append(self.in_flight())


def test_backpressure_bounds_in_flight():
    broker = FakeBroker()
    broker.create_topic("in", 1)
    for i in range(120):
        broker.produce("in", good_images()["png"], key=str(i).encode())
    tracker = PeakTracker()
    svc = service(broker, config(ARTIFACT, max_in_flight=16, max_batch=8, max_poll_records=4), tracker=tracker)
    svc.run(count=120, timeout=60)
    assert max(tracker.peaks) <= 16 + 4, "paused at the limit (one poll may overshoot by its size)"


def test_a_paused_loop_waits_for_results_to_drain_instead_of_polling():
    """Paused, an empty poll costs CPU and fetches nothing: the loop waits on the tracker and polls
    only every PAUSED_POLL_S (without waiting) to keep its group membership going."""
    from stream.fake import FakeConnector, FakeSource
    from stream.service import PAUSED_POLL_S
    broker = FakeBroker()
    broker.create_topic("in", 1)
    for i in range(12):
        broker.produce("in", good_images()["png"], key=str(i).encode())
    broker.fail_next_publishes = 10**9        # every result is retried: in flight stays at the limit
    paused: list[tuple[float, float]] = []    # (when, timeout) of each poll while paused

    class Recorded(FakeSource):
        def poll(self, timeout_s, max_records):
            if self.paused:
                paused.append((time.monotonic(), timeout_s))
                if len(paused) == 4:              # seen enough: let the results through
                    with broker.lock:
                        broker.fail_next_publishes = 0
            return super().poll(timeout_s, max_records)

    class Recording(FakeConnector):
        def source(self, rebalance):
            return Recorded(self.broker, self.topics, self.group_id, rebalance)
    cfg = config(ARTIFACT, max_in_flight=4, max_batch=2, max_poll_records=4)
    stats = build(cfg, connector=Recording(broker, ["in"], cfg.group_id), model=stand_in()).run(count=12, timeout=60)
    assert stats.finished == 12
    assert len(paused) >= 4 and all(timeout == 0 for _, timeout in paused), "paused polls never wait"
    gaps = [b - a for (a, _), (b, _) in zip(paused[:4], paused[1:4], strict=False)]
    assert min(gaps) >= 0.8 * PAUSED_POLL_S, f"paused polls {gaps} s apart"


def test_json_envelope_codec_passes_metadata():
    import base64
    broker = FakeBroker()
    broker.create_topic("in", 1)
    image = base64.b64encode(good_images()["webp"]).decode()
    broker.produce("in", json.dumps({"image": image, "metadata": {"post": 42}}).encode(), key=b"k")
    broker.produce("in", b'{"image": 5}', key=b"bad")
    service(broker, config(ARTIFACT, input_codec="json")).run(count=2, timeout=30)
    (record,) = [json.loads(v) for _, v, _ in broker.records("out")]
    assert record["metadata"] == {"post": 42}
    assert dict(broker.records("dlq")[0][2])["error.reason"] == b"bad_envelope"


def test_metrics_and_health_endpoints():
    """Scraped over HTTP while the service runs, as Prometheus would."""
    from stream.embedded_broker import free_port
    broker = FakeBroker()
    good, bad = fill(broker, partitions=1)
    port = free_port()
    svc = service(broker, config(ARTIFACT, metrics_port=port))
    worker = threading.Thread(target=svc.run, kwargs={"timeout": 60}, daemon=True)
    worker.start()
    expected = [f'sentiment_images_total{{outcome="published"}} {float(good)}',
                'sentiment_decode_failures_total{reason="truncated"} 1.0',
                'sentiment_consumer_lag{partition="0",topic="in"} 0.0', "sentiment_ready 1.0",
                "sentiment_batch_size_bucket", "sentiment_end_to_end_seconds_count"]
    deadline = time.monotonic() + 60
    text = ""
    try:
        while time.monotonic() < deadline and not all(e in text for e in expected):
            threading.Event().wait(0.1)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz").status == 200
    finally:
        svc.stop()
        worker.join(30)
    assert [e for e in expected if e not in text] == []


def test_health_server_answers():
    from stream.embedded_broker import free_port
    from stream.metrics import HealthServer, Metrics
    server = HealthServer(Metrics(), free_port(), host="127.0.0.1").start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert urllib.request.urlopen(base + "/healthz").status == 200
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/readyz")
        assert info.value.code == 503
        server.set_ready(True)
        assert urllib.request.urlopen(base + "/readyz").status == 200
        assert b"sentiment_ready 1.0" in urllib.request.urlopen(base + "/metrics").read()
    finally:
        server.close()


def _raw(port: int, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes the connection (10 s at most); b"" for a connection
    closed unanswered."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        try:
            conn.sendall(request)
            while chunk := conn.recv(65536):
                answer += chunk
        except ConnectionResetError:   # closed before the request arrived
            pass
    return answer


def test_health_endpoints_ignore_the_query_string_and_answer_head():
    """Before: /readyz?x and /metrics?x answered 404, and HEAD 501."""
    from stream.embedded_broker import free_port
    from stream.metrics import HealthServer, Metrics
    server = HealthServer(Metrics(), free_port(), host="127.0.0.1").start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        server.set_ready(True)
        assert urllib.request.urlopen(base + "/readyz?verbose=1").read() == b"ready\n"
        assert b"sentiment_ready 1.0" in urllib.request.urlopen(base + "/metrics?x").read()
        head = _raw(server.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        status, _, rest = head.partition(b"\r\n")
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.0 200") and body == b"", head
        assert int(dict(h.split(b": ", 1) for h in headers.split(b"\r\n"))[b"Content-Length"]) > 0
        assert _raw(server.port, b"HEAD /nowhere HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404")
    finally:
        server.close()


def test_an_idle_connection_is_closed_and_connections_beyond_the_bound_are_refused():
    """Before: a half-sent request held its thread for ever, and 300 of them 300 threads."""
    from stream.embedded_broker import free_port
    from stream.metrics import HealthServer, Metrics
    quick = HealthServer(Metrics(), free_port(), host="127.0.0.1", timeout_s=0.2).start()
    try:   # the server closes it without an answer: recv sees the end, well before its own 10 s
        assert _raw(quick.port, b"GET /metrics HTTP/1.1\r\n") == b""
    finally:
        quick.close()
    server = HealthServer(Metrics(), free_port(), host="127.0.0.1", connections=2).start()
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        for conn in held:
            conn.sendall(b"GET /metrics HTTP/1.1\r\n")      # half a request: its thread waits for the rest
        # accepted after those two (one thread accepts, in order): closed unanswered
        assert _raw(server.port, b"GET /healthz HTTP/1.0\r\n\r\n") == b""
        for conn in held:
            conn.close()
        wait_until(lambda: _raw(server.port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200"),
                   "served again once the idle ones went", 10)
    finally:
        for conn in held:
            conn.close()
        server.close()


def test_a_client_trickling_its_request_is_cut_off_at_the_connection_timeout():
    """The timeout bounded each read, so a client sending a byte at a time held its slot for as long as it went
    on; 32 such held every slot and a probe was closed unanswered. Now it bounds the whole request."""
    from stream.embedded_broker import free_port
    from stream.metrics import HealthServer, Metrics
    server = HealthServer(Metrics(), free_port(), host="127.0.0.1", timeout_s=0.5).start()
    conn = socket.create_connection(("127.0.0.1", server.port))
    conn.settimeout(0.05)
    try:
        for sent in range(200):   # a byte every 0.1 s: 20 s, forty times the timeout
            try:
                conn.sendall(b"G" if sent == 0 else b"x")
                if conn.recv(1) == b"":
                    break   # closed by the server
            except TimeoutError:
                time.sleep(0.05)
                continue
            except OSError:   # reset by the server
                break
        assert sent < 40, f"still open after {sent} bytes"
    finally:
        conn.close()
        server.close()


def test_plugins_are_discovered_by_entry_point_and_unknown_names_fail():
    import plugins
    assert {"raw", "json"} <= set(plugins.available(plugins.INPUT_GROUP))
    assert "json" in plugins.available(plugins.OUTPUT_GROUP)
    with pytest.raises(ConfigError, match="--input-codec nope: no such plugin"):
        plugins.load(plugins.INPUT_GROUP, "nope")


def test_a_users_plugin_is_found_through_entry_points(tmp_path, monkeypatch):
    """A package that declares an entry point is picked up without touching this project."""
    import importlib.metadata
    import sys

    import plugins
    dist = tmp_path / "userplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sentiment_stream.input_codecs]\nupper = userplug_mod:Upper\n")
    (tmp_path / "userplug_mod.py").write_text(
        "class Upper:\n    name = 'upper'\n"
        "    def unpack(self, value, headers):\n        return value, {'seen': True}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    codec = plugins.load(plugins.INPUT_GROUP, "upper")
    assert codec.unpack(b"x", []) == (b"x", {"seen": True})
    sys.modules.pop("userplug_mod", None)


@pytest.mark.parametrize("name", ["missingmod", "missingattr", "syntaxerr", "raisesinit", "nomethod"])
def test_a_plugin_that_cannot_be_loaded_or_made_is_one_config_error_line(broken_plugins, name):
    import plugins
    with pytest.raises(ConfigError) as info:
        plugins.load(plugins.INPUT_GROUP, name)
    assert str(info.value).startswith(f"--input-codec {name}: ") and "\n" not in str(info.value)
    assert broken_plugins[name][1] in str(info.value)


def test_the_unknown_plugin_line_sets_apart_those_that_cannot_be_loaded(broken_plugins):
    import plugins
    with pytest.raises(ConfigError, match=r"--input-codec nope: no such plugin \(available: json, nomethod, "
                                          r"raisesinit, raw, upper; missingattr, missingmod, syntaxerr cannot be "
                                          r"loaded\)$"):
        plugins.load(plugins.INPUT_GROUP, "nope")


def test_failing_or_nan_inference_becomes_dead_letters_not_a_crash():
    """One bad image gets its own error; the rest of its batch is published."""
    broker = FakeBroker()
    broker.create_topic("in", 1)
    images = good_images()
    for name in ("png", "webp", "bmp", "tiff"):
        broker.produce("in", images[name], key=name.encode())
    calls = []

    class Flaky(PixelModel):
        def _infer_impl(self, batch):
            calls.append(len(batch))
            if len(batch) > 1:
                raise RuntimeError("device lost")          # the whole batch fails ...
            out = super()._infer_impl(batch)
            if len(calls) == 2:                            # ... then the first image fails alone,
                raise RuntimeError("bad image")
            if len(calls) == 3:                            # the second yields NaN,
                out.probs[:] = np.nan
            return out                                     # the rest succeed
    svc = service(broker, config(ARTIFACT, max_batch=4, max_delay_ms=200), Flaky())
    svc.run(count=4, timeout=30)
    assert calls == [4, 1, 1, 1, 1]
    assert len(broker.records("out")) == 2
    reasons = sorted(dict(h)["error.reason"].decode() for _, _, h in broker.records("dlq"))
    assert reasons == ["inference_error", "invalid_output"]
    assert broker.committed["sentiment-stream"] == {("in", 0): 4}


def test_dead_letter_too_large_for_the_broker_keeps_headers_and_drops_the_value():
    broker = FakeBroker()
    broker.create_topic("in", 1)
    broker.max_record_bytes = 1000
    broker.produce("in", b"x" * 50_000, key=b"huge-text")
    broker.produce("in", good_images()["png"], key=b"ok")
    service(broker, config(ARTIFACT)).run(count=2, timeout=30)
    ((key, value, headers),) = broker.records("dlq")
    headers = dict(headers)
    assert key == b"huge-text" and value == b""
    assert headers["error.reason"] == b"not_an_image" and headers["error.value_dropped"] == b"50000"
    assert broker.committed["sentiment-stream"] == {("in", 0): 2}


def test_images_per_second_is_measured_at_scrape_time():
    clock = [1000.0]
    m = Metrics(clock=lambda: clock[0])
    for _ in range(30):
        m.record_finished("published", clock[0] - 0.1)
    assert "sentiment_images_per_second 3.0" in m.render().decode()
    clock[0] += 11
    assert "sentiment_images_per_second 0.0" in m.render().decode()


def sources(records) -> list[tuple[int, int]]:
    return [(json.loads(v)["source"]["partition"], json.loads(v)["source"]["offset"]) for _, v, _ in records]


def test_revocation_drains_and_commits_before_another_member_is_assigned():
    """A member joins mid-stream: the first one finishes and commits the revoked partitions' work
    before the newcomer is assigned them, so the newcomer starts exactly where the work ended."""
    from stream.metrics import Metrics
    from stream.offsets import OffsetTracker
    from stream.rebalance import Rebalance
    broker = FakeBroker()
    broker.create_topic("in", 2)
    total = 160
    for i in range(total):
        broker.produce("in", good_images()["png"], partition=i % 2, key=str(i).encode())
    cfg = config(ARTIFACT, max_batch=4, max_in_flight=8, max_poll_records=4)
    first = service(broker, cfg, PixelModel(delay_s=0.02))
    worker = threading.Thread(target=first.run, kwargs={"count": total, "timeout": 60}, daemon=True)
    worker.start()
    while len(broker.records("out")) < 20:
        threading.Event().wait(0.005)

    handler = Rebalance(OffsetTracker(), Metrics(), drain_timeout_s=5)
    newcomer = broker.connector(["in"], cfg.group_id).source(handler)
    deadline = time.monotonic() + 30
    while not handler.owned() and time.monotonic() < deadline:
        newcomer.poll(0.01, 4)
    (taken,) = handler.owned()
    published = sorted(o for p, o in sources(broker.records("out")) if p == taken[1])
    assert published == list(range(len(published))), "in order, no gaps, no duplicates"
    assert published, "the revoked partition had work done on it"
    assert broker.committed[cfg.group_id][taken] == len(published), "revoked work was drained and committed"
    assert first.tracker.in_flight([taken]) == 0 and taken not in first.rebalance.owned()

    newcomer.close()   # leaves without consuming: the first member gets the partition back
    worker.join(60)
    assert not worker.is_alive()
    assert sorted(sources(broker.records("out"))) == sorted((i % 2, i // 2) for i in range(total))
    assert broker.committed[cfg.group_id] == {("in", 0): total // 2, ("in", 1): total // 2}


def test_transient_poll_errors_are_said_once_retried_and_counted(caplog):
    from stream.errors import KafkaTransient
    broker = FakeBroker()
    good, bad = fill(broker, partitions=1)
    broker.poll_errors = [KafkaTransient("consuming in[0]: RequestTimedOut") for _ in range(3)]
    svc = service(broker, config(ARTIFACT))
    with caplog.at_level("INFO", logger="stream"):
        stats = svc.run(count=good + bad, timeout=60)
    assert stats.finished == good + bad
    assert 'sentiment_poll_errors_total{kind="transient"} 3.0' in svc.metrics.render().decode()
    lines = [r.getMessage() for r in caplog.records if "consuming from Kafka" in r.getMessage()]
    assert len(lines) == 2 and "failing" in lines[0] and "recovered" in lines[1], lines


def test_a_permanent_consumer_error_drains_then_ends_the_run():
    from stream.errors import KafkaPermanent
    broker = FakeBroker()
    broker.create_topic("in", 1)
    for i in range(40):
        broker.produce("in", good_images()["png"], key=str(i).encode())
    svc = service(broker, config(ARTIFACT, max_batch=4), PixelModel(delay_s=0.01))

    def fail_once_flowing() -> None:
        while len(broker.records("out")) < 4:
            threading.Event().wait(0.002)
        broker.poll_errors.append(KafkaPermanent("consuming in[0]: UnsupportedCodecError: install lz4"))
    threading.Thread(target=fail_once_flowing, daemon=True).start()
    with pytest.raises(KafkaPermanent, match=r"in\[0\].*install lz4"):
        svc.run(timeout=60)
    published = len(broker.records("out"))
    assert published >= 4 and broker.committed["sentiment-stream"] == {("in", 0): published}, \
        "what was in flight was finished and committed before the end"


def test_a_transient_error_that_lasts_past_the_limit_ends_the_run():
    from stream.errors import KafkaPermanent, KafkaTransient
    broker = FakeBroker()
    broker.create_topic("in", 1)
    broker.poll_errors = [KafkaTransient("User rebalance callback throws an error") for _ in range(1000)]
    svc = service(broker, config(ARTIFACT, fail_after_s=0.5))
    with pytest.raises(KafkaPermanent, match="rebalance callback.*--fail-after-s"):
        svc.run(timeout=30)
    assert "sentiment_ready 0.0" in svc.metrics.render().decode()


def test_failure_watch_says_once_and_backs_off():
    from stream.failures import FailureWatch
    now = [0.0]
    watch = FailureWatch("polling", clock=lambda: now[0])
    assert watch.failed(ValueError("a")) == 0 and watch.failing and watch.backoff() == pytest.approx(0.1)
    now[0] = 2.0
    assert watch.failed(ValueError("a")) == 2.0 and watch.backoff() == pytest.approx(0.2)
    for _ in range(10):
        watch.failed(ValueError("a"))
    assert watch.backoff() == 5.0
    watch.ok()
    assert not watch.failing and watch.failed(ValueError("b")) == 0


def test_failure_watch_counts_toward_the_limit_only_what_followed_the_last_outage():
    """--fail-after-s bounds errors that are not an outage: a broker restart of five minutes, then the
    rebalance errors of its aftermath, must not end a healthy member at the first of them."""
    from stream.failures import FailureWatch
    now = [0.0]
    watch = FailureWatch("committing offsets", clock=lambda: now[0])
    for now[0] in (0.0, 100.0, 300.0):
        assert watch.failed(ConnectionError("broker down"), outage=True) == 0
    now[0] = 301.0
    assert watch.failed(ValueError("rebalance in progress")) == 0
    now[0] = 310.0
    assert watch.failed(ValueError("rebalance in progress")) == 9.0
    assert watch.failing and watch.since == 0.0, "the outage is still when the failing began"


def test_failure_watch_of_an_occasional_call_forgets_a_failure_after_a_quiet_stretch():
    """Commits are tried only while there is something to commit: one failure at a rebalance, a quiet
    hour, one more failure at the next rebalance is not a call failing for an hour (which --fail-after-s
    would end), and the quiet hour is not reported as failing either."""
    from stream.failures import FailureWatch
    now = [0.0]
    watch = FailureWatch("committing offsets", clock=lambda: now[0], forget_after_s=10.0)
    watch.failed(ValueError("rebalance in progress"))
    now[0] = 5.0
    assert watch.failed(ValueError("rebalance in progress")) == 5.0, "failing again within the stretch: counted"
    now[0] = 3600.0
    assert not watch.failing, "a quiet hour is not a failing one"
    assert watch.failed(ValueError("rebalance in progress")) == 0 and watch.since == 3600.0


def test_fake_partitioning_is_stable_across_processes():
    import subprocess
    import sys
    code = ("from stream.fake import FakeBroker; b = FakeBroker(); b.create_topic('t', 4); "
            "print([b.produce('t', b'v', key=k) for k in (b'a', b'b', b'c')] and "
            "[i for i, p in enumerate(b.topics['t']) if p])")
    root = Path(__file__).resolve().parents[1]
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                           env={"PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert len(runs) == 1


def test_in_order_releases_each_partition_in_arrival_order():
    from stream.ordering import InOrder
    order: InOrder[str] = InOrder()
    out: list[str] = []
    for offset in (5, 6, 9):
        order.expect("a", offset)
    order.expect("b", 0)
    order.complete("a", 9, "a9", out.append)
    order.complete("b", 0, "b0", out.append)
    order.complete("a", 6, "a6", out.append)
    assert out == ["b0"] and order.waiting() == 2
    order.complete("a", 5, "a5", out.append)
    assert out == ["b0", "a5", "a6", "a9"] and order.waiting() == 0
    for token in ("old-7", "new-7"):          # offset 7 in flight twice after a rebalance
        order.expect("c", token)
    order.complete("c", "new-7", "second copy", out.append)
    order.complete("c", "old-7", "first copy", out.append)
    assert out[-2:] == ["first copy", "second copy"] and order.waiting() == 0
    unordered: InOrder[str] = InOrder(enabled=False)
    unordered.complete("a", 3, "a3", out.append)
    assert out[-1] == "a3"


def test_results_and_dead_letters_are_published_in_each_partitions_offset_order():
    """Large and small images decode at different speeds on four threads, and bad inputs among them fail
    at once; results and dead letters together keep each partition's input order."""
    broker = FakeBroker()
    broker.create_topic("in", 2)
    images = good_images()
    names = ["jpeg_2048", "png", "jpeg_chelsea", "bmp", "jpeg_coins", "png16", "gray_png", "webp"] * 5
    for i, name in enumerate(names):
        value = b"not an image" if i % 5 == 2 else images[name]
        broker.produce("in", value, partition=i % 2, key=str(i).encode())
    service(broker, config(ARTIFACT, decode_workers=4, max_batch=3)).run(count=len(names), timeout=60)
    published = [(json.loads(v)["source"]["partition"], json.loads(v)["source"]["offset"]) if topic == "out" else
                 (int(dict(h)["source.partition"]), int(dict(h)["source.offset"]))
                 for topic, (_, v, h) in broker.appended if topic in ("out", "dlq")]
    assert len(broker.records("dlq")) == len(names) // 5
    for partition in (0, 1):
        offsets = [o for p, o in published if p == partition]
        assert offsets == list(range(len(names) // 2)), f"partition {partition}: {offsets}"


def test_client_chatter_is_rate_limited_and_counted():
    import logging

    from stream.logs import ClientChatter
    now = [0.0]
    chatter = ClientChatter(interval_s=60, clock=lambda: now[0], away=threading.Event())

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, (), None)
    assert chatter.filter(record("kafka.conn", "connect to %s failed"))
    assert not any(chatter.filter(record("kafka.conn", "connect to %s failed")) for _ in range(15))
    assert chatter.filter(record("stream.service", "ours")), "the service's own lines always pass"
    now[0] = 61
    passed = record("kafka.conn", "connect to %s failed")
    assert chatter.filter(passed) and "[15 like this held back" in passed.msg


def test_dead_letters_are_counted_in_the_log_even_with_no_batch(caplog):
    """Said while the run goes on (every ``dead_letter_report_s``), not only when it ends."""
    import re
    broker = FakeBroker()
    broker.create_topic("in", 1)
    for i in range(6):
        broker.produce("in", b"plain text, not an image", key=str(i).encode())
    svc = service(broker, config(ARTIFACT), dead_letter_report_s=0.05)

    def said() -> list[str]:
        return [r.getMessage() for r in list(caplog.records)]

    def stop_once_said() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (svc.finished() == 6 and any("dead letters since" in line
                                                                               for line in said())):
            threading.Event().wait(0.01)
        svc.stop()
    with caplog.at_level("INFO", logger="stream"):
        threading.Thread(target=stop_once_said, daemon=True).start()
        svc.run(timeout=30)
    lines = said()
    reports = [i for i, line in enumerate(lines) if "dead letters since the last line" in line]
    assert reports and reports[0] < lines.index("shutting down"), lines
    assert sum(int(n) for i in reports for n in re.findall(r"not_an_image=(\d+)", lines[i])) == 6, lines


def test_a_missing_input_topic_is_not_ready_and_said_once(caplog):
    from stream.embedded_broker import free_port
    broker = FakeBroker()
    broker.create_topic("in", 1)
    port = free_port()
    svc = service(broker, config(ARTIFACT, input_topic=("in", "typo"), metrics_port=port))
    worker = threading.Thread(target=svc.run, kwargs={"timeout": 30}, daemon=True)
    with caplog.at_level("INFO", logger="stream"):
        worker.start()
        deadline = time.monotonic() + 20
        answer = ""
        while time.monotonic() < deadline and "typo" not in answer:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz")
            except urllib.error.HTTPError as exc:
                answer = exc.read().decode()
            except OSError:
                pass
            threading.Event().wait(0.1)
        svc.stop()
        worker.join(30)
    assert "input topic typo does not exist" in answer
    warnings = [r.getMessage() for r in caplog.records if "'typo' does not exist" in r.getMessage()]
    assert len(warnings) == 1 and "typo" not in broker.topics
    assert "ready" not in [r.getMessage() for r in caplog.records], "never said ready while a topic is missing"
    assert not any("partitions assigned" in r.getMessage() for r in caplog.records), "joins only once both exist"


class _StrEncoder:
    """A plugin encoder with a bug: its value is a str, which no Kafka client will send."""

    def __init__(self, real) -> None:
        self.real = real

    def encode(self, prediction):
        key, value, headers = self.real.encode(prediction)
        return key, value.decode(), headers


def test_a_result_that_can_never_be_published_is_dead_lettered_with_the_original_bytes():
    broker = FakeBroker()
    broker.create_topic("in", 1)
    images = good_images()
    for name in ("png", "webp", "bmp"):
        broker.produce("in", images[name], key=name.encode())
    svc = service(broker, config(ARTIFACT), encoder=_StrEncoder(JsonEncoder()))
    stats = svc.run(count=3, timeout=30)
    assert stats.finished == 3 and broker.records("out") == []
    dead = {k.decode(): (v, dict(h)) for k, v, h in broker.records("dlq")}
    assert {k: v for k, (v, _) in dead.items()} == {n: images[n] for n in ("png", "webp", "bmp")}
    assert all(h["error.reason"] == b"publish_error" and b"TypeError" in h["error.message"] for _, h in dead.values())
    assert broker.committed["sentiment-stream"] == {("in", 0): 3}


def test_a_dead_letter_that_can_never_be_published_stops_the_member_with_one_line():
    from stream.errors import KafkaPermanent
    broker = FakeBroker()
    broker.create_topic("in", 1)
    broker.produce("in", good_images()["png"], key=b"ok")
    broker.produce("in", b"not an image", key=b"bad")
    broker.produce("in", good_images()["png"], key=b"after")
    broker.refuse_topics.add("dlq")
    svc = service(broker, config(ARTIFACT, max_batch=1, drain_timeout_s=5))
    started = time.monotonic()
    with pytest.raises(KafkaPermanent, match="cannot publish even a dead letter to dlq"):
        svc.run(timeout=30)
    assert time.monotonic() - started < 15, "stopped, not stalled until the timeout"
    assert broker.committed["sentiment-stream"] == {("in", 0): 1}, "committed up to the unpublishable record only"


def test_an_output_topic_the_service_may_not_write_stops_the_member_and_dead_letters_nothing():
    """A missing WRITE ACL on the output topic refuses every result: the member stops with one line saying
    what to grant, publishes no dead letter and commits nothing, so the input waits for the fix."""
    from stream.errors import KafkaPermanent
    broker = FakeBroker()
    broker.create_topic("in", 1)
    for key in (b"a", b"b", b"c"):
        broker.produce("in", good_images()["png"], key=key)
    broker.refuse_topics.add("out")
    svc = service(broker, config(ARTIFACT, max_batch=1, drain_timeout_s=5))
    with pytest.raises(KafkaPermanent, match="publishing to out failed.*grant this service's principal WRITE on out"):
        svc.run(timeout=30)
    assert broker.records("dlq") == [] and broker.records("out") == [], "nothing dead-lettered or published"
    assert broker.committed["sentiment-stream"] == {("in", 0): 0}, "nothing committed past the first input"


def test_a_producer_that_cannot_flush_yet_is_closed_by_trying_again():
    """kafka-python's close raises when its flush times out; the records of a fatal or cut-off
    producer fail soon after, so closing is tried until they have, within the time given."""
    from kafka.errors import KafkaTimeoutError

    from stream.kafka_sink import close_producer

    class Producer:
        def __init__(self, failures: int) -> None:
            self.failures, self.calls = failures, 0

        def close(self, timeout: float) -> None:
            self.calls += 1
            if self.calls <= self.failures:
                raise KafkaTimeoutError("Timeout waiting for future")

    draining = Producer(failures=2)
    assert close_producer(draining, 5.0) and draining.calls == 3
    stuck = Producer(failures=10**6)
    assert not close_producer(stuck, 0.2) and stuck.calls >= 1


class _Constant:
    """The backend interface's two-score answer, with no model."""
    concurrency = 1

    def input_buffer(self, rows: int) -> np.ndarray:
        return np.empty((rows, 256, 256, 3), np.uint8)

    def infer(self, images: np.ndarray) -> Outputs:
        probs = np.tile(np.array([0.25, 0.75], np.float32), (len(images), 1))
        return Outputs(probs, probs)


class _SinkFailingOnce:
    """Acknowledges at once; its first publish raises, as a bug would."""

    def __init__(self) -> None:
        self.published: list[Outgoing] = []
        self.calls = 0

    def publish(self, record: Outgoing, on_ack: Callable[[], None], on_refused: Refused | None = None) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug in the sink")
        self.published.append(record)
        on_ack()


def test_a_bug_while_decoding_is_logged_and_the_decode_worker_goes_on(caplog):
    """A dead letter whose publish raises leaves that message unacknowledged (said in the log); the
    single decode worker still decodes the next message, and the processor takes nothing after stop."""
    tracker, sink = OffsetTracker(), _SinkFailingOnce()
    processor = Processor(_Constant(), RawCodec(), JsonEncoder(), sink, tracker, Metrics(),  # type: ignore[arg-type]
                          {"name": "test"}, PipelineConfig("out", "dlq", decode_workers=1)).start()
    processor.submit(Message("in", 0, 0, b"bad", b"not an image"))
    processor.submit(Message("in", 1, 0, b"good", good_images()["png"]))
    assert tracker.wait_at_most(1, 10)
    assert processor.stop(10)
    assert [(r.topic, r.key) for r in sink.published] == [("out", b"good")]
    assert tracker.committable() == {("in", 0): 0, ("in", 1): 1}   # partition 0 stops at the stranded one
    assert "stays unacknowledged" in caplog.text
    with pytest.raises(RuntimeError, match="after stop"):
        processor.submit(Message("in", 1, 1, None, b""))


@pytest.mark.parametrize(("cores", "workers"), [(0, 1), (1, 1), (2, 2), (16, 16)])
def test_auto_decode_workers_are_one_per_usable_core(cores, workers):
    from stream.config import auto_decode_workers
    assert auto_decode_workers(cores) == workers


def test_the_service_decodes_on_the_auto_count_unless_told(caplog):
    broker = FakeBroker()
    broker.create_topic("in", 1)
    with caplog.at_level("INFO", logger="stream"):
        auto = service(broker, config(ARTIFACT), cores=16)
        assert auto.pipeline.decode_workers == 16
        auto.run(count=0, timeout=30)
    assert any(r.getMessage() == "decoding on 16 threads (auto)" for r in caplog.records)
    told = service(broker, config(ARTIFACT, decode_workers=3), cores=16)
    assert told.pipeline.decode_workers == 3
    told.run(count=0, timeout=30)


def test_a_tombstone_is_dead_lettered_with_a_null_value_not_an_empty_one():
    broker = FakeBroker()
    broker.create_topic("in", 1)
    broker.produce("in", None, key=b"deleted")
    broker.produce("in", b"", key=b"empty")
    svc = service(broker, config(ARTIFACT))
    assert svc.run(count=2, timeout=30).finished == 2
    dead = {k: v for k, v, _ in broker.records("dlq")}
    assert dead == {b"deleted": None, b"empty": b""}


class _AwayAtFirst:
    """A connector whose broker cannot be reached for its first ``failures`` attempts."""

    def __init__(self, real, failures: int) -> None:
        self.real, self.failures = real, failures

    def sink(self, on_retry):
        return self.real.sink(on_retry)

    def source(self, rebalance):
        from stream.errors import BrokerUnavailable
        if self.failures:
            self.failures -= 1
            raise BrokerUnavailable("cannot reach Kafka at fake:9092: KafkaTimeoutError: Unable to bootstrap")
        return self.real.source(rebalance)


def test_a_broker_unreachable_at_start_up_is_said_once_and_its_recovery_once(caplog):
    broker = FakeBroker()
    broker.create_topic("in", 1)
    broker.produce("in", good_images()["png"], key=b"k")
    cfg = config(ARTIFACT)
    # two failures show the second one unsaid; the service waits 0.5 s, then 1 s, then 2 s between attempts
    svc = build(cfg, connector=_AwayAtFirst(broker.connector(["in"], cfg.group_id), failures=2), model=stand_in())
    with caplog.at_level("INFO", logger="stream"):
        assert svc.run(count=1, timeout=60).finished == 1
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("stream") and r.levelname != "DEBUG"]
    assert len([line for line in lines if "cannot reach Kafka" in line]) == 1, lines
    assert len([line for line in lines if "recovered after" in line and "2 failed attempts" in line]) == 1, lines


def test_the_client_s_lines_are_held_while_the_broker_is_said_to_be_away():
    import logging

    from stream.logs import ClientChatter
    away = threading.Event()
    chatter = ClientChatter(interval_s=60, clock=lambda: 0.0, away=away)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("kafka.net.manager", logging.ERROR, __file__, 1, msg, (), None)
    away.set()
    assert not any(chatter.filter(record("Connection failed: %s")) for _ in range(5)), "held while away"
    assert chatter.filter(logging.LogRecord("stream.service", logging.WARNING, __file__, 1, "ours", (), None))
    away.clear()
    passed = record("Connection failed: %s")
    assert chatter.filter(passed) and "[5 like this held back]" in passed.msg


def test_client_lines_it_formats_itself_are_rate_limited_as_one_kind():
    """kafka-python formats its slow-task warning itself: each one differs in the task's address and
    the time, and every one passed the per-template limit."""
    import logging

    from stream.logs import ClientChatter
    chatter = ClientChatter(interval_s=60, clock=lambda: 0.0, away=threading.Event())

    def slow(address: str, seconds: float) -> logging.LogRecord:
        text = (f"Task <kafka.net.selector.Task object at {address}> ran for {seconds:.3f}s (>0.100s threshold). "
                "It is blocking the event loop")
        return logging.LogRecord("kafka.net.selector", logging.WARNING, __file__, 1, text, (), None)
    assert chatter.filter(slow("0x7fb976d94690", 0.126))
    assert not chatter.filter(slow("0x7fb976d95a10", 0.131)) and not chatter.filter(slow("0x7fb9", 0.2))


class _SinkFailingToClose:
    """A connector whose sink raises when it is closed, as a client cut off mid-close would."""

    def __init__(self, real) -> None:
        self.real = real
        self.sources: list = []

    def source(self, rebalance):
        self.sources.append(self.real.source(rebalance))
        return self.sources[-1]

    def sink(self, on_retry):
        from stream.fake import FakeSink

        class Unclosable(FakeSink):
            def close(self) -> None:
                raise RuntimeError("the producer's close failed")
        return Unclosable(self.real.broker, on_retry)


def test_a_close_that_fails_leaves_nothing_else_open():
    """Everything the run opened is closed whatever one close raises: the source left the group,
    the model and the health server are closed, and the failure is raised, not swallowed."""
    from stream.embedded_broker import free_port
    broker = FakeBroker()
    broker.create_topic("in", 1)
    broker.produce("in", good_images()["png"], key=b"k")
    port = free_port()
    cfg = config(ARTIFACT, metrics_port=port)
    model = PixelModel()
    connector = _SinkFailingToClose(broker.connector(["in"], cfg.group_id))
    svc = build(cfg, connector=connector, model=stand_in(model))
    with pytest.raises(RuntimeError, match="the producer's close failed"):
        svc.run(count=1, timeout=30)
    assert broker.committed["sentiment-stream"] == {("in", 0): 1}, "drained and committed before closing"
    (source,) = connector.sources
    assert source.closed and model.closed
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_a_close_that_fails_after_a_permanent_failure_still_ends_with_that_failure(caplog):
    """The run ends on a permanent consumer error and then a close raises too: the caller still gets the
    permanent error (its one line and exit code), and the close's error is in the log."""
    from stream.errors import KafkaPermanent
    broker = FakeBroker()
    broker.create_topic("in", 1)
    broker.poll_errors = [KafkaPermanent("consuming in[0]: TopicAuthorizationFailed")]
    connector = _SinkFailingToClose(broker.connector(["in"], "sentiment-stream"))
    svc = build(config(ARTIFACT), connector=connector, model=stand_in())
    with pytest.raises(KafkaPermanent, match="TopicAuthorizationFailed"):
        svc.run(timeout=30)
    assert "closing after consuming in[0]: TopicAuthorizationFailed failed too" in caplog.text
    assert "the producer's close failed" in caplog.text


def test_a_model_handed_to_build_stays_open_when_build_fails():
    """build() closes what it opened when a later step fails, never a model the caller handed in."""
    from stream.embedded_broker import free_port
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen()
        model = PixelModel()
        with pytest.raises(ConfigError, match=f"--metrics-port {port}"):
            build(config(ARTIFACT, metrics_port=port), connector=FakeBroker().connector(["in"], "g"),
                  model=stand_in(model))
    assert not model.closed


def test_a_retry_s_wait_doubles_to_its_cap_however_many_attempts():
    """Every retry loop (a poll or commit failing, a record resent alone, a librdkafka publish) waits
    ``doubling(attempt)``: past 1,024 attempts of an outage, 0.1 * 2 ** attempt no longer fits a float."""
    from stream.failures import FailureWatch, doubling
    assert [doubling(a) for a in (0, 1, 2, 5, 6)] == [0.1, 0.2, 0.4, 3.2, 5.0]
    assert doubling(5000) == 5.0 and doubling(5000, cap=0.0) == 0.0 and doubling(-3) == 0.1
    watch = FailureWatch("polling")
    for _ in range(2000):
        watch.failed(RuntimeError("broker down"), outage=True)
    assert watch.backoff() == 5.0
