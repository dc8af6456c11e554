"""Extension points: input codecs and output encoders, found by name.

Built-ins are registered through the same Python entry points a user's package
would use (``sentiment_stream.input_codecs``, ``sentiment_stream.output_encoders``),
so adding one needs no fork::

    [options.entry_points]
    sentiment_stream.input_codecs =
        mycodec = mypackage.codecs:MyCodec

An input codec turns a message value into image bytes plus pass-through metadata
(:class:`plugins.codecs.InputCodec`); an output encoder turns a prediction into the
record to publish (:class:`plugins.encoders.OutputEncoder`).
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from engine_build.errors import ConfigError

INPUT_GROUP = "sentiment_stream.input_codecs"
OUTPUT_GROUP = "sentiment_stream.output_encoders"


def _builtin(group: str) -> dict[str, type]:
    from .codecs import JsonEnvelopeCodec, RawCodec
    from .encoders import JsonEncoder
    builtins: dict[str, dict[str, type]] = {INPUT_GROUP: {"raw": RawCodec, "json": JsonEnvelopeCodec},
                                            OUTPUT_GROUP: {"json": JsonEncoder}}
    return builtins[group]


def available(group: str) -> dict[str, Any]:
    """Name -> entry point (or built-in class) for one group."""
    found: dict[str, Any] = dict(_builtin(group))
    for ep in entry_points(group=group):
        found[ep.name] = ep
    return found


def load(group: str, name: str) -> Any:
    """An instance of the plugin called ``name``; a clear one-line error if there is none."""
    options = available(group)
    if name not in options:
        kind = "--input-codec" if group == INPUT_GROUP else "--output-codec"
        raise ConfigError(f"{kind} {name}: no such plugin (available: {', '.join(sorted(options))})")
    target = options[name]
    cls = target.load() if hasattr(target, "load") else target
    return cls()
