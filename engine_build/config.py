"""``BuildConfig``: every build option declared once.

Each field made with :func:`~.options.option` carries its command-line help;
``python -m engine_build build`` derives its flags and their environment twins
(``ENGINE_BUILD_<FIELD>``) from the fields (:data:`OPTIONS`, the same mechanism as
``python -m stream``'s), and every value is checked in ``__post_init__``, so an invalid
config cannot exist. Checks that need the file system (does the file exist, does the folder
hold images) are the build's first step instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .options import Options, check_choices, option
from .validate import Bounds, Gate

PRECISIONS = ("fp32", "fp16", "int8")
INT8_QUANTIZERS = ("auto", "nncf", "minmax")


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    output: Path = option(help="artifact directory to write")
    prototxt: Path | None = option(None, "deploy prototxt (text)")
    caffemodel: Path | None = option(None, "trained weights (binary)")
    onnx: Path | None = option(None, "instead of the Caffe files: an ONNX classifier taking Caffe's data blob, float32 "
                                     "[N,3,227,227] mean-subtracted BGR, and giving 2 scores (logits or softmax; "
                                     "0 negative)")
    precisions: tuple[str, ...] = option(PRECISIONS, "variants to make (fp32 is always made: it is the reference)",
                                         flag="--precision", nargs="+", choices=PRECISIONS)
    oversample: bool = option(False, "average the authors' 10 crops (corners + centre, mirrored) instead of the "
                                     "centre crop")
    max_batch: int = option(32, "largest batch of the TensorRT profile")
    tensorrt: bool = option(False, "also build engine.plan from the FP16 model (needs TensorRT and a GPU; skipped "
                                   "with a note otherwise)")
    calibration_images: Path | None = option(None, "folder of photos for INT8 calibration: use a few hundred images "
                                                   "from your own stream (default: the built-in calibration photos)")
    validation_images: Path | None = option(None, "folder of photos for the validation gate, none of them also a "
                                                  "calibration image (default: the built-in validation photos)")
    int8_quantizer: str = option("auto", "auto: NNCF with bias correction for OpenVINO and ONNX Runtime's MinMax "
                                         "file for ONNX Runtime (each the fastest on its runtime); nncf or minmax: "
                                         "one file for both", choices=INT8_QUANTIZERS)
    int8_float_layers: tuple[str, ...] | None = option(
        None, "layers INT8 keeps in float, by ONNX node name; give the flag with no names (env: empty) for every "
              "layer in int8 (default: the fewest layers that a per-layer sensitivity pass on held-out calibration "
              "photos finds needed for three quarters of --int8-max-diff, each quantiser for itself)", nargs="*")
    confident_margin: float = option(0.05, "gate: no variant may flip the label of an image where FP32 has "
                                           "|p - 0.5| >= this")
    int8_max_diff: float = option(0.035, "gate: largest |dp| allowed for INT8 (a user who thresholds or averages "
                                         "scores sees them move by this much at most on the validation photos)")
    int8_mean_diff: float = option(0.01, "gate: largest mean |dp| allowed for INT8")
    fp16_max_diff: float = option(0.02, "gate: largest |dp| allowed for FP16 and OpenVINO's bf16")
    fp16_mean_diff: float = option(0.004, "gate: largest mean |dp| allowed for FP16 and OpenVINO's bf16")
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
            for name in self.int8_float_layers:   # which names the model has is checked right after the import
                if not name or any(c.isspace() or c == "," for c in name):
                    raise ConfigError(f"--int8-float-layers {name!r}: a layer name has no spaces or commas (give "
                                      "names as separate words, or comma-separated in ENGINE_BUILD_INT8_FLOAT_LAYERS)")
        if bool(self.onnx) == bool(self.prototxt or self.caffemodel) or bool(self.prototxt) != bool(self.caffemodel):
            raise ConfigError("give either --prototxt and --caffemodel, or --onnx")
        if not self.precisions:
            raise ConfigError(f"--precision: choose one or more of {', '.join(PRECISIONS)}")
        check_choices(self)
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch {self.max_batch}: must be at least 1")
        if self.tensorrt and "fp16" not in self.precisions:
            raise ConfigError("--tensorrt builds from the FP16 model: include fp16 in --precision")
        if not 0.0 <= self.confident_margin <= 0.5:
            raise ConfigError(f"--confident-margin {self.confident_margin:g}: must be between 0 and 0.5")
        for name in ("int8_max_diff", "int8_mean_diff", "fp16_max_diff", "fp16_mean_diff"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name):g}: must be between 0 and 1")

    def gate(self) -> Gate:
        return Gate(self.confident_margin, {"int8": Bounds(self.int8_max_diff, self.int8_mean_diff),
                                            "fp16": Bounds(self.fp16_max_diff, self.fp16_mean_diff)})


OPTIONS = Options(BuildConfig, "ENGINE_BUILD_")
