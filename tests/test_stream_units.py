"""Service logic against the in-process fake broker: fast, no Kafka client involved."""
from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from engine_build.errors import ConfigError
from stream.batching import Batcher
from stream.config import StreamConfig
from stream.fake import FakeBroker, FakeSink, FakeSource
from stream.offsets import OffsetTracker
from stream.service import Service

from .images import bad_images, good_images


def test_batch_closes_at_max_batch_or_delay():
    b = Batcher(3, 0.05)
    assert b.add("a", 0.0) is None and b.add("b", 0.01) is None
    assert b.add("c", 0.02) == ["a", "b", "c"]
    assert b.add("d", 1.0) is None
    assert b.due(1.04) is None
    assert b.wait_time(1.02) == pytest.approx(0.03)
    assert b.due(1.05) == ["d"]
    assert b.flush() is None


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
    values = dict(bootstrap_servers="fake", input_topic=("in",), output_topic="out", dead_letter_topic="dlq",
                  artifact=artifact, metrics_port=0, max_batch=8, max_delay_ms=5, commit_interval_ms=50)
    values.update(overrides)
    return StreamConfig(**values).validate()


def service(broker: FakeBroker, cfg: StreamConfig) -> Service:
    return Service(cfg, source_factory=lambda r, a: FakeSource(broker, list(cfg.input_topic), cfg.group_id, r, a),
                   sink_factory=lambda on_retry: FakeSink(broker, on_retry))


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
    stats = service(broker, config(small_artifact)).run(count=good + bad, timeout=60)
    assert stats.finished == good + bad
    out = broker.records("out")
    assert sorted(k.decode() for k, _, _ in out) == sorted(good_images())
    for key, value, headers in out:
        record = json.loads(value)
        assert record["label"] in ("negative", "positive")
        assert abs(sum(record["scores"].values()) - 1) < 1e-5
        assert record["model"]["placeholder"] is True and len(record["model"]["sha256"]) == 64
        assert set(record["timing_ms"]) == {"decode", "queue", "inference", "total"}
        assert ("trace-id", key) in headers
    dead = {k.decode(): dict(h) for k, _, h in broker.records("dlq")}
    assert {name: h["error.reason"].decode() for name, h in dead.items()} == \
        {name: reason for name, (_, reason) in bad_images().items()}
    assert all({"error.message", "source.topic", "source.partition", "source.offset"} <= set(h) for h in dead.values())
    ends = {(t, p): len(broker.topics[t][p]) for t, p in [("in", 0), ("in", 1)]}
    assert broker.committed["sentiment-stream"] == ends


def test_failed_publishes_are_retried_not_lost(small_artifact):
    broker = FakeBroker()
    good, bad = fill(broker, partitions=1)
    broker.fail_next_publishes = 7
    svc = service(broker, config(small_artifact))
    svc.run(count=good + bad, timeout=60)
    assert len(broker.records("out")) + len(broker.records("dlq")) == good + bad
    assert svc.metrics.publish_retries._value.get() == 7
    assert broker.committed["sentiment-stream"] == {("in", 0): good + bad}


def test_stop_mid_stream_drains_and_commits_exactly_what_was_published(small_artifact):
    broker = FakeBroker()
    broker.create_topic("in", 1)
    data = good_images()["jpeg_chelsea"]
    total = 3000
    for i in range(total):
        broker.produce("in", data, key=str(i).encode())
    svc = service(broker, config(small_artifact, max_in_flight=16, max_batch=4))

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


def test_backpressure_bounds_in_flight(small_artifact):
    broker = FakeBroker()
    broker.create_topic("in", 1)
    for i in range(120):
        broker.produce("in", good_images()["png"], key=str(i).encode())
    svc = service(broker, config(small_artifact, max_in_flight=16, max_batch=8, max_poll_records=4))
    peak = []
    original = svc.tracker.add

    def watching_add(partition, offset):
        original(partition, offset)
        peak.append(svc.tracker.in_flight())
    svc.tracker.add = watching_add
    svc.run(count=120, timeout=60)
    assert max(peak) <= 16 + 4, "paused at the limit (one poll may overshoot by its size)"


def test_json_envelope_codec_passes_metadata(small_artifact):
    import base64
    broker = FakeBroker()
    broker.create_topic("in", 1)
    image = base64.b64encode(good_images()["webp"]).decode()
    broker.produce("in", json.dumps({"image": image, "metadata": {"post": 42}}).encode(), key=b"k")
    broker.produce("in", b'{"image": 5}', key=b"bad")
    service(broker, config(small_artifact, input_codec="json")).run(count=2, timeout=30)
    (record,) = [json.loads(v) for _, v, _ in broker.records("out")]
    assert record["metadata"] == {"post": 42}
    assert dict(broker.records("dlq")[0][2])["error.reason"] == b"bad_envelope"


def test_metrics_and_health_endpoints(small_artifact):
    from stream.embedded_broker import free_port
    broker = FakeBroker()
    good, bad = fill(broker, partitions=1)
    port = free_port()
    svc = service(broker, config(small_artifact, metrics_port=port))
    svc.run(count=good + bad, timeout=60)
    text = svc.metrics.render().decode()
    assert f'sentiment_images_total{{outcome="published"}} {float(good)}' in text
    assert 'sentiment_decode_failures_total{reason="truncated"} 1.0' in text
    assert "sentiment_batch_size_bucket" in text and "sentiment_end_to_end_seconds_count" in text
    assert 'sentiment_consumer_lag{partition="0",topic="in"} 0.0' in text


def test_health_server_answers(small_artifact):
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
        "class Upper:\n    name = 'upper'\n    def unpack(self, value, headers):\n        return value, {'seen': True}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    codec = plugins.load(plugins.INPUT_GROUP, "upper")
    assert codec.unpack(b"x", []) == (b"x", {"seen": True})
    sys.modules.pop("userplug_mod", None)


def test_failing_or_nan_inference_becomes_dead_letters_not_a_crash(small_artifact):
    """One bad image gets its own error; the rest of its batch is published."""
    broker = FakeBroker()
    broker.create_topic("in", 1)
    images = good_images()
    for name in ("png", "webp", "bmp", "tiff"):
        broker.produce("in", images[name], key=name.encode())
    svc = service(broker, config(small_artifact, max_batch=4, max_delay_ms=200))
    real_infer = svc.backend.infer
    calls = []

    def flaky(batch):
        calls.append(len(batch))
        if len(batch) > 1:
            raise RuntimeError("device lost")          # the whole batch fails ...
        out = real_infer(batch)
        if len(calls) == 2:                            # ... then the first image fails alone,
            raise RuntimeError("bad image")
        if len(calls) == 3:                            # the second yields NaN,
            out.probs[:] = np.nan
        return out                                     # the rest succeed
    svc.backend.infer = flaky
    svc.run(count=4, timeout=30)
    assert calls == [4, 1, 1, 1, 1]
    assert len(broker.records("out")) == 2
    reasons = sorted(dict(h)["error.reason"].decode() for _, _, h in broker.records("dlq"))
    assert reasons == ["inference_error", "invalid_output"]
    assert broker.committed["sentiment-stream"] == {("in", 0): 4}


def test_dead_letter_too_large_for_the_broker_keeps_headers_and_drops_the_value(small_artifact):
    broker = FakeBroker()
    broker.create_topic("in", 1)
    broker.max_record_bytes = 1000
    broker.produce("in", b"x" * 50_000, key=b"huge-text")
    broker.produce("in", good_images()["png"], key=b"ok")
    service(broker, config(small_artifact)).run(count=2, timeout=30)
    ((key, value, headers),) = broker.records("dlq")
    headers = dict(headers)
    assert key == b"huge-text" and value == b""
    assert headers["error.reason"] == b"not_an_image" and headers["error.value_dropped"] == b"50000"
    assert broker.committed["sentiment-stream"] == {("in", 0): 2}


def test_images_per_second_is_measured_at_scrape_time(monkeypatch):
    from stream import metrics as metrics_module
    from stream.metrics import Metrics
    clock = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    m = Metrics()
    for _ in range(30):
        m.record_finished("published", clock[0] - 0.1)
    assert "sentiment_images_per_second 3.0" in m.render().decode()
    clock[0] += 11
    assert "sentiment_images_per_second 0.0" in m.render().decode()
