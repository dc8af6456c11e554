"""Exactly-once processing: each unit of work's results, dead letters and consumed offsets
commit in one Kafka transaction, or none of them do.

A unit of work is everything consumed since the last commit. At each commit point (every
``--commit-interval-ms``, on shutdown, and when partitions are revoked) the poll loop stops
handing out messages, waits until every one in flight has been published into the open
transaction, adds the consumed offsets to it and commits; then the next transaction begins.
A commit or a send that fails aborts the transaction and rewinds the member's partitions to
their last committed offsets, so the unit is processed again; a fenced producer (another
member took over its transactional id) ends the member with :class:`KafkaPermanent`.

Pure service logic over the ports: the sink owns the transactional producer, the source
the group metadata and the seek.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .errors import BrokerUnavailable, KafkaPermanent, KafkaTransient, doomed_by
from .offsets import OffsetTracker
from .ports import Partition, show

log = logging.getLogger(__name__)
TRANSACTION_COMMIT_S = 10.0   # of the transaction timeout, kept for adding the offsets and committing


class TransactionalSink(Protocol):
    def commit_transaction(self, offsets: dict[Partition, int], group_metadata: Any) -> None: ...

    def abort_transaction(self) -> None: ...


class RewindableSource(Protocol):
    def group_metadata(self) -> Any: ...

    def rewind(self, partitions: list[Partition]) -> None: ...

    def in_group(self) -> bool:
        """False when this member may no longer be in the group: its generation was reset, or no
        heartbeat was answered for long enough that the coordinator may have evicted it. A Kafka broker
        would fence a transactional offset commit of an evicted member; tansu does not, so the member
        fences itself."""
        ...


class Transactions:
    """Commit points for one member. ``commit`` runs on the poll thread; ``end_for_revocation`` on
    whatever thread the source lends it during a revocation; a lock keeps them apart."""

    def __init__(self, sink: TransactionalSink, source: RewindableSource, tracker: OffsetTracker,
                 owned: Callable[[], set[Partition]], drain_timeout_s: float,
                 transaction_timeout_s: float | None = None) -> None:
        self.sink, self.source, self.tracker, self.owned = sink, source, tracker, owned
        self.drain_timeout_s = drain_timeout_s
        self.transaction_timeout_s = transaction_timeout_s   # None: the coordinator never aborts one
        self._lock = threading.Lock()
        self._opened = time.monotonic()   # when the open transaction may have taken its first record
        self.fenced: str | None = None    # why this member may commit nothing more (it was evicted)
        self._redo: set[Partition] = set()   # partitions whose aborted unit is redone if they stay here
        self.commits = 0
        self.aborts = 0

    def commit(self) -> dict[Partition, int]:
        """Wait for the unit in flight, commit it with its offsets; {} when there was nothing to commit.

        Raises :class:`KafkaTransient` or :class:`BrokerUnavailable` after aborting and rewinding
        (the unit will be processed again), :class:`KafkaPermanent` when fenced, evicted, or when
        the unit cannot be published before the coordinator would abort its transaction.
        """
        with self._lock:
            if self.fenced is None and not self.tracker.in_flight() and not self.tracker.committable():
                self._opened = time.monotonic()   # nothing sent since the last commit: no transaction is open yet
            if self.fenced is None and not self.tracker.wait_idle(self._wait_s()):
                if self._expiring():
                    raise KafkaPermanent(
                        f"exactly-once: {self.tracker.in_flight()} messages still unpublished after the commit "
                        f"point's wait, and the transaction would outlive its timeout "
                        f"({self.transaction_timeout_s:g} s, from --commit-interval-ms and --drain-timeout-s); "
                        f"exiting so its unit is aborted and redone by the partitions' next owner")
                log.warning("%d messages still unpublished after %.0f s; committing later",
                            self.tracker.in_flight(), self.drain_timeout_s)
                return {}
            return self._commit_idle()

    def _wait_s(self) -> float:
        """The commit point's wait: --drain-timeout-s, never past the open transaction's timeout."""
        if self.transaction_timeout_s is None:
            return self.drain_timeout_s
        left = self._opened + self.transaction_timeout_s - TRANSACTION_COMMIT_S - time.monotonic()
        return max(0.0, min(self.drain_timeout_s, left))

    def _expiring(self) -> bool:
        """Whether waiting once more at the next commit point would outlive the transaction's timeout."""
        return self._wait_s() < self.drain_timeout_s

    def _commit_idle(self, rewind: bool = True) -> dict[Partition, int]:
        owned = self.owned()
        offsets = {p: o for p, o in self.tracker.committable().items() if p in owned}   # this generation's only
        if self.fenced is None and (offsets or self.tracker.in_flight()) and not self.source.in_group():
            self.fenced = "its group session may have expired (no heartbeat answered in time, or its generation " \
                          "was reset)"
        if self.fenced is not None:
            self._abort_quietly()
            raise KafkaPermanent(self._fenced_line())
        if not offsets:
            return {}
        try:
            self.sink.commit_transaction(offsets, self.source.group_metadata())
        except (KafkaTransient, BrokerUnavailable):
            self._opened = time.monotonic()
            if rewind:
                self._rewind()
            else:
                self.aborts += 1
            raise
        self._opened = time.monotonic()
        self.tracker.committed(offsets)
        self.commits += 1
        return offsets

    def _fenced_line(self) -> str:
        return (f"exactly-once: this member was evicted from the group ({self.fenced}); its open transaction "
                f"was aborted and it exits so none of its in-flight work can commit (the partitions' new owner "
                f"redoes it); a restart rejoins")

    def _abort_quietly(self) -> None:
        try:
            self.sink.abort_transaction()
        except (KafkaTransient, BrokerUnavailable) as exc:
            log.warning("aborting the open transaction failed: %s", exc)
        self.aborts += 1
        self._opened = time.monotonic()

    def lost(self, partitions: list[Partition]) -> KafkaPermanent:
        """Partitions were lost (evicted): abort the open transaction before anything else is sent and
        fence this member for good (what it still has in flight would publish into a later transaction
        while the partitions' new owner redoes it). Returns the failure that ends the member."""
        self.fenced = self.fenced or f"partitions {show(partitions)} lost"   # at once: a commit waiting now sees it
        with self._lock:
            self._abort_quietly()
        return KafkaPermanent(self._fenced_line())

    def close(self) -> None:
        """On the way out, after the last commit point: abort whatever is still open (work published after
        an eviction's abort, or a unit that could not commit). A transaction left open holds back every
        read_committed reader of the output, and tansu never times one out."""
        with self._lock:
            if self.fenced is not None or self.tracker.in_flight() or self.tracker.committable():
                self._abort_quietly()

    def redo(self) -> set[Partition]:
        """On the poll thread after each poll: rewind the partitions whose unit a revocation aborted and that
        came back to this member (a retained partition keeps its position across a rebalance, so polling
        on would skip the aborted inputs). Returns them: records polled from them before the rewind are
        dropped."""
        with self._lock:
            kept, self._redo = self._redo & self.owned(), set()
            if kept:
                self._seek_back(sorted(kept))
                log.warning("%s kept after a revocation whose transaction was aborted: rewound to their last "
                            "committed offsets, their work will be redone", show(sorted(kept)))
            return kept

    def _rewind(self) -> None:
        self.aborts += 1
        partitions = sorted(self.owned())
        self._seek_back(partitions)
        log.warning("transaction aborted; %s rewound to their last committed offsets, their work will be redone",
                    show(partitions))

    def _seek_back(self, partitions: list[Partition]) -> None:
        try:
            self.source.rewind(partitions)
        except (KafkaTransient, BrokerUnavailable) as exc:   # polling on would skip the aborted unit
            raise KafkaPermanent(f"rewinding after an aborted transaction failed ({exc}); exiting so a restart "
                                 f"resumes from the committed offsets") from exc
        self.tracker.forget(partitions)

    def end_for_revocation(self, drained: bool) -> dict[Partition, int]:
        """Before partitions go: commit the open transaction if its work is all published, else abort it
        (what was consumed since the last commit is redelivered to the partitions' next owner)."""
        with self._lock:
            if drained:
                try:   # no rewind now: the partitions are leaving; their next owner starts from the committed offsets
                    return self._commit_idle(rewind=False)
                except (KafkaTransient, BrokerUnavailable) as exc:
                    # those this member keeps come back at their positions: redo() rewinds them
                    self._redo |= self.owned()
                    log.warning("revocation: the open transaction was aborted (%s); its work will be redone by "
                                "the partitions' next owner", exc)
                    return {}
            try:
                self.sink.abort_transaction()
            except (KafkaTransient, BrokerUnavailable) as exc:
                log.warning("revocation: abort failed: %s", exc)
            self.aborts += 1
            # the undrained work would publish into this member's next transaction and commit there,
            # while the partitions' next owner redoes it: a duplicate for read_committed readers
            raise KafkaPermanent(f"partitions revoked with work still in flight after {self.drain_timeout_s:g} s "
                                 f"(--drain-timeout-s) in exactly-once mode; exiting so that work cannot commit "
                                 f"in a later transaction (the next owner redoes it)")


def commit_unit(doomed: Any, commit: Callable[[], None], committed: Callable[[], None], abort: Callable[[], None],
                client_error: type[BaseException], fenced_check: Callable[[BaseException], None]) -> None:
    """A transactional sink's half of a commit point, either client: ``commit`` (add the offsets, commit)
    unless a send in the unit failed (``doomed``: that failure, which :func:`.errors.doomed_by` explains);
    ``committed`` after a commit. A doomed unit or a ``client_error`` from the calls aborts the transaction
    (``abort``) and is raised again (the client's by the caller's :func:`.errors.kafka_errors`); a fenced
    producer's (``fenced_check`` raises for it) stops the member without an abort, which would fail too."""
    try:
        if doomed is not None:
            raise doomed_by(doomed)
        commit()
        committed()
    except (KafkaTransient, BrokerUnavailable):
        log.warning("a send in the transaction failed (%s); aborting it", doomed)
        abort()
        raise
    except client_error as exc:
        fenced_check(exc)
        log.warning("committing the transaction failed (%s); aborting it", exc)
        abort()
        raise
