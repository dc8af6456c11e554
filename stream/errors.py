"""The Kafka branch of the project's one error tree, and the one place client errors are mapped into it.

    SentimentError (engine_build.errors)
    ├── UserError
    │   └── KafkaPermanent      a Kafka error that can never succeed (unsupported codec, authorisation,
    │                           corrupt batch, fenced producer); the service drains and exits
    ├── BrokerUnavailable       Kafka cannot be reached right now; the service retries and is not ready
    └── KafkaTransient          a Kafka client error worth retrying that is not an outage; retried with
                                backoff, fatal if it lasts past --fail-after-s

Both clients' errors are classified by one table each, every entry one of four kinds: OUTAGE
(:class:`BrokerUnavailable`), TRANSIENT (:class:`KafkaTransient`), PERMANENT (:class:`KafkaPermanent`)
and REFUSED: the broker refuses one record for good (the sink dead-letters its input; anywhere else
nothing can retry it, so it is a :class:`KafkaPermanent` too). :data:`KAFKA_PYTHON` names every
exception class of ``kafka.errors`` (a test fails when kafka-python grows one nobody classified);
:data:`LIBRDKAFKA` names the librdkafka codes the connector treats apart from its default (a fatal
error is PERMANENT, any other TRANSIENT); a broker code gets the kind of kafka-python's class of the same
number but where :data:`LIBRDKAFKA_DIFFERS` says why not. Call sites wrap client calls in :func:`kafka_errors`.
Neither client is imported here unless its exceptions are already about (``sys.modules``).
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from engine_build.errors import SentimentError, UserError


class BrokerUnavailable(SentimentError):
    """Kafka is unreachable; the service keeps retrying with backoff and reports not-ready."""


class KafkaTransient(SentimentError):
    """A Kafka client error worth retrying that is not an outage (the brokers answer)."""


class KafkaPermanent(UserError):
    """A Kafka client error that retrying cannot fix; the message says what to do."""


OUTAGE, TRANSIENT, PERMANENT, REFUSED = "outage", "transient", "permanent", "refused"

# kafka-python 3.0.12's exception classes (kafka.errors) by what they mean here. Every class is listed:
# a subclass of a listed one that is not (a newer kafka-python) takes its nearest listed base's kind.
KAFKA_PYTHON: dict[str, str] = {
    # the brokers do not answer, or not yet (a leader or coordinator being elected): retried without a limit
    **dict.fromkeys(("KafkaConnectionError", "KafkaTimeoutError", "NodeNotReadyError", "RequestTimedOutError",
                     "CoordinatorNotAvailableError", "NotCoordinatorError", "CoordinatorLoadInProgressError",
                     "BrokerNotAvailableError", "LeaderNotAvailableError", "NotLeaderForPartitionError",
                     "NetworkExceptionError"), OUTAGE),
    # one record the broker will never take, however often sent: the sink isolates it and dead-letters its input
    # (kafka-python's idempotent producer turns each fatal and fails every batch in flight with it)
    **dict.fromkeys(("InvalidRecordError", "MessageSizeTooLargeError", "RecordListTooLargeError",
                     "PolicyViolationError", "InvalidTimestampError"), REFUSED),
    # what only the operator can fix (credentials, ACLs, codecs, settings the broker rejects, a broker too
    # old) or what ends this producer for good (fenced): retrying cannot help. A topic's ACL refuses every
    # record sent there, not one: publishing stops the member rather than dead-letter every input
    **dict.fromkeys(("UnsupportedCodecError", "CorruptRecordError", "AuthorizationError",
                     "TopicAuthorizationFailedError",
                     "GroupAuthorizationFailedError", "ClusterAuthorizationFailedError",
                     "TransactionalIdAuthorizationFailedError", "DelegationTokenAuthorizationFailedError",
                     "SaslAuthenticationFailedError", "UnsupportedSaslMechanismError", "IllegalSaslStateError",
                     "UnacceptableCredentialError", "SecurityDisabledError", "InvalidPrincipalTypeError",
                     "DelegationTokenAuthDisabledError", "DelegationTokenNotFoundError",
                     "DelegationTokenOwnerMismatchError", "DelegationTokenRequestNotAllowedError",
                     "DelegationTokenExpiredError", "UnsupportedVersionError", "IncompatibleBrokerVersion",
                     "UnrecognizedBrokerVersion", "UnsupportedForMessageFormatError",
                     "UnsupportedCompressionTypeError", "InvalidTopicError", "KafkaConfigurationError",
                     "IllegalArgumentError", "InvalidRequestError", "InvalidRequiredAcksError",
                     "InvalidSessionTimeoutError", "InvalidGroupIdError", "InconsistentGroupProtocolError",
                     "GroupMaxSizeReachedError", "UnsupportedAssignorError", "InvalidTransactionTimeoutError",
                     "ProducerFencedError", "InvalidProducerEpochError", "TransactionCoordinatorFencedError",
                     "FencedInstanceIdError", "InvalidConfigurationError", "InvalidPartitionsError",
                     "InvalidReplicationFactorError", "InvalidReplicationAssignmentError",
                     "TopicDeletionDisabledError"), PERMANENT),
    # anything else passes: rebalances, stale metadata, replication lagging, a transaction's state, the
    # client's own bookkeeping, and the broker codes of features this service never uses
    **dict.fromkeys((
        "KafkaError", "RetriableError", "InvalidMetadataError", "Cancelled", "CommitFailedError",
        "IllegalStateError", "KafkaProtocolError", "CorrelationIdError", "InvalidReceiveError",
        "MetadataEmptyBrokerList", "NoOffsetForPartitionError", "LogTruncationError", "UnknownBrokerIdError",
        "QuotaViolationError", "StaleMetadata", "TooManyInFlightRequests", "TransactionAbortedError",
        "BrokerResponseError", "NoError", "UnknownError", "OffsetOutOfRangeError", "UnknownTopicOrPartitionError",
        "InvalidFetchRequestError", "ReplicaNotAvailableError", "StaleControllerEpochError",
        "OffsetMetadataTooLargeError", "NotEnoughReplicasError", "NotEnoughReplicasAfterAppendError",
        "IllegalGenerationError", "UnknownMemberIdError", "RebalanceInProgressError", "InvalidCommitOffsetSizeError",
        "TopicAlreadyExistsError", "NotControllerError", "OutOfOrderSequenceNumberError",
        "DuplicateSequenceNumberError", "InvalidTxnStateError", "InvalidProducerIdMappingError",
        "ConcurrentTransactionsError", "OperationNotAttemptedError", "KafkaStorageError", "LogDirNotFoundError",
        "UnknownProducerIdError", "ReassignmentInProgressError", "NonEmptyGroupError", "GroupIdNotFoundError",
        "FetchSessionIdNotFoundError", "InvalidFetchSessionEpochError", "ListenerNotFoundError",
        "FencedLeaderEpochError", "UnknownLeaderEpochError", "StaleBrokerEpochError", "OffsetNotAvailableError",
        "MemberIdRequiredError", "PreferredLeaderNotAvailableError", "EligibleLeadersNotAvailableError",
        "ElectionNotNeededError", "NoReassignmentInProgressError", "GroupSubscribedToTopicError",
        "UnstableOffsetCommitError", "ThrottlingQuotaExceededError", "ResourceNotFoundError",
        "DuplicateResourceError", "InconsistentVoterSetError", "InvalidUpdateVersionError",
        "FeatureUpdateFailedError", "PrincipalDeserializationFailureError", "SnapshotNotFoundError",
        "PositionOutOfRangeError", "UnknownTopicIdError", "DuplicateBrokerRegistrationError",
        "BrokerIdNotRegisteredError", "InconsistentTopicIdError", "InconsistentClusterIdError",
        "TransactionalIdNotFoundError", "FetchSessionTopicIdError", "IneligibleReplicaError",
        "NewLeaderElectedError", "OffsetMovedToTieredStorageError", "FencedMemberEpochError",
        "UnreleasedInstanceIdError", "StaleMemberEpochError", "MismatchedEndpointTypeError",
        "UnsupportedEndpointTypeError", "UnknownControllerIdError", "UnknownSubscriptionIdError",
        "TelemetryTooLargeError", "InvalidRegistrationError", "TransactionAbortableError",
        "InvalidRecordStateError", "ShareSessionNotFoundError", "InvalidShareSessionEpochError",
        "FencedStateEpochError", "InvalidVoterKeyError", "DuplicateVoterError", "VoterNotFoundError"), TRANSIENT),
}

# librdkafka's error codes (KafkaError.<NAME>) that the connector treats apart from the default: a fatal
# error (librdkafka's own verdict: the client can do no more) is PERMANENT, any other TRANSIENT. librdkafka's
# positive codes are the Kafka protocol's error numbers, the ones kafka-python's classes carry as ``errno``:
# each takes the kind of its kafka-python class (a test checks every number), but for LIBRDKAFKA_DIFFERS.
LIBRDKAFKA: dict[str, str] = {
    **dict.fromkeys(("_TRANSPORT", "_ALL_BROKERS_DOWN", "_TIMED_OUT", "_MSG_TIMED_OUT", "_RESOLVE", "_WAIT_COORD",
                     "REQUEST_TIMED_OUT", "NETWORK_EXCEPTION", "COORDINATOR_NOT_AVAILABLE", "NOT_COORDINATOR",
                     "COORDINATOR_LOAD_IN_PROGRESS", "LEADER_NOT_AVAILABLE", "NOT_LEADER_FOR_PARTITION",
                     "BROKER_NOT_AVAILABLE", "_TIMED_OUT_QUEUE"), OUTAGE),
    # _INVALID_DIFFERENT_RECORD: the broker (Kafka >= 2.4) refused another record of the same batch; this one
    # shared its fate, and is found innocent when resent alone
    **dict.fromkeys(("MSG_SIZE_TOO_LARGE", "INVALID_RECORD", "POLICY_VIOLATION", "RECORD_LIST_TOO_LARGE",
                     "INVALID_TIMESTAMP", "_INVALID_ARG", "_INVALID_TYPE", "_INVALID_DIFFERENT_RECORD"), REFUSED),
    # the client's own verdicts: no broker code, nothing to agree with
    **dict.fromkeys(("_AUTHENTICATION", "_SSL", "_UNKNOWN_PROTOCOL", "_NOT_IMPLEMENTED", "_UNSUPPORTED_FEATURE",
                     "_BAD_COMPRESSION", "_BAD_MSG", "_FATAL", "_FENCED"), PERMANENT),
    # broker codes kafka-python calls permanent: a setting only the operator can fix (acks, timeouts, group,
    # assignor, credentials, ACLs, topic settings), a broker too old, or a producer or member fenced for good
    **dict.fromkeys(("INVALID_MSG", "SASL_AUTHENTICATION_FAILED", "GROUP_AUTHORIZATION_FAILED",
                     "CLUSTER_AUTHORIZATION_FAILED", "TRANSACTIONAL_ID_AUTHORIZATION_FAILED", "UNSUPPORTED_VERSION",
                     "UNSUPPORTED_SASL_MECHANISM", "ILLEGAL_SASL_STATE", "UNACCEPTABLE_CREDENTIAL",
                     "SECURITY_DISABLED", "INVALID_PRINCIPAL_TYPE", "DELEGATION_TOKEN_AUTH_DISABLED",
                     "DELEGATION_TOKEN_NOT_FOUND", "DELEGATION_TOKEN_OWNER_MISMATCH",
                     "DELEGATION_TOKEN_REQUEST_NOT_ALLOWED", "DELEGATION_TOKEN_AUTHORIZATION_FAILED",
                     "DELEGATION_TOKEN_EXPIRED", "TOPIC_EXCEPTION", "UNSUPPORTED_FOR_MESSAGE_FORMAT",
                     "UNSUPPORTED_COMPRESSION_TYPE", "INVALID_REQUIRED_ACKS", "INVALID_REQUEST", "INVALID_CONFIG",
                     "INVALID_SESSION_TIMEOUT", "INVALID_GROUP_ID", "INCONSISTENT_GROUP_PROTOCOL",
                     "GROUP_MAX_SIZE_REACHED", "UNSUPPORTED_ASSIGNOR", "INVALID_TRANSACTION_TIMEOUT",
                     "INVALID_PARTITIONS", "INVALID_REPLICATION_FACTOR", "INVALID_REPLICA_ASSIGNMENT",
                     "TOPIC_DELETION_DISABLED", "PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH",
                     "TRANSACTION_COORDINATOR_FENCED", "FENCED_INSTANCE_ID", "TOPIC_AUTHORIZATION_FAILED"), PERMANENT),
}
# Broker codes whose kind here differs from kafka-python's class of the same errno, each with why. None
# today: INVALID_MSG (CORRUPT_MESSAGE: a CRC failure or keyless records sent to a compacted topic) says
# nothing against one record's content and INVALID_MSG_SIZE is code 4, today the fetch-only INVALID_FETCH_SIZE,
# so neither is a refusal that would dead-letter inputs.
LIBRDKAFKA_DIFFERS: dict[str, str] = {}
_LIBRDKAFKA_ADVICE = {
    "_BAD_COMPRESSION": "records there are compressed with a codec this librdkafka cannot decode; install a "
                        "confluent-kafka wheel (it carries every codec) and restart",
    "_BAD_MSG": "a corrupt record batch the client cannot skip; move the group {group!r} past it "
                "(kafka-consumer-groups --reset-offsets) and restart",
    "SASL_AUTHENTICATION_FAILED": "check the credentials",
    "_AUTHENTICATION": "check the credentials",
    "GROUP_AUTHORIZATION_FAILED": "grant READ on the input topics and group {group!r}",
    "TOPIC_AUTHORIZATION_FAILED": "grant READ on the input topics and group {group!r}, WRITE on the output and "
                                  "dead-letter topics",
}


@contextmanager
def kafka_errors(what: str | Callable[[], str], group: str = "",
                 also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Raise a client error from the block as the project's own (``raise ... from`` the client's).

    ``what`` says what was being done (a callable: worked out only when an error comes); ``group``
    goes into the advice of authorisation and corrupt-batch errors; ``also``: other exception types
    to raise as :class:`KafkaTransient`. The project's own errors and anything else pass unchanged."""
    try:
        yield
    except SentimentError:
        raise
    except Exception as exc:
        ours = translate(exc, what() if callable(what) else what, group, also)
        if ours is None:
            raise
        raise ours from exc


def translate(exc: BaseException, what: str, group: str = "",
              also: tuple[type[BaseException], ...] = ()) -> SentimentError | None:
    """A client exception (either client's) as the project's own; None for one that is neither a client
    error nor one of ``also``."""
    if _is_kafka_python(exc):
        return _from_kafka_python(exc, what, group)
    error = librdkafka_error(exc)
    if error is not None:
        return _from_librdkafka(error, what, group)
    if isinstance(exc, also):
        return KafkaTransient(f"{what}: {_text(exc)}")
    return None


def kind(exc: Any) -> str | None:
    """What either client's exception (or librdkafka ``KafkaError``) means here (OUTAGE, TRANSIENT,
    PERMANENT or REFUSED); None for anything else."""
    if _is_kafka_python(exc):
        return kafka_python_kind(exc)
    error = librdkafka_error(exc)
    return None if error is None else librdkafka_kind(error)


def doomed_by(error: Any) -> SentimentError:
    """Why an open transaction cannot commit: a send in it failed with ``error`` (either client's). A
    fencing stops the member saying so (the abort would fail too, and say a restart fixes it); sends that
    timed out while the brokers were away keep it an outage (retried without a limit, not counted toward
    --fail-after-s); anything else is transient."""
    text = f"a send in the transaction failed: {error}"
    if fenced(error):
        return KafkaPermanent(f"{text}: this member's producer was fenced (another member took over its "
                              f"transactional id); stopping")
    return BrokerUnavailable(text) if kind(error) == OUTAGE else KafkaTransient(text)


# a producer ended by a newer one with its transactional id, or by its own epoch bump
_FENCED_KAFKA_PYTHON = ("ProducerFencedError", "InvalidProducerEpochError", "TransactionCoordinatorFencedError")
_FENCED_LIBRDKAFKA = ("PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH", "TRANSACTION_COORDINATOR_FENCED", "_FENCED")


def fenced(exc: Any) -> bool:
    """A producer ended by a newer one with its transactional id, or by its own epoch bump (the idempotent
    producer): PERMANENT, but neither one record's fault nor the operator's. Exactly once the commit point
    says so; at least once a new producer (or a record sent again alone) carries on."""
    error = librdkafka_error(exc)
    if error is not None:
        return librdkafka_name(error) in _FENCED_LIBRDKAFKA
    return _is_kafka_python(exc) and any(cls.__module__ == "kafka.errors" and cls.__name__ in _FENCED_KAFKA_PYTHON
                                         for cls in type(exc).__mro__)


def kafka_python_gave_up(exc: BaseException) -> bool:
    """kafka-python gave up on the record (its batch expired: ``delivery_timeout_ms``)."""
    return _is_kafka_python(exc) and type(exc).__name__ == "KafkaTimeoutError"


def kafka_python_cause(exc: BaseException) -> BaseException:
    """The broker error a plain kafka-python ``KafkaError`` wraps by its text ("Unexpected error in
    InitProducerIdResponse: [Error 31] ClusterAuthorizationFailedError", the idempotent producer's fatal
    error without the IdempotentWrite ACL), as its own class; ``exc`` itself otherwise."""
    if not _is_kafka_python(exc) or type(exc).__name__ != "KafkaError":
        return exc
    found = re.search(r"\[Error (-?\d+)\]", str(exc))
    if found is None:
        return exc
    from kafka.errors import for_code
    return for_code(int(found.group(1)))()


def publish_failure(exc: BaseException, topic: str, dead_letter: bool) -> KafkaPermanent:
    """Why a sink stops its member: the broker refused even a dead letter, or (``dead_letter`` False) an
    error only the operator can fix (PERMANENT), which dead-lettering the input would only repeat for
    every record. One line naming the error, with what to grant where it is an ACL (on the topics the
    error names, else on ``topic``: in a transaction one topic's refusal fails every record in it)."""
    what = f"cannot publish even a dead letter to {topic}" if dead_letter else f"publishing to {topic} failed"
    error = librdkafka_error(exc)
    name = librdkafka_name(error) if error is not None else type(exc).__name__
    text = f"{error.name()}: {error.str()}" if error is not None else _text(exc)
    grant = _PUBLISH_GRANTS.get(name.upper().replace("_", "").removesuffix("ERROR"), "")
    named = exc.args[0] if error is None and exc.args else None   # kafka-python's ACL errors name the topics
    topics = ", ".join(sorted(named)) if isinstance(named, (set, frozenset, list, tuple)) and named else topic
    advice = f": grant this service's principal {grant.format(topic=topics)}" if grant else ""
    return KafkaPermanent(f"{what}: {text}{advice}; stopping this member (its partitions stay uncommitted "
                          f"from there)")


# what a producer needs that an ACL refused, by error name (either client's, upper case, no _ or Error)
_PUBLISH_GRANTS = {"TOPICAUTHORIZATIONFAILED": "WRITE on {topic}",
                   "CLUSTERAUTHORIZATIONFAILED": "IDEMPOTENT_WRITE on the cluster (the producer is idempotent)",
                   "TRANSACTIONALIDAUTHORIZATIONFAILED": "WRITE on its transactional id"}


def _text(exc: BaseException) -> str:
    """The exception's message, led by its class name (kafka-python's messages often already are)."""
    return str(exc) if type(exc).__name__ in str(exc) else f"{type(exc).__name__}: {exc}"


# ---- kafka-python ----
def _is_kafka_python(exc: BaseException) -> bool:
    module = sys.modules.get("kafka.errors")
    return module is not None and isinstance(exc, module.KafkaError)


def kafka_python_kind(exc: BaseException) -> str | None:
    """What a kafka-python exception means here (its nearest class in :data:`KAFKA_PYTHON`); None for
    any other exception."""
    if not _is_kafka_python(exc):
        return None
    for cls in type(exc).__mro__:
        if cls.__module__ == "kafka.errors" and cls.__name__ in KAFKA_PYTHON:
            return KAFKA_PYTHON[cls.__name__]
    return TRANSIENT   # a KafkaError subclass defined outside kafka.errors


def _from_kafka_python(exc: BaseException, what: str, group: str) -> SentimentError:
    found = kafka_python_kind(exc)
    if found in (PERMANENT, REFUSED):   # outside a publish, a refusal too can never succeed
        return KafkaPermanent(_kafka_python_advice(exc, what, group) or f"{what}: {_text(exc)}")
    if found == OUTAGE:
        return BrokerUnavailable(f"{what}: {_text(exc)}")
    return KafkaTransient(f"{what}: {_text(exc)}")


def _kafka_python_advice(exc: BaseException, where: str, group: str) -> str | None:
    """For an error retrying cannot fix, one line with what to do; None where the error says it all."""
    from kafka import errors as e
    if isinstance(exc, e.UnsupportedCodecError):
        return (f"{where}: {exc}: records there are compressed with a codec this installation cannot "
                f"decode; install the service's codec libraries (pip install lz4 zstandard python-snappy) "
                f"and restart")
    if isinstance(exc, e.CorruptRecordError) and "UnicodeDecodeError" in str(exc):   # all kafka-python decodes
        return (f"{where}: {exc}: a record with a header key that is not UTF-8, which kafka-python cannot read; "
                f"--kafka-client librdkafka dead-letters such a record, or move the group {group!r} past it "
                f"(kafka-consumer-groups --reset-offsets) and restart")
    if isinstance(exc, e.CorruptRecordError):
        return (f"{where}: {exc}: a corrupt record batch the client cannot skip; move the group "
                f"{group!r} past it (kafka-consumer-groups --reset-offsets) and restart")
    if isinstance(exc, (e.AuthorizationError, e.SaslAuthenticationFailedError)):
        return (f"{where}: {exc}: check the credentials and grant READ on the input topics and group "
                f"{group!r}, WRITE on the output and dead-letter topics")
    if isinstance(exc, (e.UnsupportedVersionError, e.InvalidTopicError, e.KafkaConfigurationError)):
        return f"{where}: {exc}"
    return None


# ---- librdkafka (confluent-kafka) ----
def librdkafka_error(exc: Any) -> Any:
    """The librdkafka ``KafkaError`` a confluent-kafka exception carries, or ``exc`` itself when it is
    one; None for anything else."""
    module = sys.modules.get("confluent_kafka")
    if module is None:
        return None
    if isinstance(exc, module.KafkaException) and exc.args and isinstance(exc.args[0], module.KafkaError):
        return exc.args[0]
    return exc if isinstance(exc, module.KafkaError) else None


def librdkafka_name(error: Any) -> str:
    """The code's name as :data:`LIBRDKAFKA` spells it (librdkafka's ``name()`` drops the leading _)."""
    from confluent_kafka import KafkaError
    return next((n for n in LIBRDKAFKA if getattr(KafkaError, n, None) == error.code()), error.name())


def librdkafka_kind(error: Any) -> str:
    """What a librdkafka ``KafkaError`` means here: its entry in :data:`LIBRDKAFKA`, else the default."""
    found = LIBRDKAFKA.get(librdkafka_name(error))
    if found is not None:
        return found
    return PERMANENT if error.fatal() else TRANSIENT


# ---- what the librdkafka sink needs to know of an error (a ``KafkaError``, or a ``KafkaException`` carrying one) ----
# librdkafka's fatal errors of an idempotent producer that a new one (a new id, sequences from 0) cures: a refused
# batch (gapless), and a broker that lost the producer's state or disagrees on its sequence numbers
LIBRDKAFKA_CURED_BY_A_NEW_PRODUCER = ("_GAPLESS_GUARANTEE", "OUT_OF_ORDER_SEQUENCE_NUMBER", "UNKNOWN_PRODUCER_ID",
                                      "_INCONSISTENT")
# what librdkafka hands back unsent: purged from a failed producer's queue, or turned away by its full local queue
LIBRDKAFKA_UNSENT = ("_PURGE_QUEUE", "_QUEUE_FULL")


def librdkafka_exception(error: Any) -> BaseException:
    """A librdkafka ``KafkaError`` as the exception the error tree classifies (other errors as they are)."""
    from confluent_kafka import KafkaError, KafkaException
    return KafkaException(error) if isinstance(error, KafkaError) else error


def librdkafka_code(error: Any) -> str | None:
    """The name of ``error``'s librdkafka code (see :func:`librdkafka_name`), None for any other error."""
    found = librdkafka_error(error)
    return None if found is None else librdkafka_name(found)


def librdkafka_retriable(error: Any) -> bool:
    """Whether sending again can succeed: an outage, a transient error, a full local queue; never a bad record."""
    found = librdkafka_error(error)
    return found is not None and librdkafka_kind(found) in (OUTAGE, TRANSIENT)


def librdkafka_refused(error: Any) -> bool:
    """The broker refused the record, or a batch it was in (:data:`REFUSED`)."""
    found = librdkafka_error(error)
    return found is not None and librdkafka_kind(found) == REFUSED


def librdkafka_timed_out(error: Any) -> bool:
    """librdkafka gave up on the record (``message.timeout.ms``)."""
    return librdkafka_code(error) == "_MSG_TIMED_OUT"


def librdkafka_producers_fault(error: Any) -> bool:
    """A failure of the producer, not of the record: librdkafka's fatal state (``produce`` on a fatal producer
    raises _FATAL, which does not say fatal() itself), or a fenced epoch (a delivery report's error never says
    fatal(); its code does)."""
    found = librdkafka_error(error)
    return found is not None and librdkafka_kind(found) == PERMANENT and \
        (found.fatal() or fenced(found) or librdkafka_name(found) == "_FATAL")


def too_large(exc: BaseException) -> bool:
    """The broker (or the client) refused a record as too large, in either client's words."""
    found = librdkafka_error(exc)
    if found is not None:
        return librdkafka_name(found) == "MSG_SIZE_TOO_LARGE"
    return _is_kafka_python(exc) and any(cls.__name__ == "MessageSizeTooLargeError" for cls in type(exc).__mro__)


def _from_librdkafka(error: Any, what: str, group: str) -> SentimentError:
    text = f"{error.name()}: {error.str()}"
    found = librdkafka_kind(error)
    if found in (PERMANENT, REFUSED):   # outside a publish, a refusal too can never succeed
        advice = _LIBRDKAFKA_ADVICE.get(librdkafka_name(error), "")
        return KafkaPermanent(f"{what}: {text}" + (f": {advice.format(group=group)}" if advice else ""))
    if found == OUTAGE:
        return BrokerUnavailable(f"{what}: {text}")
    return KafkaTransient(f"{what}: {text}")
