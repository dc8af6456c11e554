"""Input codecs: message value -> (encoded image bytes, pass-through metadata)."""
from __future__ import annotations

import base64
import binascii
import json
from typing import Protocol

from engine_build.errors import DecodeError

from .records import Headers


class InputCodec(Protocol):
    name: str

    def unpack(self, value: bytes | None, headers: Headers) -> tuple[bytes, dict]:
        """Raise DecodeError(reason, message) for values that carry no usable image."""
        ...


class RawCodec:
    """The message value is the encoded image itself (JPEG, PNG, WebP, BMP, TIFF)."""

    name = "raw"

    def unpack(self, value: bytes | None, headers: Headers) -> tuple[bytes, dict]:
        if not value:
            raise DecodeError("empty", "message has no value")
        return value, {}


class JsonEnvelopeCodec:
    """``{"image": "<base64>", "metadata": {...}}``; metadata is copied into the result."""

    name = "json"

    def unpack(self, value: bytes | None, headers: Headers) -> tuple[bytes, dict]:
        try:
            envelope = json.loads(value or b"")
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError("bad_envelope", f"value is not JSON: {exc}") from None
        if not isinstance(envelope, dict) or not isinstance(envelope.get("image"), str):
            raise DecodeError("bad_envelope", 'expected {"image": "<base64>", "metadata": {...}}')
        try:
            image = base64.b64decode(envelope["image"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DecodeError("bad_envelope", f"image is not base64: {exc}") from None
        metadata = envelope.get("metadata", {})
        if not isinstance(metadata, dict):
            raise DecodeError("bad_envelope", "metadata must be a JSON object")
        return image, metadata
