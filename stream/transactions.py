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
from collections.abc import Callable
from typing import Any, Protocol

from engine_build.errors import BrokerUnavailable, KafkaPermanent, KafkaTransient

from .offsets import OffsetTracker
from .ports import Partition, show

log = logging.getLogger(__name__)


class TransactionalSink(Protocol):
    def commit_transaction(self, offsets: dict[Partition, int], group_metadata: Any) -> None: ...

    def abort_transaction(self) -> None: ...


class RewindableSource(Protocol):
    def group_metadata(self) -> Any: ...

    def rewind(self, partitions: list[Partition]) -> None: ...


class Transactions:
    """Commit points for one member. ``commit`` runs on the poll thread; ``end_for_revocation`` on
    whatever thread the source lends it during a revocation; a lock keeps them apart."""

    def __init__(self, sink: TransactionalSink, source: RewindableSource, tracker: OffsetTracker,
                 owned: Callable[[], set[Partition]], drain_timeout_s: float) -> None:
        self.sink, self.source, self.tracker, self.owned = sink, source, tracker, owned
        self.drain_timeout_s = drain_timeout_s
        self._lock = threading.Lock()
        self.commits = 0
        self.aborts = 0

    def commit(self) -> dict[Partition, int]:
        """Wait for the unit in flight, commit it with its offsets; {} when there was nothing to commit.

        Raises :class:`KafkaTransient` or :class:`BrokerUnavailable` after aborting and rewinding
        (the unit will be processed again), :class:`KafkaPermanent` when fenced.
        """
        with self._lock:
            if not self.tracker.wait_idle(self.drain_timeout_s):
                log.warning("%d messages still unpublished after %.0f s; committing later",
                            self.tracker.in_flight(), self.drain_timeout_s)
                return {}
            return self._commit_idle()

    def _commit_idle(self, rewind: bool = True) -> dict[Partition, int]:
        offsets = self.tracker.committable()
        if not offsets:
            return {}
        try:
            self.sink.commit_transaction(offsets, self.source.group_metadata())
        except (KafkaTransient, BrokerUnavailable):
            if rewind:
                self._rewind()
            else:
                self.aborts += 1
            raise
        self.tracker.committed(offsets)
        self.commits += 1
        return offsets

    def _rewind(self) -> None:
        self.aborts += 1
        partitions = sorted(self.owned())
        try:
            self.source.rewind(partitions)
        except (KafkaTransient, BrokerUnavailable) as exc:   # polling on would skip the aborted unit
            raise KafkaPermanent(f"rewinding after an aborted transaction failed ({exc}); exiting so a restart "
                                 f"resumes from the committed offsets") from exc
        self.tracker.forget(partitions)
        log.warning("transaction aborted; %s rewound to their last committed offsets, their work will be redone",
                    show(partitions))

    def end_for_revocation(self, drained: bool) -> dict[Partition, int]:
        """Before partitions go: commit the open transaction if its work is all published, else abort it
        (what was consumed since the last commit is redelivered to the partitions' next owner)."""
        with self._lock:
            if drained:
                try:   # no rewind: the partitions are leaving; their next owner starts from the committed offsets
                    return self._commit_idle(rewind=False)
                except (KafkaTransient, BrokerUnavailable) as exc:
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
