"""Output encoders: prediction -> (key, value, headers) of the record to publish."""
from __future__ import annotations

import json
from typing import Protocol

from engine_build.preprocess import LABELS

from .records import Headers, Prediction


class OutputEncoder(Protocol):
    name: str

    def encode(self, prediction: Prediction) -> tuple[bytes | None, bytes, Headers]: ...


class JsonEncoder:
    """One JSON object per image; key and headers of the input are kept."""

    name = "json"

    def encode(self, prediction: Prediction) -> tuple[bytes | None, bytes, Headers]:
        m = prediction.message
        probs = [float(p) for p in prediction.probs]
        record = {
            "label": LABELS[int(max(range(len(probs)), key=probs.__getitem__))],
            "scores": dict(zip(LABELS, probs, strict=True)),
            "source": {"topic": m.topic, "partition": m.partition, "offset": m.offset},
            "model": prediction.model,
            "timing_ms": {k: round(v, 3) for k, v in prediction.timing_ms.items()},
        }
        if prediction.metadata:
            record["metadata"] = prediction.metadata
        return m.key, json.dumps(record, separators=(",", ":")).encode(), list(m.headers)
