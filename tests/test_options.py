"""engine_build.options, on a small config of its own: what both CLIs' configs are declared with."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine_build.errors import ConfigError
from engine_build.options import Options, check_choices, option


@dataclass(frozen=True)
class Toy:
    path: Path = option(help="where")
    topic: tuple[str, ...] = option((), "repeat it", repeat=True)
    sizes: tuple[str, ...] | None = option(None, "several after one flag", flag="--size", nargs="*",
                                           choices=("s", "m", "l"))
    fast: bool = option(True, "go fast")
    mode: str = option("a", "a | b", choices=("a", "b"))
    count: int = option(2, "how many")
    wait_s: float = option(1.0, "how long")
    token: str | None = option(None, "a secret", secret=True)
    internal: int = field(default=7)       # not an option

    def __post_init__(self) -> None:
        check_choices(self)


TOY = Options(Toy, "TOY_")


def parse(argv: list[str], environ: dict[str, str] | None = None) -> Toy:
    return TOY.from_args(TOY.parser("toy", "").parse_args(argv), environ or {})


def test_flag_then_environment_then_default():
    assert parse(["--path", "p"]) == Toy(path=Path("p"))
    environ = {"TOY_PATH": "e", "TOY_COUNT": "5", "TOY_TOPIC": "a, b", "TOY_SIZE": "s,l", "TOY_FAST": "off"}
    cfg = parse(["--count", "3"], environ)
    assert (cfg.path, cfg.count, cfg.topic, cfg.sizes, cfg.fast) == (Path("e"), 3, ("a", "b"), ("s", "l"), False)
    cfg = parse(["--topic", "x", "--topic", "y,z", "--size", "m", "l", "--fast"], environ)
    assert (cfg.topic, cfg.sizes, cfg.fast) == (("x", "y", "z"), ("m", "l"), True)
    assert parse(["--size"], environ).sizes == (), "a flag given with no values is an empty tuple, not absent"
    assert [f.name for f in TOY.fields] == ["path", "topic", "sizes", "fast", "mode", "count", "wait_s", "token"]


def test_an_empty_environment_twin_is_unset_but_for_a_list_where_it_means_none():
    cfg = parse([], {"TOY_PATH": "p", "TOY_COUNT": "", "TOY_MODE": "", "TOY_SIZE": ""})
    assert (cfg.count, cfg.mode, cfg.sizes) == (2, "a", ())
    with pytest.raises(ConfigError, match="missing --path"):
        parse([], {"TOY_PATH": ""})


@pytest.mark.parametrize("argv,environ,message", [
    ([], {}, "missing --path (or TOY_PATH)"),
    (["--path", "p", "--count", "x"], {}, "--count='x': expected int"),
    (["--path", "p"], {"TOY_FAST": "maybe"}, "TOY_FAST='maybe': expected one of 1, true"),
    (["--path", "p", "--mode", "c"], {}, "--mode c: choose from a, b"),
    (["--path", "p"], {"TOY_SIZE": "s,xl"}, "--size xl: choose from s, m, l"),
    (["--path", "p", "--nope"], {}, "unrecognized arguments: --nope (see toy --help)"),
    (["--path"], {}, "expected one argument (see toy --help)"),
    (["--path", "p", "--wait-s", "nan"], {}, "--wait-s='nan': expected a finite number"),
    (["--path", "p"], {"TOY_WAIT_S": "inf"}, "TOY_WAIT_S='inf': expected a finite number"),
    (["--path", ""], {}, "--path is empty (an unset variable?): give a path"),    # not Path(""), the current folder
])
def test_every_bad_value_is_one_config_error(argv, environ, message):
    with pytest.raises(ConfigError) as caught:
        parse(argv, environ)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_check_of_the_config_names_the_environment_twin_a_flag_came_from():
    """The config's checks name flags: a flag given by its twin was left for the user to find."""
    with pytest.raises(ConfigError) as caught:
        parse(["--path", "p", "--size", "m"], {"TOY_MODE": "c", "TOY_SIZE": "xl", "TOY_PATH": "q"})
    assert str(caught.value) == "--mode c: choose from a, b (given by the environment: --mode from TOY_MODE)"
    with pytest.raises(ConfigError) as caught:
        parse(["--path", "p", "--mode", "c"], {"TOY_MODE": "b"})
    assert str(caught.value) == "--mode c: choose from a, b", "a flag given on the command line is not annotated"


def test_help_and_table_name_every_twin_and_default(capsys):
    with pytest.raises(SystemExit):
        TOY.parser("toy", "").parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--fast, --no-fast go fast [env TOY_FAST; default true]" in out
    assert "--mode {a,b} a | b [env TOY_MODE; default a]" in out and "[env TOY_TOKEN]" in out
    assert "--internal" not in out
    table = TOY.markdown_table()
    assert "| `--[no-]fast` | `TOY_FAST` | true | go fast |" in table
    assert "| `--mode` | `TOY_MODE` | a | a \\| b |" in table, "a | in the meaning does not split the cell"
    assert "| `--path` | `TOY_PATH` | (required) |" in table and "| `--size` | `TOY_SIZE` |  |" in table
    assert "s3cret" not in repr(parse(["--path", "p", "--token", "s3cret"]))
