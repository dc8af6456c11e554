"""The Kafka branch of the error tree: every client error classified on purpose, and mapped in one place."""
from __future__ import annotations

import inspect

import kafka.errors
import pytest

from engine_build.errors import ConfigError, SentimentError, UserError
from stream import errors
from stream.errors import BrokerUnavailable, KafkaPermanent, KafkaTransient, kafka_errors
from stream.kafka_sink import refused_for_good, retriable

PROJECT = {errors.OUTAGE: BrokerUnavailable, errors.TRANSIENT: KafkaTransient,
           errors.PERMANENT: KafkaPermanent, errors.REFUSED: KafkaPermanent}
KINDS = set(PROJECT)


def kafka_python_classes() -> dict[str, type[BaseException]]:
    """Every exception class kafka-python defines in kafka.errors, by name (aliases once)."""
    return {c.__name__: c for c in vars(kafka.errors).values()
            if inspect.isclass(c) and issubclass(c, BaseException) and c.__module__ == "kafka.errors"}


def test_every_kafka_python_exception_class_is_classified():
    classes = kafka_python_classes()
    assert len(classes) > 100   # the enumeration found the module's classes, not nothing
    assert sorted(set(classes) - set(errors.KAFKA_PYTHON)) == [], "classify these in stream.errors.KAFKA_PYTHON"
    assert sorted(set(errors.KAFKA_PYTHON) - set(classes)) == [], "kafka-python has no such class"
    assert set(errors.KAFKA_PYTHON.values()) == KINDS


@pytest.mark.parametrize("name", sorted(kafka_python_classes()))
def test_each_kafka_python_exception_becomes_the_project_error_of_its_kind(name):
    exc = kafka_python_classes()[name]("from the test")
    kind = errors.KAFKA_PYTHON[name]
    assert errors.kafka_python_kind(exc) == kind
    ours = errors.translate(exc, "consuming in[0]", "g")
    assert type(ours) is PROJECT[kind]
    assert str(ours).startswith("consuming in[0]: ") and "from the test" in str(ours) and "\n" not in str(ours)
    assert refused_for_good(exc) is (kind == errors.REFUSED)


@pytest.mark.parametrize("name, kind", [
    ("KafkaConnectionError", errors.OUTAGE), ("KafkaTimeoutError", errors.OUTAGE),
    ("NodeNotReadyError", errors.OUTAGE), ("CoordinatorNotAvailableError", errors.OUTAGE),
    ("RequestTimedOutError", errors.OUTAGE), ("NotLeaderForPartitionError", errors.OUTAGE),
    ("RebalanceInProgressError", errors.TRANSIENT), ("UnknownMemberIdError", errors.TRANSIENT),
    ("IllegalGenerationError", errors.TRANSIENT), ("CommitFailedError", errors.TRANSIENT),
    ("UnknownTopicOrPartitionError", errors.TRANSIENT), ("KafkaError", errors.TRANSIENT),
    ("UnsupportedCodecError", errors.PERMANENT), ("CorruptRecordError", errors.PERMANENT),
    ("GroupAuthorizationFailedError", errors.PERMANENT), ("SaslAuthenticationFailedError", errors.PERMANENT),
    ("ProducerFencedError", errors.PERMANENT), ("UnsupportedVersionError", errors.PERMANENT),
    ("InvalidRecordError", errors.REFUSED), ("MessageSizeTooLargeError", errors.REFUSED),
    ("TopicAuthorizationFailedError", errors.PERMANENT), ("PolicyViolationError", errors.REFUSED),
])
def test_a_sample_of_each_kind_is_classified_as_the_service_relies_on(name, kind):
    assert errors.KAFKA_PYTHON[name] == kind


def test_the_table_agrees_with_kafka_pythons_own_retriable_flag():
    """What kafka-python retries itself is never a refusal or permanent; the sink's resend decision
    (:func:`stream.kafka_sink.retriable`) follows that flag and the table's outages."""
    for name, cls in kafka_python_classes().items():
        if getattr(cls, "retriable", False):
            assert errors.KAFKA_PYTHON[name] in (errors.OUTAGE, errors.TRANSIENT), name
        exc = cls("x")
        assert retriable(exc) is (bool(cls.retriable) or errors.KAFKA_PYTHON[name] == errors.OUTAGE), name
        if errors.KAFKA_PYTHON[name] in (errors.REFUSED, errors.PERMANENT):
            assert not retriable(exc), name


def test_a_subclass_nobody_listed_takes_its_nearest_listed_base():
    class Newer(kafka.errors.NotCoordinatorError):
        pass
    assert errors.kafka_python_kind(Newer()) == errors.OUTAGE


@pytest.mark.parametrize("exc, advice", [
    (kafka.errors.UnsupportedCodecError("lz4"), "pip install lz4 zstandard python-snappy"),
    (kafka.errors.CorruptRecordError("crc"), "move the group 'g' past it"),
    (kafka.errors.GroupAuthorizationFailedError("g"), "grant READ on the input topics and group 'g'"),
    (kafka.errors.TopicAuthorizationFailedError("t"), "WRITE on the output and dead-letter topics"),
])
def test_permanent_errors_say_what_to_do(exc, advice):
    ours = errors.translate(exc, "consuming in[0]", "g")
    assert isinstance(ours, KafkaPermanent) and isinstance(ours, UserError) and advice in str(ours)


def test_kafka_errors_raises_the_project_error_from_the_clients():
    with pytest.raises(BrokerUnavailable, match="committing offsets: KafkaConnectionError") as raised:
        with kafka_errors("committing offsets", group="g"):
            raise kafka.errors.KafkaConnectionError("gone")
    assert isinstance(raised.value.__cause__, kafka.errors.KafkaConnectionError)


def test_kafka_errors_leaves_the_projects_own_and_unrelated_errors_alone():
    for exc in (ConfigError("bad flag"), KafkaPermanent("fenced"), KafkaTransient("again")):
        with pytest.raises(type(exc)) as raised, kafka_errors("consuming"):
            raise exc
        assert raised.value is exc
    with pytest.raises(ValueError), kafka_errors("consuming"):
        raise ValueError("a bug keeps its traceback")


def test_kafka_errors_translates_other_types_only_when_asked_and_works_out_what_only_on_failure():
    asked: list[str] = []

    def what() -> str:
        asked.append("asked")
        return "consuming in[1]"
    with kafka_errors(what, also=(ValueError,)):
        pass
    assert asked == []
    with pytest.raises(KafkaTransient, match=r"consuming in\[1\]: ValueError: no"):
        with kafka_errors(what, also=(ValueError,)):
            raise ValueError("no")
    assert asked == ["asked"]


def test_every_project_kafka_error_is_in_the_one_tree():
    for cls in (BrokerUnavailable, KafkaTransient, KafkaPermanent):
        assert issubclass(cls, SentimentError)


# ---- librdkafka ----
def librdkafka_codes() -> dict[str, int]:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    error = confluent_kafka.KafkaError
    return {n: getattr(error, n) for n in dir(error)
            if n.lstrip("_")[:1].isupper() and n.lstrip("_").replace("_", "").isupper()
            and isinstance(getattr(error, n), int)}


def test_every_broker_code_has_the_same_kind_in_both_clients():
    """librdkafka's positive codes are the Kafka protocol's error numbers, kafka-python's ``errno``: for
    each kafka-python class with one, librdkafka's error of that number (not fatal: librdkafka's own
    verdict is apart) classifies to the same kind, but for the differences listed with their reason."""
    from confluent_kafka import KafkaError, KafkaException
    names = {code: name for name, code in librdkafka_codes().items() if code > 0}
    numbered = {name: cls.errno for name, cls in kafka_python_classes().items()
                if isinstance(getattr(cls, "errno", None), int) and cls.errno > 0}
    assert len(numbered) > 100 and numbered["InvalidSessionTimeoutError"] == KafkaError.INVALID_SESSION_TIMEOUT
    differ = []
    for name, errno in sorted(numbered.items()):
        error = KafkaError(errno, "from the test")
        kind, theirs = errors.librdkafka_kind(error), errors.KAFKA_PYTHON[name]
        if kind != theirs:
            differ.append(names.get(errno, str(errno)))
            assert names.get(errno) in errors.LIBRDKAFKA_DIFFERS, f"{name} is {theirs}, librdkafka's {errno} {kind}"
        assert type(errors.translate(KafkaException(error), "consuming", "g")) is PROJECT[kind], name
    assert sorted(errors.LIBRDKAFKA_DIFFERS) == sorted(differ), "a listed difference that is none"
    assert all(reason.strip() and "\n" not in reason for reason in errors.LIBRDKAFKA_DIFFERS.values())



def test_the_stop_line_for_an_acl_names_the_topics_the_error_names():
    """In a transaction one topic's ACL fails every record in it: kafka-python's error names the refused
    topics, and the advice grants on those, not on the topic of the record that carried it."""
    import kafka.errors
    line = str(errors.publish_failure(kafka.errors.TopicAuthorizationFailedError({"dlq", "audit"}), "out", False))
    assert "grant this service's principal WRITE on audit, dlq;" in line and line.startswith("publishing to out")
    line = str(errors.publish_failure(kafka.errors.TopicAuthorizationFailedError("out"), "out", False))
    assert "WRITE on out;" in line and "\n" not in line
