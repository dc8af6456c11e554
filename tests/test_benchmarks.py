"""The benchmarks that need no broker still run (their numbers are read by people, never asserted)."""
from __future__ import annotations

import re

import pytest

import stream.pipeline
from benchmarks import processor_overhead


def test_processor_overhead_runs_and_every_message_is_acknowledged(capsys: pytest.CaptureFixture[str]) -> None:
    decode_before = stream.pipeline.decode
    # one_run raises if any message is never acknowledged or a thread does not stop; 1,500 messages
    # run into the 512 pause mark more than once
    assert processor_overhead.main(["--messages", "1500", "--runs", "2"]) == 0
    line = capsys.readouterr().out
    assert re.match(r"processor overhead: \d+\.\d us of CPU a message", line), line
    assert stream.pipeline.decode is decode_before   # the stub decoder does not leak into later tests
