"""librdkafka's own mock Kafka cluster (``rd_kafka_mock_*``, exported by the librdkafka that confluent-kafka
ships), reached through ctypes. Unlike tansu it behaves as Kafka does where the tests need it to: it checks
idempotent producers' sequence numbers and accepts the epoch bump (KIP-360) librdkafka makes after a refused
batch, and it answers the next requests of a kind with errors a test pushes, after a round trip a test sets.
"""
from __future__ import annotations

import ctypes
import glob
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

PRODUCE = 0   # the Kafka protocol's ApiKey of a Produce request


def _library() -> ctypes.CDLL:
    import confluent_kafka
    folder = os.path.join(os.path.dirname(os.path.dirname(confluent_kafka.__file__)), "confluent_kafka.libs")
    found = sorted(glob.glob(os.path.join(folder, "librdkafka*.so*")))
    lib = ctypes.CDLL(found[0] if found else "librdkafka.so.1")
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
    lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_topic_create.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    lib.rd_kafka_mock_broker_set_down.argtypes = lib.rd_kafka_mock_broker_set_up.argtypes = [ctypes.c_void_p,
                                                                                             ctypes.c_int32]
    lib.rd_kafka_mock_broker_set_rtt.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int]
    lib.rd_kafka_mock_push_request_errors_array.argtypes = [ctypes.c_void_p, ctypes.c_int16, ctypes.c_size_t,
                                                            ctypes.POINTER(ctypes.c_int)]
    return lib


class MockCluster:
    """One mock broker (id 1) on a localhost port; ``bootstrap`` is its address."""

    def __init__(self, lib: ctypes.CDLL, handle: int, cluster: int) -> None:
        self._lib, self._handle, self._cluster = lib, handle, cluster
        self.bootstrap: str = lib.rd_kafka_mock_cluster_bootstraps(cluster).decode()

    def create_topic(self, name: str, partitions: int = 1) -> None:
        self._lib.rd_kafka_mock_topic_create(self._cluster, name.encode(), partitions, 1)

    def set_rtt(self, rtt_ms: int) -> None:
        """Answer every request ``rtt_ms`` late, so that several can be in flight at once."""
        self._lib.rd_kafka_mock_broker_set_rtt(self._cluster, 1, rtt_ms)

    def set_down(self, down: bool) -> None:
        """Take the broker down (its connections closed, new ones refused) or bring it back up."""
        (self._lib.rd_kafka_mock_broker_set_down if down else self._lib.rd_kafka_mock_broker_set_up)(self._cluster, 1)

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

    def fail_next(self, api_key: int, *codes: int) -> None:
        """Answer the next ``len(codes)`` requests of ``api_key`` with these error codes, in turn."""
        array = (ctypes.c_int * len(codes))(*codes)
        self._lib.rd_kafka_mock_push_request_errors_array(self._cluster, api_key, len(codes), array)


@contextmanager
def mock_cluster() -> Iterator[MockCluster]:
    lib = _library()
    errstr = ctypes.create_string_buffer(512)
    handle = lib.rd_kafka_new(0, lib.rd_kafka_conf_new(), errstr, len(errstr))   # 0: a producer
    if not handle:
        raise RuntimeError(f"rd_kafka_new: {errstr.value.decode()}")
    cluster = lib.rd_kafka_mock_cluster_new(handle, 1)
    try:
        yield MockCluster(lib, handle, cluster)
    finally:
        lib.rd_kafka_mock_cluster_destroy(cluster)
        lib.rd_kafka_destroy(handle)
