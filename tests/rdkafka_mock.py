"""librdkafka's own mock Kafka cluster (``rd_kafka_mock_*``, exported by the librdkafka that confluent-kafka
ships), reached through ctypes. Unlike tansu it behaves as Kafka does where the tests need it to: it accepts
the epoch bump (KIP-360) librdkafka makes after a refused batch, and it answers the next requests of a kind
with errors a test pushes, after a round trip a test sets, or not at all while a test holds it down.

Observed with librdkafka 2.16.0 (confluent-kafka 2.16.2): it checks idempotent sequence numbers only for
transactional producers (a Kafka broker refuses a batch sent behind a refused one out of sequence; tests
push that answer themselves); it refuses offset commits during a rebalance, where Kafka accepts them; it
has no controller, so it cannot create topics (:meth:`MockCluster.create_topic` makes them); kafka-python
cannot decode its answers (read with :meth:`MockCluster.values`).
"""
from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# the Kafka protocol's ApiKeys of the requests tests make fail
PRODUCE = 0
OFFSET_COMMIT = 8
INIT_PRODUCER_ID = 22
ADD_PARTITIONS_TO_TXN = 24

_VOID, _INT, _I16, _I32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int16, ctypes.c_int32
_SIGNATURES = {   # name: (result, arguments)
    "rd_kafka_conf_new": (_VOID, []),
    "rd_kafka_conf_set": (_INT, [_VOID, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]),
    "rd_kafka_new": (_VOID, [_INT, _VOID, ctypes.c_char_p, ctypes.c_size_t]),
    "rd_kafka_destroy": (None, [_VOID]),
    "rd_kafka_mock_cluster_new": (_VOID, [_VOID, _INT]),
    "rd_kafka_mock_cluster_destroy": (None, [_VOID]),
    "rd_kafka_mock_cluster_bootstraps": (ctypes.c_char_p, [_VOID]),
    "rd_kafka_mock_topic_create": (_INT, [_VOID, ctypes.c_char_p, _INT, _INT]),
    "rd_kafka_mock_broker_set_down": (_INT, [_VOID, _I32]),
    "rd_kafka_mock_broker_set_up": (_INT, [_VOID, _I32]),
    "rd_kafka_mock_broker_set_rtt": (_INT, [_VOID, _I32, _INT]),
    "rd_kafka_mock_push_request_errors_array": (None, [_VOID, _I16, ctypes.c_size_t, ctypes.POINTER(_INT)]),
    "rd_kafka_mock_clear_request_errors": (None, [_VOID, _I16]),
}


@functools.cache
def _library() -> ctypes.CDLL:
    """confluent-kafka's extension module, whose symbol lookup reaches the librdkafka it was built with (the
    wheel's own copy), with the mock functions typed; the test is skipped where they are missing."""
    from confluent_kafka import cimpl
    lib = ctypes.CDLL(cimpl.__file__)
    for name, (result, arguments) in _SIGNATURES.items():
        try:
            function = getattr(lib, name)
        except AttributeError:
            pytest.skip(f"this librdkafka has no {name}: no mock cluster")
        function.restype, function.argtypes = result, arguments
    return lib


def _checked(code: int, what: str) -> None:
    if code:
        raise RuntimeError(f"librdkafka's mock cluster: {what} failed with error {code}")


class MockCluster:
    """One mock broker (id 1) on a localhost port; ``bootstrap`` is its address."""

    def __init__(self, lib: ctypes.CDLL, cluster: int) -> None:
        self._lib, self._cluster = lib, cluster
        self.bootstrap: str = lib.rd_kafka_mock_cluster_bootstraps(cluster).decode()

    def create_topic(self, name: str, partitions: int = 1) -> None:
        _checked(self._lib.rd_kafka_mock_topic_create(self._cluster, name.encode(), partitions, 1),
                 f"creating {name}")

    def set_rtt(self, rtt_ms: int) -> None:
        """Answer every request ``rtt_ms`` late, so that several can be in flight at once."""
        _checked(self._lib.rd_kafka_mock_broker_set_rtt(self._cluster, 1, rtt_ms), "setting the round trip")

    def set_down(self, down: bool) -> None:
        """Take the broker down (its connections closed, new ones refused) or bring it back up."""
        setter = self._lib.rd_kafka_mock_broker_set_down if down else self._lib.rd_kafka_mock_broker_set_up
        _checked(setter(self._cluster, 1), "taking the broker down" if down else "bringing the broker up")

    def fail_next(self, api_key: int, *codes: int) -> None:
        """Answer the next ``len(codes)`` requests of ``api_key`` with these error codes, in turn."""
        array = (ctypes.c_int * len(codes))(*codes)
        self._lib.rd_kafka_mock_push_request_errors_array(self._cluster, api_key, len(codes), array)

    def clear_errors(self, api_key: int) -> None:
        """Drop the errors pushed for ``api_key`` that no request has met yet."""
        self._lib.rd_kafka_mock_clear_request_errors(self._cluster, api_key)

    def values(self, topic: str, expected: int, timeout_s: float = 30.0) -> list[bytes]:
        """The values in partition 0 of ``topic``, from the start, waiting until at least ``expected`` (read with
        librdkafka: kafka-python cannot decode the mock's answers)."""
        from confluent_kafka import Consumer, TopicPartition
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "reader", "enable.auto.commit": False})
        try:
            consumer.assign([TopicPartition(topic, 0, 0)])
            values: list[bytes] = []
            deadline = time.monotonic() + timeout_s
            while len(values) < expected and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is not None and not message.error():
                    values.append(message.value())
            return values
        finally:
            consumer.close()


@contextmanager
def mock_cluster() -> Iterator[MockCluster]:
    """A mock cluster of one broker, owned by a client of its own (no bootstrap: it talks to no broker)."""
    lib = _library()
    errstr = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    _checked(lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, len(errstr)), "quieting its client")
    handle = lib.rd_kafka_new(0, conf, errstr, len(errstr))   # 0: a producer; it owns conf from here
    if not handle:
        raise RuntimeError(f"librdkafka's mock cluster: rd_kafka_new: {errstr.value.decode()}")
    cluster = lib.rd_kafka_mock_cluster_new(handle, 1)
    try:
        if not cluster:
            raise RuntimeError("librdkafka's mock cluster: rd_kafka_mock_cluster_new failed")
        yield MockCluster(lib, cluster)
    finally:
        if cluster:
            lib.rd_kafka_mock_cluster_destroy(cluster)
        lib.rd_kafka_destroy(handle)
