"""Exactly once against the fake broker: commit points, revocations whose commit fails, evicted
members and the transaction timeout. The fake's transactional sink, like tansu, checks neither
the generation nor the member id of the offsets it commits: the service must fence itself."""
from __future__ import annotations

import collections
import threading

import pytest

from engine_build.errors import ConfigError
from stream.app import build
from stream.errors import KafkaPermanent
from stream.fake import FakeBroker
from stream.metrics import Metrics
from stream.offsets import OffsetTracker
from stream.rebalance import Rebalance
from stream.records import Outgoing
from stream.service import Service
from stream.transactions import Transactions

from .images import good_images
from .standins import ARTIFACT, PixelModel, stand_in
from .test_stream_units import config, sources
from .waiting import wait_until

GROUP = "sentiment-stream"


def exactly_once(artifact, **overrides):
    # commits only when partitions are revoked and on shutdown: each test places its commit points
    return config(artifact, processing_guarantee="exactly-once", commit_interval_ms=600_000, **overrides)


def transactional(broker: FakeBroker, cfg, model: PixelModel | None = None) -> Service:
    """An exactly-once service on the fake broker, its model a stand-in (tests/standins.py)."""
    return build(cfg, connector=broker.connector(list(cfg.input_topic), cfg.group_id, transactional=True),
                 model=stand_in(model))


def fill(broker: FakeBroker, total: int) -> None:
    broker.create_topic("in", 2)
    for i in range(total):
        broker.produce("in", good_images()["png"], partition=i % 2, key=str(i).encode())



def start(svc: Service) -> tuple[threading.Thread, list[BaseException]]:
    raised: list[BaseException] = []

    def run() -> None:
        try:
            svc.run(timeout=120)
        except BaseException as exc:   # the test inspects it
            raised.append(exc)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker, raised


def newcomer(broker: FakeBroker):
    """A member that joins and takes a share without consuming it."""
    handler = Rebalance(OffsetTracker(), Metrics(), drain_timeout_s=5)
    member = broker.connector(["in"], GROUP).source(handler)
    wait_until(lambda: bool(member.poll(0.01, 4) is not None and handler.owned()), what="the newcomer's share")
    return member


def test_a_revocation_whose_commit_fails_redoes_what_the_member_keeps():
    """The open transaction is aborted at a revocation; the member keeps partition 0 at its
    position (as kafka-python does): unless it rewinds, the aborted inputs are never redone."""
    total = 40
    broker = FakeBroker()
    fill(broker, total)
    first = transactional(broker, exactly_once(ARTIFACT))
    worker, raised = start(first)
    wait_until(lambda: first.finished() == total, what="every input published into the open transaction")
    broker.fail_next_commits = 1     # the revocation's commit fails
    member = newcomer(broker)
    assert broker.fail_next_commits == 0
    member.close()                   # the first member gets everything back
    source = first.connector.sources[-1]   # type: ignore[attr-defined]
    wait_until(lambda: [source.position(("in", p)) for p in (0, 1)] == [total // 2] * 2   # type: ignore[attr-defined]
               and first.tracker.in_flight() == 0, what="everything fetched again and published")
    first.stop()                     # commits on the way out
    worker.join(60)
    assert not raised
    assert broker.committed[GROUP] == {("in", 0): total // 2, ("in", 1): total // 2}
    assert sorted(sources(broker.records("out"))) == sorted((i % 2, i // 2) for i in range(total))


def test_an_evicted_member_aborts_its_transaction_and_commits_nothing_more():
    """A member frozen past its session timeout: its work is redone by the new owner, and none of
    what it published or still has in flight may commit; the fake, like tansu, would accept it."""
    total = 40
    broker = FakeBroker()
    fill(broker, total)
    cfg = exactly_once(ARTIFACT)
    evicted = transactional(broker, cfg, PixelModel(delay_s=0.01))
    worker, raised = start(evicted)
    wait_until(lambda: evicted.finished() >= total // 2, what="half the inputs in the open transaction")
    broker.evict(evicted.connector.sources[-1])   # type: ignore[attr-defined]
    other = transactional(broker, cfg)
    other_worker, other_raised = start(other)
    worker.join(60)
    assert len(raised) == 1 and isinstance(raised[0], KafkaPermanent) and "evicted" in str(raised[0])
    assert evicted.connector.sinks[-1].open_transaction() == [], \
        "left open, it would hold back read_committed readers"  # type: ignore[attr-defined]
    source = other.connector.sources[-1]   # type: ignore[attr-defined]
    wait_until(lambda: [source.position(("in", p)) for p in (0, 1)] == [total // 2] * 2   # type: ignore[attr-defined]
               and other.tracker.in_flight() == 0, what="the other member fetches and publishes every input")
    other.stop()   # commits on the way out
    other_worker.join(60)
    assert not other_raised
    assert broker.committed[GROUP] == {("in", 0): total // 2, ("in", 1): total // 2}
    counts = collections.Counter(sources(broker.records("out")))
    assert {p: n for p, n in counts.items() if n > 1} == {}, "inputs committed twice"
    assert sorted(counts) == sorted((i % 2, i // 2) for i in range(total))


def test_a_member_whose_session_may_have_expired_commits_nothing():
    """Resumed after a freeze, the poll thread reaches its commit point before the client has
    noticed the eviction: the transaction is aborted, not committed with stale group metadata."""
    broker = FakeBroker()
    broker.create_topic("in", 1)
    broker.produce("in", b"x")
    tracker = OffsetTracker()
    handler = Rebalance(tracker, Metrics(), drain_timeout_s=5)
    connector = broker.connector(["in"], GROUP, transactional=True)
    source, sink = connector.source(handler), connector.sink(lambda: None)
    wait_until(lambda: bool(source.poll(0.01, 1) or handler.owned()), what="the partition assigned")
    transactions = Transactions(sink, source, tracker, handler.owned, drain_timeout_s=5)
    tracker.add(("in", 0), 0)
    sink.publish(Outgoing("out", None, b"result", []), lambda: tracker.done(("in", 0), 0))
    broker.evict(source)   # no poll since: the member does not know yet
    with pytest.raises(KafkaPermanent, match="evicted"):
        transactions.commit()
    assert broker.records("out") == [] and broker.committed[GROUP] == {}
    with pytest.raises(KafkaPermanent, match="evicted"):
        transactions.commit()   # fenced for good: a later commit point commits nothing either
    assert broker.committed[GROUP] == {}


def test_a_unit_that_cannot_be_published_before_its_transaction_times_out_ends_the_member():
    """Rather than wait past the transaction timeout (the coordinator aborts it and the member is
    fenced with a misleading error), the commit point ends the member with one line."""
    broker = FakeBroker()
    broker.create_topic("in", 1)
    tracker = OffsetTracker()
    handler = Rebalance(tracker, Metrics(), drain_timeout_s=0.2)
    connector = broker.connector(["in"], GROUP, transactional=True)
    source, sink = connector.source(handler), connector.sink(lambda: None)
    transactions = Transactions(sink, source, tracker, handler.owned, drain_timeout_s=0.2,
                                transaction_timeout_s=10.3)   # 10 s are kept for the commit itself
    tracker.add(("in", 0), 0)   # never published
    with pytest.raises(KafkaPermanent, match="transaction would outlive its timeout"):
        transactions.commit()


def test_the_transaction_timeout_is_derived_from_the_commit_wait_and_checked():
    cfg = config(ARTIFACT, processing_guarantee="exactly-once", drain_timeout_s=30, commit_interval_ms=1000)
    assert cfg.transaction_timeout_ms() > 30_000 + 1000
    with pytest.raises(ConfigError, match="transaction.max.timeout.ms"):
        config(ARTIFACT, processing_guarantee="exactly-once", drain_timeout_s=900,
               max_poll_interval_ms=1_000_000)
    config(ARTIFACT, drain_timeout_s=900, max_poll_interval_ms=1_000_000)   # at least once: no transaction


def test_a_commit_that_keeps_failing_past_the_limit_ends_the_run():
    """Exactly once, a unit whose every redo fails alike (librdkafka reports an ACL on the output topic as
    a purge of the transaction's records, a transient code) would abort and redo for ever: commits failing
    past --fail-after-s end the member with one line."""
    broker = FakeBroker()
    fill(broker, 6)
    broker.fail_next_commits = 10 ** 6
    svc = transactional(broker, config(ARTIFACT, processing_guarantee="exactly-once", commit_interval_ms=50,
                                       fail_after_s=0.5))
    with pytest.raises(KafkaPermanent, match="committing offsets failing for .* past --fail-after-s"):
        svc.run(timeout=60)
    assert broker.records("out") == [] and not any(broker.committed[GROUP].values()), "nothing committed"


def test_exactly_once_an_output_topic_the_service_may_not_write_stops_the_member_saying_what_to_grant():
    """Exactly once as at least once: nothing is dead-lettered, the refused record stays unacknowledged, and
    the run ends with the sink's line, the ACL and what to grant; nothing is committed."""
    broker = FakeBroker()
    fill(broker, 6)
    broker.refuse_topics.add("out")
    svc = transactional(broker, config(ARTIFACT, processing_guarantee="exactly-once", commit_interval_ms=50))
    with pytest.raises(KafkaPermanent, match="grant this service's principal WRITE on out"):
        svc.run(timeout=60)
    assert broker.records("out") == [] and broker.records("dlq") == []
    assert not any(broker.committed[GROUP].values()), "nothing committed"
