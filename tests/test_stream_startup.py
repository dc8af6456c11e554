"""The start-up line says what this process runs with, and where each choice came from."""
from __future__ import annotations

from importlib.metadata import version

import pytest

from stream.cli import startup_line
from stream.config import StreamConfig

AVX2 = {"model": "AMD EPYC 7B12", "machine": "x86_64", "extensions": ["avx2", "fma", "f16c"]}


def config(**overrides) -> StreamConfig:
    return StreamConfig(**{"bootstrap_servers": "localhost:9092", "input_topic": ("in",), "output_topic": "out",
                           "dead_letter_topic": "dlq", "artifact": "a", **overrides})


def test_automatic_choices_say_they_were_automatic_and_name_the_cpu():
    line = startup_line(config(), "openvino (int8)", streams=2, decoders=1, cores=2, cpu=AVX2)
    assert f"Kafka client kafka-python {version('kafka-python')}" in line
    assert "2 inference streams (the runtime's choice; inference on every core)" in line
    assert "1 decode thread (auto for 2 cores)" in line
    assert "CPU AMD EPYC 7B12 (avx2, fma, f16c; 2 usable cores)" in line


def test_the_latency_lane_choice_is_in_the_streams_part():
    lane = "lone batches of <= 8 on all inference threads (a lone image: 25.6 ms on one stream)"
    line = startup_line(config(), "openvino (fp32)", streams=2, decoders=2, cores=2, cpu=AVX2, lane=lane)
    assert f"2 inference streams (the runtime's choice; inference on every core; {lane})" in line


def test_choices_given_on_the_command_line_are_named_as_such():
    line = startup_line(config(inference_streams=4, inference_threads=8, decode_workers=3), "onnxruntime (fp32)",
                        streams=4, decoders=3, cores=16, cpu=AVX2)
    assert "4 inference streams (--inference-streams 4; 8 inference threads)" in line
    assert "3 decode threads (--decode-workers 3)" in line


def test_the_librdkafka_client_is_named_with_its_version():
    confluent_kafka = pytest.importorskip("confluent_kafka")
    line = startup_line(config(kafka_client="librdkafka"), "openvino (int8)", 1, 1, 2, AVX2)
    assert f"Kafka client librdkafka {confluent_kafka.libversion()[0]}" in line and "kafka-python" not in line


def test_streams_the_runtime_granted_below_those_asked_are_said_with_why():
    note = "asked 64; OpenVINO allows 2 with 2 threads"
    line = startup_line(config(inference_streams=64), "openvino (int8)", streams=2, decoders=2, cores=2, cpu=AVX2,
                        streams_note=note)
    assert f"2 inference streams ({note}; inference on every core)" in line and "--inference-streams 64" not in line


def test_the_start_up_line_takes_the_streams_note_from_the_backend(caplog):
    """Before: the line credited --inference-streams 64 for the 2 streams OpenVINO granted."""
    import logging

    from stream.app import build
    from stream.cli import main
    from stream.fake import FakeBroker

    from .standins import PixelModel, stand_in

    model = PixelModel(concurrency=2)
    model.streams_note = "asked 64; OpenVINO allows 2 with 2 threads"
    model.threads = 2
    broker = FakeBroker()
    broker.create_topic("in", 1)

    def stopped_service(cfg):   # a service stopped before it runs: run() closes at once
        service = build(cfg, connector=broker.connector(list(cfg.input_topic), cfg.group_id), model=stand_in(model))
        service.stop()
        return service
    caplog.set_level(logging.INFO, "stream")
    assert main(["--bootstrap-servers", "fake:9092", "--input-topic", "in", "--output-topic", "out",
                 "--dead-letter-topic", "dlq", "--artifact", "a", "--metrics-port", "0", "--inference-streams", "64"],
                {}, build=stopped_service) == 0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting: ")]
    assert "2 inference streams (asked 64; OpenVINO allows 2 with 2 threads; 2 inference threads)" in line


def test_the_start_up_line_gives_the_threads_the_runtime_runs_not_the_flag():
    """--inference-threads 3 on a 2-core machine: OpenVINO runs 2, and the line said 3."""
    line = startup_line(config(inference_threads=3), "openvino (int8)", streams=1, decoders=1, cores=2, cpu=AVX2,
                        threads_run=2)
    assert "1 inference stream (the runtime's choice; 2 inference threads (asked 3))" in line
    line = startup_line(config(inference_threads=2), "openvino (int8)", streams=1, decoders=1, cores=2, cpu=AVX2,
                        threads_run=2)
    assert "(the runtime's choice; 2 inference threads)" in line
