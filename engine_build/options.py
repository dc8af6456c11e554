"""Command-line options declared once, on a frozen dataclass's fields, for both CLIs.

A field made with :func:`option` carries its flag's help, its allowed values, its flag name
(default ``--field-name``) and how the flag takes several values (``repeat``: given again,
``nargs``: several after one flag). :class:`Options` derives the rest from the fields: the
argparse flags (booleans as ``--x/--no-x``), the environment twins (``PREFIX_FIELD``), the
value of each field (flag, then environment twin, then default) and the markdown table of
the flags. A bad value, a usage error included, is one :class:`~.errors.ConfigError` line;
the config checks itself in ``__post_init__`` (:func:`check_choices` there checks the
allowed values the same way for a flag, an environment twin or a direct call).

Fields made without :func:`option` are not options: they keep their default.
"""
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar, get_type_hints

from .errors import ConfigError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
C = TypeVar("C")


def option(default: Any = MISSING, help: str = "", *, choices: tuple[str, ...] | None = None,
           flag: str | None = None, repeat: bool = False, nargs: str | None = None, secret: bool = False) -> Any:
    """A config field that is a command-line option. ``repeat``: a tuple field whose flag may be given
    again (``--topic a --topic b``); ``nargs`` (``"+"``, ``"*"``): a tuple field whose flag takes several
    values at once. Either way its environment twin is comma-separated. ``secret``: left out of repr."""
    return field(default=default, repr=not secret, metadata={"option": True, "help": help, "choices": choices,
                                                             "flag": flag, "repeat": repeat, "nargs": nargs})


def is_option(f: Field) -> bool:
    return bool(f.metadata.get("option"))


def flag(f: Field) -> str:
    """The field's flag: its own, or ``--field-name``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_choices(config: Any) -> None:
    """Every option with allowed values holds one of them (each item, for a tuple); else one line."""
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        for item in value if isinstance(value, tuple) else () if value is None else (value,):
            if choices and item not in choices:
                raise ConfigError(f"{flag(f)} {item}: choose from {', '.join(choices)}")


def shown(value: Any) -> str:
    """A default as the environment twin would spell it ('' for none and for an empty tuple)."""
    if value is None or value is MISSING:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


class OptionParser(argparse.ArgumentParser):
    """Usage errors (argparse's own included) as the project's one-line ConfigError, not exit 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


class Options(Generic[C]):
    """The options of config class ``config``; each one's environment twin is ``prefix`` + its flag's name."""

    def __init__(self, config: type[C], prefix: str) -> None:
        self.config, self.prefix = config, prefix
        self.fields = [f for f in fields(config) if is_option(f)]   # type: ignore[arg-type]
        self._hints = get_type_hints(config)

    def flag(self, name: str) -> str:
        return flag(self._field(name))

    def env_name(self, name: str) -> str:
        """The environment twin: the prefix and the flag's name (``--precision``: ``PREFIX_PRECISION``)."""
        return self.prefix + self.flag(name)[2:].replace("-", "_").upper()

    def _field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def kind(self, name: str) -> Any:
        """The field's plain type: str, int, float, bool, Path, or tuple (several values)."""
        hint = self._hints[name]
        if getattr(hint, "__origin__", None) is tuple:
            return tuple
        args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
        if args and getattr(args[0], "__origin__", None) is tuple:
            return tuple
        return args[0] if args else hint

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """One flag per option; a flag not given stays None, so the environment twin can fill it."""
        for f in self.fields:
            default = "" if f.default is MISSING else shown(f.default)
            text = f"{f.metadata['help']} [env {self.env_name(f.name)}" + (f"; default {default}]" if default else "]")
            kind = self.kind(f.name)
            common: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
            if kind is bool:
                parser.add_argument(flag(f), action=argparse.BooleanOptionalAction, **common)
            elif kind is tuple:
                how = {"action": "append"} if f.metadata["repeat"] else {"nargs": f.metadata["nargs"] or "+"}
                parser.add_argument(flag(f), metavar=self._metavar(f), **how, **common)
            else:
                parser.add_argument(flag(f), metavar=self._metavar(f), **common)

    def parser(self, prog: str, description: str) -> OptionParser:
        parser = OptionParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(parser)
        return parser

    def _metavar(self, f: Field) -> str:
        """The value's placeholder in ``--help``: the allowed values where the field has a fixed set."""
        choices = f.metadata["choices"]
        return "{" + ",".join(choices) + "}" if choices else f.name.upper()

    def parse(self, name: str, text: str, source: str) -> Any:
        """One flag's or environment twin's text as the field's type; ``source`` names it in the error."""
        kind = self.kind(name)
        if kind is bool:
            if text.strip().lower() in TRUE + FALSE:
                return text.strip().lower() in TRUE
            raise ConfigError(f"{source}={text!r}: expected one of {', '.join(TRUE + FALSE)}")
        if kind is tuple:
            return tuple(t.strip() for t in text.split(",") if t.strip())
        if kind is Path and not text.strip():   # Path("") is the current folder: never what an empty "$VAR" meant
            raise ConfigError(f"{source} is empty (an unset variable?): give a path")
        try:
            value = kind(text)
        except ValueError as exc:
            raise ConfigError(f"{source}={text!r}: expected {kind.__name__}") from exc
        if kind is float and not math.isfinite(value):   # nan passes every "> 0" check
            raise ConfigError(f"{source}={text!r}: expected a finite number")
        return value

    def values(self, args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
        """Each option's value from its flag, else its environment twin; absent ones take their default."""
        values: dict[str, Any] = {}
        for f in self.fields:
            given, env = getattr(args, f.name), self.env_name(f.name)
            if isinstance(given, bool):
                values[f.name] = given
            elif isinstance(given, list):
                values[f.name] = tuple(t for item in given for t in self.parse(f.name, item, flag(f)))
            elif given is not None:
                values[f.name] = self.parse(f.name, given, flag(f))
            elif self._twin_set(f, environ):
                values[f.name] = self.parse(f.name, environ[env], env)
            elif f.default is MISSING:
                raise ConfigError(f"missing {flag(f)} (or {env})")
        return values

    def _twin_set(self, f: Field, environ: Mapping[str, str]) -> bool:
        """An empty twin is unset (FOO= in a unit file), but for a list, where it means none."""
        env = self.env_name(f.name)
        return environ.get(env, "") != "" or (env in environ and self.kind(f.name) is tuple)

    def from_args(self, args: argparse.Namespace, environ: Mapping[str, str]) -> C:
        """The config from parsed flags, then environment twins, then defaults (validated as it is made).

        The config's own checks name flags; where a flag named in one came from its environment twin, the
        error says so (``--onnx`` given in the environment, ``--prototxt`` on the command line)."""
        values = self.values(args, environ)
        try:
            return self.config(**values)
        except ConfigError as exc:
            from_env = [f"{flag(f)} from {self.env_name(f.name)}" for f in self.fields
                        if getattr(args, f.name) is None and self._twin_set(f, environ)
                        and re.search(rf"(?<![\w-]){re.escape(flag(f))}(?![\w-])", str(exc))]
            if not from_env:
                raise
            raise ConfigError(f"{exc} (given by the environment: {', '.join(from_env)})") from exc

    def markdown_table(self) -> str:
        """A table of every flag, its environment twin, default and meaning (a test keeps the docs equal to it)."""
        rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
        for f in self.fields:
            default = "(required)" if f.default is MISSING else shown(f.default)
            name = "--[no-]" + flag(f)[2:] if self.kind(f.name) is bool else flag(f)
            meaning = f.metadata["help"].replace("|", "\\|")
            rows.append(f"| `{name}` | `{self.env_name(f.name)}` | {default} | {meaning} |")
        return "\n".join(rows)
