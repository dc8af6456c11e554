"""The project's one exception tree.

    SentimentError                  root: everything this project raises on purpose
    ├── UserError                   bad input or config; the CLI prints one line, exits 1
    │   ├── ConfigError             a flag, environment variable or combination is wrong
    │   ├── ModelFormatError        a prototxt/caffemodel/ONNX file is unreadable or inconsistent
    │   │   └── UnsupportedLayerError
    │   ├── DownloadError           fetch-weights got an HTTP error, an HTML page or a short file
    │   ├── ArtifactError           an artifact directory is missing, tampered with or stale
    │   │   └── StaleEngineError    engine.plan was built for another GPU/TensorRT/batch range
    │   ├── ValidationFailed        a variant failed its validation gate (flips, |dp| bounds, NaN)
    │   ├── KafkaPermanent          (stream.errors) a Kafka error that can never succeed; the
    │   │                           service drains and exits
    │   └── BackendUnavailable      a runtime (TensorRT, GPU, OpenVINO) is not installed/usable
    ├── DecodeError                 one message's image is rejected (becomes a dead letter);
    │                               ``reason`` is a short machine-readable code
    ├── InferenceError              a runtime failed on a batch (the service retries image by image)
    │   ├── CudaError               a CUDA runtime call returned an error (``code``, ``name``)
    │   └── BackendClosed           ``infer`` was called on a backend after ``close``
    ├── BrokerUnavailable           (stream.errors) Kafka cannot be reached right now; retried
    └── KafkaTransient              (stream.errors) a Kafka client error worth retrying that is
                                    not an outage; retried with backoff, fatal past a limit

The Kafka branch lives in the package that raises it, :mod:`stream.errors` (drawn there too, with
the tables that classify both Kafka clients' errors); it subclasses the classes here, so the tree
stays one. Third-party exceptions are translated at the boundary (``raise Ours(...) from exc``);
ONNX Runtime's, which several modules run into, by :func:`onnxruntime_errors` here.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

ONNXRUNTIME_ERRORS = "onnxruntime.capi.onnxruntime_pybind11_state"   # the module of ONNX Runtime's exceptions


class SentimentError(Exception):
    """Root of every exception this project raises on purpose."""


class UserError(SentimentError):
    """A problem the user can fix; shown as one line, exit status 1."""


class ConfigError(UserError):
    pass


class ModelFormatError(UserError):
    pass


class UnsupportedLayerError(ModelFormatError):
    pass


class DownloadError(UserError):
    pass


class ArtifactError(UserError):
    pass


class StaleEngineError(ArtifactError):
    pass


class ValidationFailed(UserError):
    """A variant failed its gate; ``manifest`` is the artifact's manifest, which records it."""

    def __init__(self, message: str, manifest: dict | None = None) -> None:
        super().__init__(message)
        self.manifest = manifest


class BackendUnavailable(UserError):
    pass


class DecodeError(SentimentError):
    """One input could not become an image; ``reason`` is a short code for dead letters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InferenceError(SentimentError):
    """A runtime failed on a batch: a CUDA error, a failed TensorRT enqueue."""


class CudaError(InferenceError):
    """A CUDA runtime call failed; ``name`` is CUDA's error name (e.g. cudaErrorMemoryAllocation)."""

    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({code})")
        self.call, self.code, self.name = call, code, name


class BackendClosed(InferenceError):
    """``infer`` after ``close``: the backend's buffers are gone."""


@contextmanager
def onnxruntime_errors(doing: str) -> Iterator[None]:
    """ONNX Runtime's exceptions raised inside (Fail, InvalidArgument, RuntimeException...: classes of its
    pybind11 module, none a RuntimeError, so named by module, and onnxruntime is not imported here) become
    ``ModelFormatError(f"{doing}: {its first line}")``: the model declares what it does not do (a Reshape to a
    batch of 1 in a model declaring N), and the user fixes the model."""
    try:
        yield
    except Exception as exc:
        if type(exc).__module__ != ONNXRUNTIME_ERRORS:
            raise
        raise ModelFormatError(f"{doing}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from exc
