"""Every wait has a bound, and a member that stops making progress gives its partitions up."""
from __future__ import annotations

import threading

import pytest

from stream.ordering import InOrder
from stream.records import Outgoing


def test_a_send_blocked_on_one_partition_holds_up_neither_other_partitions_nor_the_order():
    """A producer's send can block (waiting for metadata): completions of other partitions go on,
    and what becomes ready behind the blocked send is emitted after it, in order."""
    order: InOrder[str] = InOrder()
    for partition in ("a", "b"):
        for offset in range(3):
            order.expect(partition, offset)
    release, blocked = threading.Event(), threading.Event()
    out: list[str] = []

    def emit(item: str) -> None:
        if item == "a0":
            blocked.set()
            assert release.wait(30), "never released"
        out.append(item)
    sender = threading.Thread(target=order.complete, args=("a", 0, "a0", emit), daemon=True)
    sender.start()
    assert blocked.wait(30)
    other = threading.Thread(target=lambda: [order.complete("b", i, f"b{i}", emit) for i in range(3)], daemon=True)
    other.start()
    other.join(10)
    assert not other.is_alive(), "another partition's completions waited for the blocked send"
    order.complete("a", 1, "a1", emit)   # ready behind the blocked one: queued, this thread does not wait
    assert out == ["b0", "b1", "b2"]
    release.set()
    sender.join(10)
    order.complete("a", 2, "a2", emit)
    assert out == ["b0", "b1", "b2", "a0", "a1", "a2"] and order.waiting() == 0


@pytest.mark.kafka
def test_a_transaction_commit_the_coordinator_never_answers_ends_within_its_bound(tmp_path):
    """kafka-python's commit_transaction waits on the coordinator without a bound; the sink's wait
    has one, and past it the member ends instead of hanging at its commit point."""
    from stream.embedded_broker import EmbeddedBroker, free_port
    from stream.errors import KafkaPermanent
    from stream.kafka_sink import KafkaSink

    from .kafka_helpers import FlakyProxy
    port = free_port()
    proxy = FlakyProxy(port, delay_s=0.0)
    broker = EmbeddedBroker(port=port, advertised_port=proxy.port, log_path=tmp_path / "tansu.log").start()
    sink = None
    try:
        broker.create_topics({"out": 1, "in": 1})
        bound_s = 1.0   # the production bound is TRANSACTION_CALLS_S (8 s); what is tested is that there is one
        sink = KafkaSink(f"127.0.0.1:{proxy.port}", {}, transactional_id="bounded-0", transaction_calls_s=bound_s)
        acked = threading.Event()
        sink.publish(Outgoing("out", None, b"result", []), acked.set)
        assert acked.wait(30)
        proxy.delay_s = 3600.0   # from now on nothing reaches the broker or comes back
        raised: list[BaseException] = []

        def commit() -> None:
            try:
                sink.commit_transaction({("in", 0): 1}, "group")
            except BaseException as exc:   # inspected below
                raised.append(exc)
        committer = threading.Thread(target=commit, daemon=True)
        committer.start()
        committer.join(bound_s + 12)   # kafka-python alone waits out its 30 s request timeout
        assert not committer.is_alive(), "commit_transaction still waiting"
        assert len(raised) == 1 and isinstance(raised[0], KafkaPermanent), raised
        assert "did not answer" in str(raised[0])
    finally:
        if sink is not None:
            sink.close()
        proxy.close()
        broker.kill()   # in memory, nothing to keep: its graceful shutdown takes 5 s


class _Closing:
    """What the closing deadline watches of a service."""

    def __init__(self) -> None:
        self.closing = threading.Event()

    def uncommitted(self) -> str:
        return "3 messages unfinished"


def test_closing_after_a_failure_gets_the_same_deadline_as_after_sigterm():
    """A run ended by a permanent failure or --fail-after-s, not by a signal, whose closing hangs:
    the process still exits 1 at the deadline; a close that finishes in time is left alone."""
    from stream.cli import exit_when_closing_overdue
    service, finished, exits = _Closing(), threading.Event(), []
    watcher = threading.Thread(target=exit_when_closing_overdue, args=(service, finished, 0.2, exits.append),
                               daemon=True)
    watcher.start()
    service.closing.set()   # the run ended on its own and closing hangs
    watcher.join(10)
    assert not watcher.is_alive() and exits == [1]
    service, finished = _Closing(), threading.Event()
    watcher = threading.Thread(target=exit_when_closing_overdue, args=(service, finished, 30, exits.append),
                               daemon=True)
    watcher.start()
    service.closing.set()
    finished.set()          # closed in time
    watcher.join(10)
    assert not watcher.is_alive() and exits == [1]


def test_progress_watch_counts_only_queued_work_that_finishes_nothing():
    from stream.progress import ProgressWatch
    watch = ProgressWatch()
    assert watch.stalled_for(0, 5, now=0) == 0 and watch.stalled_for(0, 5, now=100) == 0   # idle is not stuck
    assert watch.stalled_for(3, 5, now=100) == 0
    assert watch.stalled_for(3, 5, now=130) == 30
    assert watch.stalled_for(3, 6, now=131) == 0 and watch.stalled_for(3, 6, now=140) == 9   # one finished
    watch.reset()
    assert watch.stalled_for(3, 6, now=200) == 0


def test_a_member_whose_inference_hangs_fails_healthz_and_ends():
    """The poll loop never waits on the pipeline, so nothing else would evict this member: with work
    queued and nothing finished for --stall-timeout-s, /healthz fails and the run ends with one line."""
    import time
    import urllib.error
    import urllib.request

    from stream.embedded_broker import free_port
    from stream.errors import KafkaPermanent
    from stream.fake import FakeBroker

    from .images import good_images
    from .standins import ARTIFACT, PixelModel
    from .test_stream_units import config, service
    broker = FakeBroker()
    broker.create_topic("in", 1)
    for i in range(8):
        broker.produce("in", good_images()["png"], key=str(i).encode())
    port = free_port()
    release = threading.Event()

    class Hanging(PixelModel):   # the stalled inference stand-in
        def _infer_impl(self, images):
            release.wait(60)
            return super()._infer_impl(images)
    svc = service(broker, config(ARTIFACT, metrics_port=port, stall_timeout_s=1.0, drain_timeout_s=0.5),
                  Hanging())
    raised: list[BaseException] = []

    def run() -> None:
        try:
            svc.run(timeout=120)
        except BaseException as exc:   # inspected below
            raised.append(exc)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    statuses: list[int] = []
    deadline = time.monotonic() + 30
    try:
        while 503 not in statuses:
            assert worker.is_alive() and time.monotonic() < deadline, f"/healthz never failed: {statuses[-3:]}"
            try:
                statuses.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)
                assert b"no progress" in exc.read()
            except OSError:   # not listening yet
                pass
            time.sleep(0.02)
        worker.join(30)
    finally:
        release.set()
    assert not worker.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], KafkaPermanent) and "no progress" in str(raised[0])
    assert broker.committed["sentiment-stream"].get(("in", 0), 0) == 0, "nothing is committed past the stuck work"
