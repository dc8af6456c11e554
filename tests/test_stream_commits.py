"""The bookkeeping of commits sent without waiting for their answer (stream/commits.py)."""
from __future__ import annotations

from stream.commits import UnansweredCommits

A, B = ("in", 0), ("in", 1)


def test_offsets_stay_until_a_commit_that_covers_them_is_accepted():
    commits = UnansweredCommits()
    commits.sent({A: 5, B: 3})
    commits.accepted({A: 4})   # an earlier commit's answer does not cover 5
    assert commits.with_unanswered({}) == {A: 5, B: 3}
    commits.accepted({A: 5})
    assert commits.with_unanswered({B: 7}) == {B: 7}, "the higher offset of the two wins"
    assert commits.with_unanswered({B: 2}) == {B: 3}, "never a lower offset than one already sent"


def test_an_error_is_taken_once_and_is_over_once_everything_sent_is_accepted():
    commits = UnansweredCommits()
    commits.sent({A: 5})
    commits.failed(RuntimeError("refused"))
    error = commits.take_error()
    assert isinstance(error, RuntimeError) and commits.take_error() is None
    commits.failed(RuntimeError("refused again"))
    commits.accepted({A: 9})
    assert commits.take_error() is None and commits.with_unanswered({}) == {}


def test_partitions_no_longer_owned_are_never_committed_again():
    commits = UnansweredCommits()
    commits.sent({A: 5, B: 3})
    commits.drop([A])
    assert commits.with_unanswered({}) == {B: 3}
