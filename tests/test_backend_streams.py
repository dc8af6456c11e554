"""Backend streams: parallel callers, the handle pool, thread sharing and pinning, refilled input arrays."""
from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from engine_build.errors import BackendClosed, ConfigError
from engine_build.runtime import open_backend
from engine_build.runtime.base import Slots
from engine_build.runtime.cpu import usable_cores

from .waiting import wait_until


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_streams_serve_parallel_callers_with_the_single_call_results(small_artifact, photos, runtime):
    from concurrent.futures import ThreadPoolExecutor
    with open_backend(runtime, small_artifact / "model.onnx", "fp32", exact=True) as one:
        expected = one.infer(photos).probs
        assert one.concurrency == 1
    with open_backend(runtime, small_artifact / "model.onnx", "fp32", exact=True, streams=2) as two, \
            ThreadPoolExecutor(4) as pool:        # more callers than streams: the others wait their turn
        assert two.concurrency == 2
        parts = list(pool.map(lambda i: two.infer(photos[i:i + 1]).probs, range(len(photos))))
    np.testing.assert_allclose(np.concatenate(parts), expected, atol=1e-5)
    with open_backend(runtime, small_artifact / "model.onnx", "fp32", exact=True, streams=0) as chosen:
        assert chosen.concurrency >= 1       # the runtime's own choice for this machine
        np.testing.assert_allclose(chosen.infer(photos).probs, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="streams must be 0"):
        open_backend(runtime, small_artifact / "model.onnx", "fp32", streams=-1)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_an_input_array_refilled_between_calls_gives_each_call_its_own_results(small_artifact, photos, runtime):
    """The service refills one array per inference thread; a runtime that read it in place (OpenVINO's
    shared inputs) must be done with it when the call returns."""
    with open_backend(runtime, small_artifact / "model.onnx", "fp32", exact=True) as backend:
        expected = [backend.infer(photos[i:i + 2].copy()).probs for i in (0, 2)]
        array = np.empty_like(photos[:2])
        array[:] = photos[0:2]
        first = backend.infer(array)
        kept = first.probs.copy()
        array[:] = photos[2:4]
        second = backend.infer(array)
        np.testing.assert_allclose(first.probs, expected[0], atol=1e-6)    # not changed by the second call
        np.testing.assert_allclose(first.probs, kept)
        np.testing.assert_allclose(second.probs, expected[1], atol=1e-6)


def test_onnx_runtime_runs_no_more_streams_than_inference_threads_and_says_why(small_artifact):
    """Before: 8 streams asked with 2 threads made 8 one-thread sessions, 8 threads in all, and the
    automatic choice ignored --inference-threads."""
    path = small_artifact / "model.onnx"

    def threads(backend) -> int:
        return sum(s.get_session_options().intra_op_num_threads for s in backend._sessions._idle)
    with open_backend("onnxruntime", path, "fp32", threads=2, streams=8) as capped:
        assert (capped.concurrency, threads(capped)) == (2, 2)
        assert capped.streams_note == "asked 8; ONNX Runtime gives each stream a thread of its own, and 2 threads " \
                                      "allow 2"
    with open_backend("onnxruntime", path, "fp32", threads=1, streams=0) as auto:
        assert (auto.concurrency, threads(auto), auto.streams_note) == (1, 1, "")   # its own choice, within 1
        assert auto.threads == 1
    with open_backend("onnxruntime", path, "fp32", streams=1) as default:
        # one session on ONNX Runtime's own count (0), which it does not say and which need not be the usable
        # cores (it counted 2 under taskset -c 0): the start-up line says nothing rather than a wrong count
        assert (threads(default), default.threads) == (0, 0)
    cores = usable_cores()
    with open_backend("onnxruntime", path, "fp32", streams=cores + 1) as every_core:   # threads: every core
        assert every_core.concurrency == cores and every_core.streams_note.startswith(f"asked {cores + 1}; ")


def test_openvino_streams_below_those_asked_say_what_it_allowed(small_artifact):
    """Before: OpenVINO's cap on 64 streams asked was said nowhere; the start-up line credited the flag."""
    with open_backend("openvino", small_artifact / "model.onnx", "fp32", exact=True, streams=64,
                      latency_lane=False) as backend:
        assert backend.concurrency < 64
        assert re.fullmatch(rf"asked 64; OpenVINO allows {backend.concurrency} with \d+ threads?",
                            backend.streams_note), backend.streams_note
    with open_backend("openvino", small_artifact / "model.onnx", "fp32", exact=True, streams=1) as one:
        assert one.streams_note == ""


def test_threads_are_shared_out_between_streams():
    from engine_build.runtime.base import split_threads
    assert split_threads(8, 4) == [2, 2, 2, 2]
    assert split_threads(5, 2) == [3, 2]
    assert split_threads(1, 3) == [1, 1, 1]     # at least one each


def test_the_handle_pool_waits_for_a_free_handle_and_close_frees_every_one():
    freed: list[str] = []
    slots = Slots(["a", "b"], freed.append)
    outcome: dict[str, object] = {}
    release = threading.Event()

    def borrow(name: str) -> None:
        try:
            with slots.use() as handle:
                outcome[name] = handle
                release.wait(10)
        except BackendClosed as exc:
            outcome[name] = exc

    def started(name: str) -> threading.Thread:
        thread = threading.Thread(target=borrow, args=(name,), daemon=True)
        thread.start()
        return thread
    try:
        first, second = started("first"), started("second")
        deadline = time.monotonic() + 10
        while len(outcome) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert set(outcome) == {"first", "second"}
        waiter = started("third")           # both handles are out: this one waits
        time.sleep(0.05)
        assert "third" not in outcome
        closer = threading.Thread(target=slots.close, daemon=True)
        closer.start()
        waiter.join(5)
        assert isinstance(outcome["third"], BackendClosed)   # woken by close, not served
        assert freed == []                  # the borrowed ones are freed when they come back
    finally:
        release.set()
    for thread in (first, second, closer):
        thread.join(5)
    assert sorted(freed) == ["a", "b"] and {outcome["first"], outcome["second"]} == {"a", "b"}


def test_a_handle_that_fails_to_free_neither_stops_the_others_nor_strands_close():
    freed: list[str] = []

    def free(handle: str) -> None:
        if handle == "bad":
            raise RuntimeError("cannot free")
        freed.append(handle)
    slots = Slots(["bad", "good"], free)
    with pytest.raises(RuntimeError):
        slots.close(timeout=1)
    assert freed == ["good"]                # freed past the failing one
    out = Slots(["bad"], free)
    closer = threading.Thread(target=out.close, kwargs={"timeout": 30}, daemon=True)
    with pytest.raises(RuntimeError), out.use():
        closer.start()
        time.sleep(0.05)                    # close is waiting for this handle
    started = time.monotonic()
    closer.join(5)
    assert not closer.is_alive() and time.monotonic() - started < 1   # woken, not left to its 30 s


def test_the_handle_pool_frees_what_it_made_when_making_one_fails():
    freed: list[int] = []

    def handles():
        yield 1
        yield 2
        raise MemoryError("the third one")
    with pytest.raises(MemoryError):
        Slots(handles(), freed.append)
    assert freed == [1, 2]


def test_close_reports_handles_still_out_after_its_timeout():
    slots = Slots([object()])
    with slots.use():
        assert slots.close(timeout=0.05) == 1


def test_the_lone_handle_serves_a_small_call_only_when_nothing_else_runs_and_holds_the_others_back():
    freed: list[str] = []
    slots = Slots(["a", "b"], freed.append, lone="lane")
    got: list[str] = []
    release = threading.Event()

    def hold_a_stream() -> None:
        with slots.use() as handle:
            got.append(handle)
            release.wait(10)
    waiter = threading.Thread(target=hold_a_stream, daemon=True)
    try:
        with slots.use(small=True) as handle:
            assert handle == "lane"                   # alone and small: every core
            waiter.start()
            wait_until(lambda: slots.waiting == 1, "a large caller waits behind the lane", timeout=10)
            assert got == []                          # the lane uses the streams' threads: they wait for it
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got and got[0] in ("a", "b")           # then a stream, held meanwhile
        with slots.use(small=True) as second:
            assert second in ("a", "b") and second != got[0]   # a stream is busy: a small call takes another
    finally:
        release.set()
    waiter.join(5)
    with slots.use() as big:
        assert big in ("a", "b")                      # nothing runs, but not small: never the lane
    slots.close(timeout=1)
    assert sorted(freed) == ["a", "b", "lane"]        # the lane freed with the idle ones


def test_a_lone_handle_out_at_close_is_freed_when_it_comes_back():
    freed: list[str] = []
    slots = Slots(["a"], freed.append, lone="lane")
    with slots.use(small=True) as handle:
        assert handle == "lane" and slots.close(timeout=0.05) == 1
        assert freed == ["a"]
    assert freed == ["a", "lane"] and not slots.has_lone


@pytest.mark.parametrize("worth_ms", [0.0, float("inf")])
def test_openvino_runs_lone_small_batches_on_the_lane_when_its_measured_worth_it(small_artifact, photos, worth_ms):
    """Whether the lane opens rests on a lone image's measured time on one stream; a small batch then
    runs on it, a larger one on a stream, and the answers are the streams' answers."""
    from engine_build.runtime.openvino_backend import OpenVinoBackend
    path = small_artifact / "model.onnx"
    with open_backend("openvino", path, "fp32", exact=True, streams=2, latency_lane=False) as plain:
        expected = plain.infer(photos).probs
        assert plain.lane_choice == "no latency lane (--no-latency-lane)" and not plain._requests.has_lone
    with OpenVinoBackend(path, "fp32", 4, exact=True, streams=2, lane_worth_ms=worth_ms) as backend:
        opened = worth_ms == 0.0
        assert backend._requests.has_lone is opened
        assert ("lone batches of <= 1 on all inference threads" in backend.lane_choice) is opened
        assert ("no latency lane" in backend.lane_choice) is not opened
        assert "ms on one stream" in backend.lane_choice and backend.lane_choice in backend.describe()
        calls = backend._requests.lone_calls
        for i in range(3):
            np.testing.assert_allclose(backend.infer(photos[i:i + 1]).probs, expected[i:i + 1], atol=1e-5)
        assert backend._requests.lone_calls == calls + 3 * opened       # each small batch on the lane
        np.testing.assert_allclose(backend.infer(photos[:2]).probs, expected[:2], atol=1e-5)
        assert backend._requests.lone_calls == calls + 3 * opened       # a batch above a quarter: a stream




def test_a_small_caller_that_waited_behind_the_lone_handle_takes_a_stream():
    slots = Slots(["a", "b"], lone="lane")
    got: list[str] = []

    def small_call() -> None:
        with slots.use(small=True) as handle:
            got.append(handle)
    with slots.use(small=True) as handle:
        assert handle == "lane"
        caller = threading.Thread(target=small_call, daemon=True)
        caller.start()
        wait_until(lambda: slots.waiting == 1, "the small caller waits behind the lane", timeout=10)
    caller.join(5)
    assert got in (["a"], ["b"]) and slots.lone_calls == 1     # alone by then, but it waited: a stream


def test_a_caller_back_for_the_lone_handle_at_once_cannot_keep_a_waiting_one_out():
    """An inference thread making small calls back to back must not keep the other thread's batch waiting
    (the one that returns the lone handle takes the lock again before the woken waiter runs)."""
    slots = Slots(["a", "b"], lone="lane")
    lone_calls_when_served: list[int] = []

    def large_call() -> None:
        with slots.use():
            lone_calls_when_served.append(slots.lone_calls)
    waiter = threading.Thread(target=large_call, daemon=True)
    with slots.use(small=True):
        waiter.start()
        wait_until(lambda: slots.waiting == 1, "the large caller waits behind the lane", timeout=10)
    for _ in range(1000):                             # back for a small call at once, again and again
        if lone_calls_when_served:
            break
        with slots.use(small=True):
            pass
    waiter.join(5)
    assert lone_calls_when_served == [1]              # no lone call while it waited


def test_callers_that_waited_behind_the_lone_handle_spread_over_the_streams():
    """Small calls that overlap must not queue for the lone handle one by one (that is one stream)."""
    slots = Slots(["a", "b"], lone="lane")
    got: list[str] = []
    both_in = threading.Barrier(3, timeout=10)

    def small_call() -> None:
        with slots.use(small=True) as handle:
            got.append(handle)
            both_in.wait()                            # both must hold a handle at once
    with slots.use(small=True) as handle:
        assert handle == "lane"
        callers = [threading.Thread(target=small_call, daemon=True) for _ in range(2)]
        for caller in callers:
            caller.start()
        wait_until(lambda: slots.waiting == 2, "both wait behind the lane", timeout=10)
        assert got == []
    both_in.wait()
    for caller in callers:
        caller.join(5)
    assert sorted(got) == ["a", "b"] and slots.lone_calls == 1


def test_the_lone_handle_comes_back_after_a_failed_call_and_close_wakes_its_waiters():
    slots = Slots(["a"], lone="lane")
    with pytest.raises(RuntimeError), slots.use(small=True):
        raise RuntimeError("the runtime failed")
    outcome: list[object] = []

    def wait_for_a_handle() -> None:
        try:
            with slots.use() as handle:
                outcome.append(handle)
        except BackendClosed as exc:
            outcome.append(exc)
    with slots.use(small=True) as handle:
        assert handle == "lane"                       # back after the failure
        waiter = threading.Thread(target=wait_for_a_handle, daemon=True)
        waiter.start()
        wait_until(lambda: slots.waiting == 1, "a caller waits behind the lane", timeout=10)
        assert slots.close(timeout=0.05) == 1         # the lane is still out
        waiter.join(5)
        assert len(outcome) == 1 and isinstance(outcome[0], BackendClosed)


@pytest.mark.parametrize(("threads", "cores", "unpinned"), [
    (None, 4, False), (0, 4, False),     # the runtime's default: every core
    (1, 4, True), (3, 4, True),          # a share of the machine: sibling processes would pin the same cores
    (4, 4, False), (8, 4, False), (1, 1, False)])
def test_openvino_is_left_to_pin_only_threads_that_cover_every_core(threads, cores, unpinned):
    from engine_build.runtime.openvino_backend import leave_unpinned
    assert leave_unpinned(threads, cores) is unpinned


@pytest.mark.skipif(usable_cores() < 2, reason="needs a core left over")
def test_openvino_compiles_a_share_of_the_cores_unpinned_and_says_so(small_artifact):
    """The property OpenVINO compiled with, not the config asked for (on Linux it pins by default)."""
    with open_backend("openvino", small_artifact / "model.onnx", "fp32", threads=1) as share:
        assert share.pinned is False and "threads unpinned" in share.describe()
    with open_backend("openvino", small_artifact / "model.onnx", "fp32") as default, \
            open_backend("openvino", small_artifact / "model.onnx", "fp32", threads=usable_cores()) as every:
        assert every.pinned == default.pinned     # every core: OpenVINO's own choice stands


@pytest.mark.parametrize("lane", [True, False])
def test_the_service_config_reaches_the_backends_latency_lane(small_artifact, lane):
    from stream.app import open_model
    from stream.config import StreamConfig
    cfg = StreamConfig(bootstrap_servers="localhost:9092", input_topic=("in",), output_topic="out",
                       dead_letter_topic="dlq", artifact=small_artifact, backend="openvino", precision="fp32",
                       exact_precision=True, inference_streams=2, latency_lane=lane)
    _, _, backend = open_model(cfg)
    with backend:
        assert backend.concurrency == 2
        assert ("--no-latency-lane" in backend.lane_choice) is not lane    # else measured: "a lone image: ..."
        assert ("a lone image" in backend.lane_choice) is lane
