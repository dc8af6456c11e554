"""The shape of ``manifest.json``, declared once: every key a reader uses, with its JSON type.

:meth:`.manifest.Manifest.read` checks each document against :data:`MANIFEST_SHAPE`, so that a file of
the right format but the wrong shape (a key missing, an object where a list belongs, ``"passed":
"false"``, which Python reads as true) is refused when it is read, in one line naming the key, and
never met later as a KeyError, a traceback in ``inspect`` or a wrong value. Keys not declared are
allowed; no reader uses them.

The records that other modules own are declared here too, each under its owner's name, so that one
description covers the whole file: a validation check (:class:`.validate.Check`), the INT8 sensitivity
passes (:mod:`.sensitivity`), the FP16 range audit (:mod:`.range_audit`) and an engine's identity
(:mod:`.runtime.identity`). Who changes a record changes its shape here, and the build's own manifests
are read back through this check by every test that builds one.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scalar:
    """A JSON value of one of ``types`` (true/false is never taken for a number); a string may have to
    match ``pattern`` whole, a number be above ``above`` (a divisor)."""
    types: tuple[type, ...]
    what: str
    pattern: str = ""
    above: float | None = None


@dataclass(frozen=True)
class Obj:
    """An object with these keys (``"name?"``: may be absent); ``closed``: and no others."""
    keys: Mapping[str, Shape]
    closed: bool = False


@dataclass(frozen=True)
class ListOf:
    item: Shape


@dataclass(frozen=True)
class MapOf:
    """An object whose keys are names (variants, runtimes, files) and whose values are all ``value``."""
    value: Shape


@dataclass(frozen=True)
class Nullable:
    shape: Shape


@dataclass(frozen=True)
class AnyOf:
    """One of ``options``; a value that is none of them is reported against the last."""
    options: tuple[Shape, ...]


Shape = Scalar | Obj | ListOf | MapOf | Nullable | AnyOf

STR = Scalar((str,), "a string")
INT = Scalar((int,), "an integer")
NUM = Scalar((int, float), "a number")
POSITIVE = Scalar((int, float), "a number above 0", above=0)
BOOL = Scalar((bool,), "true or false")
# a file of the artifact: a name inside its directory, never a path that leads out of it
FILE_NAME = Scalar((str,), "a file name in the artifact directory", r"(?!\.\.?$)[^/\\\x00]+")

# :class:`.validate.Check` (``Check.from_record``, ``table``, ``failure``) and :func:`.runtime.cpu.describe_cpu`
CPU = AnyOf((Obj({}, closed=True), Obj({"model": STR, "machine": STR, "extensions": ListOf(STR)})))
CHECK = Obj({
    "variant": STR, "runtime": STR, "mode": STR, "compute": STR, "images": INT, "agreement": NUM, "nan": BOOL,
    "passed": BOOL, "max_abs_diff?": Nullable(NUM), "mean_abs_diff?": Nullable(NUM), "file?": STR,
    "near_ties?": INT, "near_tie_flips?": INT, "confident_flips?": ListOf(Obj({"image": STR, "reference_p": NUM})),
    "limits?": Obj({"max_abs_diff?": NUM, "mean_abs_diff?": NUM}), "note?": STR, "cpu?": CPU, "lowered?": BOOL})
# :func:`.validate.gate_from_record`: both kinds of bounds, whatever was built (a re-check may need either)
BOUNDS = Obj({"max_abs_diff": NUM, "mean_abs_diff": NUM})
GATE = Obj({"confident_margin": NUM, "bounds": Obj({"int8": BOUNDS, "fp16": BOUNDS})})
# :meth:`.sensitivity.FloatChoice.record`, read by ``inspect`` and the throughput benchmark
SENSITIVITY_PASS = Obj({
    "output_layers": ListOf(STR), "target_max_abs_diff": NUM, "skipped?": STR, "float_layers?": ListOf(STR),
    "held_out_max_abs_diff": Obj({"output_layers_in_float": Nullable(NUM), "chosen": Nullable(NUM)}),
    "sensitivity?": MapOf(Nullable(NUM)), "folds?": ListOf(ListOf(STR))})
INT8 = Obj({"chosen_by": STR, "float_layers": MapOf(ListOf(STR)), "passes?": MapOf(SENSITIVITY_PASS)})
# :func:`.range_audit.record`
FP16_RANGE = Obj({
    "limit": POSITIVE, "margin": NUM, "images": INT, "source": STR, "largest_fp16": NUM,
    "tensors": ListOf(Obj({"tensor": STR, "op": STR, "max_abs": NUM, "fp16_file": STR, "float32": Nullable(STR),
                           "window_sum_sq?": Nullable(NUM), "near_limit?": BOOL}))})
# :class:`.runtime.identity.EngineIdentity` (an incomplete one reads as none) and the timing cache's record
IDENTITY = Obj({"tensorrt?": STR, "gpu?": STR, "compute_capability?": STR, "min_batch?": INT, "max_batch?": INT})
TIMING_CACHE = Obj({"file?": FILE_NAME, "tensorrt?": STR, "gpu?": STR, "compute_capability?": STR,
                    "reused?": BOOL, "note?": STR})
# :class:`.manifest.FileEntry`; ``by_runtime`` holds entries of the same shape
_ENTRY_KEYS: dict[str, Shape] = {
    "file": FILE_NAME, "sha256": STR, "precision?": STR,
    "quantizer?": Nullable(Obj({"quantizer": STR, "version": STR})),
    "onnx_sha256?": Nullable(STR), "identity?": Nullable(IDENTITY), "timing_cache?": Nullable(TIMING_CACHE)}
FILE_ENTRY = Obj({**_ENTRY_KEYS, "by_runtime?": MapOf(Obj(_ENTRY_KEYS))})

# :class:`.manifest.Manifest`'s views, in the order the build writes the keys ("format" is checked first)
MANIFEST_SHAPE = Obj({
    "model": Obj({"name": STR, "placeholder": BOOL, "labels?": ListOf(STR),
                  "source?": MapOf(Obj({"path": STR, "sha256": STR}))}),
    "input": Obj({"name": STR, "dtype": STR, "shape": ListOf(Scalar((str, int), "a dimension")), "layout?": STR,
                  "channels": STR}),
    "preprocessing": Obj({"resize?": STR, "mean_bgr": ListOf(NUM), "crop": STR, "crop_size?": INT,
                          "oversample?": BOOL}),
    "files": Obj({"fp32": FILE_ENTRY, "fp16?": FILE_ENTRY, "int8?": FILE_ENTRY, "tensorrt?": FILE_ENTRY}),
    "tools?": MapOf(STR),
    "calibration?": Nullable(Obj({"source": STR, "images": INT, "image_sha256?": MapOf(STR)})),
    "validation?": Obj({"reference?": STR, "source?": STR, "images?": INT, "image_sha256?": MapOf(STR),
                        "gate?": Nullable(GATE), "checks?": ListOf(CHECK)}),
    "build": Obj({"seconds": NUM, "peak_rss_mib?": NUM, "created?": STR, "notes?": ListOf(STR)}),
    "fp16_range?": Nullable(FP16_RANGE),
    "int8?": Nullable(INT8),
})


def mismatch(value: Any, shape: Shape, where: str = "") -> str | None:
    """The first place where ``value`` is not ``shape``, as one line (``files.int8.quantizer: expected an
    object, got "nncf"``); None when it is."""
    if isinstance(shape, Nullable):
        return None if value is None else mismatch(value, shape.shape, where)
    if isinstance(shape, AnyOf):
        problems = [mismatch(value, option, where) for option in shape.options]
        return None if None in problems else problems[-1]
    if isinstance(shape, Scalar):
        fits = isinstance(value, shape.types) and (bool in shape.types or not isinstance(value, bool))
        if fits and shape.pattern and not re.fullmatch(shape.pattern, value):
            fits = False
        if fits and shape.above is not None and not value > shape.above:
            fits = False
        return None if fits else _expected(where, shape.what, value)
    if isinstance(shape, ListOf):
        if not isinstance(value, list):
            return _expected(where, "a list", value)
        return next(filter(None, (mismatch(v, shape.item, f"{where}[{i}]") for i, v in enumerate(value))), None)
    if not isinstance(value, Mapping):
        return _expected(where, "an object", value)
    if isinstance(shape, MapOf):
        return next(filter(None, (mismatch(v, shape.value, _key(where, k)) for k, v in value.items())), None)
    for key, inner in shape.keys.items():
        name = key.rstrip("?")
        if name not in value:
            if key.endswith("?"):
                continue
            return f"{_key(where, name)}: missing"
        found = mismatch(value[name], inner, _key(where, name))
        if found:
            return found
    extra = [k for k in value if k not in {key.rstrip("?") for key in shape.keys}]
    return _expected(where, "an empty object", value) if shape.closed and extra else None


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _expected(where: str, what: str, value: Any) -> str:
    shown = json.dumps(value, default=str)
    return f"{where or 'the document'}: expected {what}, got {shown if len(shown) <= 40 else shown[:37] + '...'}"
