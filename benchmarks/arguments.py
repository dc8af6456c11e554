"""What the benchmark scripts share on their command lines: numbers checked as argparse reads them, and
one line, not a traceback, for an error the user can fix (a missing artifact, an unwritable output)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from engine_build.errors import UserError


def number(kind: type[int] | type[float], minimum: float, *, above: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: ``kind`` (int or float), finite, ``minimum`` or more (more than it, ``above``);
    anything else is argparse's one-line usage error naming the option."""
    rule = f"{'more than' if above else 'at least'} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} is not allowed: must be {rule}")
        return value
    parse.__name__ = kind.__name__   # what argparse calls the type in "invalid ... value"
    return parse


COUNT = number(int, 1)             # images, repeats, rounds, processes: one or more


def output_folder(parser: argparse.ArgumentParser, option: str, folder: Path) -> None:
    """Make ``folder`` (the results folder ``option`` names) now, before anything is measured; one it
    cannot make or write is argparse's one-line usage error (exit 2), not a traceback after the run."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"{option} {folder}: {exc.strerror or exc}")
    if not os.access(folder, os.W_OK):
        parser.error(f"{option} {folder} is not writable")


def run(main: Callable[[], int], prog: str) -> int:
    """``main()``'s exit status; a :class:`UserError` or a file the script cannot read or write is one
    line on stderr and status 1, an interrupt status 130."""
    try:
        return main()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"{prog}: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
              file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 1
