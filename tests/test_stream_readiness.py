"""Readiness, changed from the broker probe and the poll loop at once."""
from __future__ import annotations

import logging
import threading

import kafka.errors
import pytest

from stream.readiness import SHUTTING_DOWN, Readiness


class _Slow(logging.Handler):
    """Each line takes a moment to write, as on a busy stderr: the window between deciding on a
    transition and making it is then wide enough for another thread to step into."""

    def emit(self, record: logging.LogRecord) -> None:
        threading.Event().wait(0.0002)


def test_shutting_down_stays_final_while_other_threads_keep_reporting():
    published: list[tuple[bool, str]] = []
    readiness = Readiness("kafka:9092", lambda ready, reason: published.append((ready, reason)))
    logger, handler = logging.getLogger("stream.readiness"), _Slow()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    calls = [0] * 4
    shut = threading.Event()
    after_shutdown = 300   # calls each thread makes once shutting down has begun

    def report(index: int) -> None:
        done_after = None
        while done_after is None or calls[index] < done_after:
            i = calls[index]
            if index % 2:   # the broker probe: Kafka comes and goes, a topic goes missing
                readiness.observed(reachable=i % 3 != 0, missing=["typo"] if i % 5 == 0 else [])
                readiness.update()
            else:           # the poll loop: consuming fails and recovers
                readiness.update(None if i % 2 else "consuming is failing: timeout")
                readiness.set(True)
            calls[index] += 1
            if done_after is None and shut.is_set():
                done_after = calls[index] + after_shutdown
    threads = [threading.Thread(target=report, args=(i,), daemon=True) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        while min(calls) < 200 and all(t.is_alive() for t in threads):
            threading.Event().wait(0.001)
        readiness.shut_down()
        shut.set()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert readiness.state == (False, SHUTTING_DOWN)
    first = published.index((False, SHUTTING_DOWN))
    assert published[first:] == [(False, SHUTTING_DOWN)], f"published after shutting down: {published[first:][:5]}"
    assert any(ready for ready, _ in published[:first]), "the threads did flap the state before"


def test_causes_take_precedence_and_each_change_is_said_once(caplog):
    published: list[tuple[bool, str]] = []
    readiness = Readiness("kafka:9092", lambda ready, reason: published.append((ready, reason)))
    with caplog.at_level("INFO", logger="stream"):
        readiness.update()
        assert readiness.state == (False, "looking for the input topics")
        assert not readiness.observed(True, ["typo"])
        readiness.update("consuming is failing: x")
        assert readiness.state == (False, "input topic typo does not exist")
        readiness.observed(True, [])
        readiness.update("consuming is failing: x")
        assert readiness.state == (False, "consuming is failing: x")
        assert readiness.observed(False, None) and not readiness.reachable
        readiness.observed(False, None)
        readiness.update()
        assert readiness.state == (False, "Kafka at kafka:9092 is unreachable")
        assert readiness.observed(True, None)
        readiness.update()
        assert readiness.state == (True, "") and published[-1] == (True, "")
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "unreachable; retrying" in line]) == 1, lines
    assert len([line for line in lines if "'typo' does not exist" in line]) == 1, lines
    assert lines.count("ready") == 1 and "every input topic exists" in lines


def test_a_failed_listing_is_no_news_of_the_topics(caplog):
    """None (the listing failed: a timeout, an ACL) is not "every input topic exists": never looked,
    readiness keeps looking; after a look, the last list found stands."""
    readiness = Readiness("kafka:9092", lambda ready, reason: None)
    with caplog.at_level("INFO", logger="stream"):
        assert not readiness.observed(True, None)
        readiness.update()
        assert readiness.state == (False, "looking for the input topics")
        readiness.observed(True, ["typo"])
        readiness.observed(True, None)
        readiness.update()
        assert readiness.state == (False, "input topic typo does not exist")
    assert "every input topic exists" not in [r.getMessage() for r in caplog.records]


class _Listing:
    """A client stand-in whose topic listing fails as a broker that answers TCP may make it fail."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def topics(self) -> set[str]:   # kafka-python's KafkaConsumer.topics
        raise self.error

    def list_topics(self, timeout: float) -> object:   # confluent-kafka's AdminClient.list_topics
        raise self.error


def _probe(source: object, caplog: pytest.LogCaptureFixture) -> tuple[list[str] | None, tuple[bool, str]]:
    """What the broker probe hands readiness from ``source``, and the state it then reaches: before any
    listing succeeded, and after one found the input topic missing (which must still stand)."""
    missing = source.missing_topics()   # type: ignore[attr-defined]
    fresh, earlier = (Readiness("kafka:9092", lambda ready, reason: None) for _ in range(2))
    earlier.observed(True, ["in"])
    with caplog.at_level("INFO", logger="stream"):
        for readiness in (fresh, earlier):
            readiness.observed(True, source.missing_topics())   # type: ignore[attr-defined]
            readiness.update()
    assert "every input topic exists" not in [r.getMessage() for r in caplog.records]
    assert earlier.state == (False, "input topic in does not exist")
    return missing, fresh.state


@pytest.mark.parametrize("error", [kafka.errors.KafkaTimeoutError("Failed to update metadata after 5.0 secs"),
                                   kafka.errors.ClusterAuthorizationFailedError("describe")])
def test_kafka_python_source_says_it_did_not_look_when_the_listing_fails(error, caplog):
    from stream.kafka_io import KafkaSource
    source = KafkaSource.__new__(KafkaSource)   # no broker: only what missing_topics reads
    source._consumer, source._topics = _Listing(error), ["in"]
    assert _probe(source, caplog) == (None, (False, "looking for the input topics"))


@pytest.mark.parametrize("code", ["_TIMED_OUT", "CLUSTER_AUTHORIZATION_FAILED"])
def test_librdkafka_source_says_it_did_not_look_when_the_listing_fails(code, caplog):
    confluent_kafka = pytest.importorskip("confluent_kafka")
    from stream.rdkafka_io import RdKafkaSource
    source = RdKafkaSource.__new__(RdKafkaSource)   # no broker: only what missing_topics reads
    error = confluent_kafka.KafkaException(confluent_kafka.KafkaError(getattr(confluent_kafka.KafkaError, code)))
    source._admin, source._topics = _Listing(error), ["in"]
    assert _probe(source, caplog) == (None, (False, "looking for the input topics"))
