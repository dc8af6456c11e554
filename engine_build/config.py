"""``BuildConfig``: every build option declared once.

Each field carries its command-line help in its metadata; ``python -m engine_build build``
derives its flags from the fields (:func:`add_arguments`), and every value is checked in
``__post_init__``, so an invalid config cannot exist. Checks that need the file system
(does the file exist, does the folder hold images) are the build's first step instead.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .validate import Bounds, Gate

PRECISIONS = ("fp32", "fp16", "int8")
INT8_QUANTIZERS = ("auto", "nncf", "minmax")


def _option(help: str, flag: str | None = None, **argparse_kw: Any) -> dict:
    """Field metadata: the help text, the flag (default ``--field-name``) and argparse extras."""
    return {"help": help, "flag": flag, "argparse": argparse_kw}


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    output: Path = field(metadata=_option("artifact directory to write", type=Path, required=True))
    prototxt: Path | None = field(default=None, metadata=_option("deploy prototxt (text)", type=Path))
    caffemodel: Path | None = field(default=None, metadata=_option("trained weights (binary)", type=Path))
    onnx: Path | None = field(default=None, metadata=_option(
        "instead of the Caffe files: an ONNX classifier taking Caffe's data blob, float32 [N,3,227,227] "
        "mean-subtracted BGR, and giving 2 scores (logits or softmax; 0 negative)", type=Path))
    precisions: tuple[str, ...] = field(default=PRECISIONS, metadata=_option(
        "variants to make (fp32 is always made: it is the reference)", flag="--precision", nargs="+",
        choices=PRECISIONS))
    oversample: bool = field(default=False, metadata=_option(
        "average the authors' 10 crops (corners + centre, mirrored) instead of the centre crop"))
    max_batch: int = field(default=32, metadata=_option("largest batch of the TensorRT profile"))
    tensorrt: bool = field(default=False, metadata=_option(
        "also build engine.plan from the FP16 model (needs TensorRT and a GPU; skipped with a note otherwise)"))
    calibration_images: Path | None = field(default=None, metadata=_option(
        "folder of photos for INT8 calibration: use a few hundred images from your own stream "
        "(default: the built-in calibration photos)", type=Path))
    validation_images: Path | None = field(default=None, metadata=_option(
        "folder of photos for the validation gate, none of them also a calibration image "
        "(default: the built-in validation photos)", type=Path))
    int8_quantizer: str = field(default="auto", metadata=_option(
        "auto: NNCF with bias correction for OpenVINO and ONNX Runtime's MinMax file for ONNX Runtime "
        "(each the fastest on its runtime); nncf or minmax: one file for both", choices=INT8_QUANTIZERS))
    int8_float_layers: tuple[str, ...] | None = field(default=None, metadata=_option(
        "layers INT8 keeps in float, by ONNX node name; give the flag with no names for every layer in int8 "
        "(default: the fewest layers that a per-layer sensitivity pass on held-out calibration photos finds "
        "needed for three quarters of --int8-max-diff, each quantiser for itself)", nargs="*"))
    confident_margin: float = field(default=0.05, metadata=_option(
        "gate: no variant may flip the label of an image where FP32 has |p - 0.5| >= this"))
    int8_max_diff: float = field(default=0.035, metadata=_option(
        "gate: largest |dp| allowed for INT8 (a user who thresholds or averages scores sees them move by this much "
        "at most on the validation photos)"))
    int8_mean_diff: float = field(default=0.01, metadata=_option("gate: largest mean |dp| allowed for INT8"))
    fp16_max_diff: float = field(default=0.02, metadata=_option(
        "gate: largest |dp| allowed for FP16 and OpenVINO's bf16"))
    fp16_mean_diff: float = field(default=0.004, metadata=_option(
        "gate: largest mean |dp| allowed for FP16 and OpenVINO's bf16"))
    placeholder: bool | None = None     # None: detect from the caffemodel's network name
    progress: bool | None = None        # None: tqdm decides (a terminal gets a bar)

    def __post_init__(self) -> None:
        for name in ("output", "prototxt", "caffemodel", "onnx", "calibration_images", "validation_images"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "precisions", tuple(dict.fromkeys(self.precisions)))
        if self.int8_float_layers is not None:
            object.__setattr__(self, "int8_float_layers", tuple(dict.fromkeys(self.int8_float_layers)))
        if bool(self.onnx) == bool(self.prototxt or self.caffemodel) or bool(self.prototxt) != bool(self.caffemodel):
            raise ConfigError("give either --prototxt and --caffemodel, or --onnx")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ConfigError(f"--precision {bad[0]}: choose from {', '.join(PRECISIONS)}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch {self.max_batch}: must be at least 1")
        if self.tensorrt and "fp16" not in self.precisions:
            raise ConfigError("--tensorrt builds from the FP16 model: include fp16 in --precision")
        if self.int8_quantizer not in INT8_QUANTIZERS:
            raise ConfigError(f"--int8-quantizer {self.int8_quantizer}: choose from {', '.join(INT8_QUANTIZERS)}")
        if not 0.0 <= self.confident_margin <= 0.5:
            raise ConfigError(f"--confident-margin {self.confident_margin:g}: must be between 0 and 0.5")
        for name in ("int8_max_diff", "int8_mean_diff", "fp16_max_diff", "fp16_mean_diff"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name):g}: must be between 0 and 1")

    def gate(self) -> Gate:
        return Gate(self.confident_margin, {"int8": Bounds(self.int8_max_diff, self.int8_mean_diff),
                                            "fp16": Bounds(self.fp16_max_diff, self.fp16_mean_diff)})

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> BuildConfig:
        """The config from parsed flags; every field with a flag is read, none is dropped."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.metadata})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``BuildConfig`` field that has help metadata, with the field's default."""
    for f in fields(BuildConfig):
        if not f.metadata:
            continue
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kwargs = {"dest": f.name, "help": meta["help"], **meta["argparse"]}
        default = None if f.default is MISSING else f.default
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            if default is not None:
                kwargs.setdefault("type", type(default) if not isinstance(default, tuple) else str)
                shown = " ".join(default) if isinstance(default, tuple) else default
                kwargs["help"] += f" (default {shown})"
            kwargs["default"] = list(default) if isinstance(default, tuple) else default
        parser.add_argument(flag, **kwargs)
