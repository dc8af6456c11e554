"""Extension points: input codecs and output encoders, found by name.

Built-ins are registered through the same Python entry points a user's package
would use (``sentiment_stream.input_codecs``, ``sentiment_stream.output_encoders``),
so adding one needs no fork::

    [options.entry_points]
    sentiment_stream.input_codecs =
        mycodec = mypackage.codecs:MyCodec

An input codec turns a message value into image bytes plus pass-through metadata
(:class:`plugins.codecs.InputCodec`); an output encoder turns a prediction into the
record to publish (:class:`plugins.encoders.OutputEncoder`). A plugin that cannot be imported or
made, or lacks that method, is one :class:`~engine_build.errors.ConfigError` line (:func:`load`).
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from engine_build.errors import ConfigError

INPUT_GROUP = "sentiment_stream.input_codecs"
OUTPUT_GROUP = "sentiment_stream.output_encoders"
METHODS = {INPUT_GROUP: "unpack", OUTPUT_GROUP: "encode"}   # what each group's plugins must have


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


def _flag(group: str) -> str:
    return "--input-codec" if group == INPUT_GROUP else "--output-codec"


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: a plugin's failure as the user's one line shows it."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_class(group: str, name: str, target: Any) -> Any:
    """What the entry point names (a built-in is its class already). Whatever importing the user's
    module raises (a missing module or name, a syntax error, its own code failing) is the
    plugin's, so it becomes one ConfigError line."""
    if not hasattr(target, "load"):
        return target
    try:
        return target.load()
    except Exception as exc:   # ImportError, AttributeError, SyntaxError, or whatever the module raises
        raise ConfigError(f"{_flag(group)} {name}: {target.value} cannot be loaded ({_one_line(exc)})") from exc


def _loads(group: str, name: str, target: Any) -> bool:
    try:
        _load_class(group, name, target)
    except ConfigError:
        return False
    return True


def load(group: str, name: str) -> Any:
    """An instance of the plugin called ``name``; a clear one-line error (:class:`ConfigError`) if
    there is none, if it cannot be imported, if making it raises, or if it lacks its method
    (``unpack`` for a codec, ``encode`` for an encoder)."""
    options = available(group)
    if name not in options:
        usable = sorted(n for n, target in options.items() if _loads(group, n, target))
        broken = sorted(set(options) - set(usable))
        raise ConfigError(f"{_flag(group)} {name}: no such plugin (available: {', '.join(usable)}"
                          + (f"; {', '.join(broken)} cannot be loaded)" if broken else ")"))
    cls = _load_class(group, name, options[name])
    try:
        plugin = cls()
    except Exception as exc:   # the plugin's constructor: a missing config file, a service it could not reach
        raise ConfigError(f"{_flag(group)} {name}: making {getattr(cls, '__qualname__', cls)!s} failed "
                          f"({_one_line(exc)})") from exc
    method = METHODS[group]
    if not callable(getattr(plugin, method, None)):
        raise ConfigError(f"{_flag(group)} {name}: {type(plugin).__qualname__} has no {method}() method")
    return plugin
