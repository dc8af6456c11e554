"""The project's one exception tree.

    SentimentError                  root: everything this project raises on purpose
    ├── UserError                   bad input or config; the CLI prints one line, exits 1
    │   ├── ConfigError             a flag, environment variable or combination is wrong
    │   ├── ModelFormatError        a prototxt/caffemodel/ONNX file is unreadable or inconsistent
    │   │   └── UnsupportedLayerError
    │   ├── ArtifactError           an artifact directory is missing, tampered with or stale
    │   │   └── StaleEngineError    engine.plan was built for another GPU/TensorRT/batch range
    │   ├── ValidationFailed        a variant failed its validation gate (flips, |dp| bounds, NaN)
    │   └── BackendUnavailable      a runtime (TensorRT, GPU, OpenVINO) is not installed/usable
    ├── DecodeError                 one message's image is rejected (becomes a dead letter);
    │                               ``reason`` is a short machine-readable code
    └── BrokerUnavailable           Kafka cannot be reached right now; the service retries

Third-party exceptions are translated at the boundary (``raise Ours(...) from exc``).
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


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


class BrokerUnavailable(SentimentError):
    """Kafka is unreachable; the service keeps retrying with backoff and reports not-ready."""
