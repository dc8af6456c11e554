"""FP16 range audit: how close each tensor of the FP32 graph comes to FP16's largest value.

The FP32 model runs on the calibration photos with every float intermediate exposed
as an output; per tensor the audit keeps the largest |x|, and for LRN also the largest
window sum of squares (what an FP16 LRN would hold internally). A tensor whose peak
comes within ``MARGIN`` times of 65504 is flagged: the FP16 graph keeps the layers that
write or read it in float32 islands. ONNX Runtime's CPU kernels compute FP16 ops in
FP32, so the CPU validation gate cannot see such an overflow; this audit can.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import onnxruntime_errors
from .interrupts import checkpoint

FP16_MAX = float(np.finfo(np.float16).max)   # 65504
MARGIN = 2.0
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}


@dataclass(frozen=True)
class TensorRange:
    """The audit of one tensor: ``peak`` is the larger of max |x| and an LRN's window sum."""

    tensor: str
    op: str
    max_abs: float
    window_sum_sq: float | None = None   # LRN only: the largest sum of squares over its window

    @property
    def peak(self) -> float:
        return max(self.max_abs, self.window_sum_sq or 0.0)

    @property
    def near_limit(self) -> bool:
        """True when the tensor itself comes within MARGIN times of FP16's largest value
        (an LRN's window sum is internal to it: LRN is float32 anyway)."""
        return self.max_abs * MARGIN > FP16_MAX


def _lrn_window_sum_sq(x: np.ndarray, size: int) -> float:
    """Largest sum of x^2 over an LRN window across channels (ONNX's window: c-(size-1)//2 ..
    c+ceil((size-1)/2)), computed in float64."""
    squares = np.square(x.astype(np.float64))
    channels = squares.shape[1]
    cumulative = np.concatenate([np.zeros_like(squares[:, :1]), np.cumsum(squares, axis=1)], axis=1)
    lo = np.clip(np.arange(channels) - (size - 1) // 2, 0, channels)
    hi = np.clip(np.arange(channels) + (size - 1) - (size - 1) // 2 + 1, 0, channels)
    return float((cumulative[:, hi] - cumulative[:, lo]).max())


def _exposed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.NodeProto]]:
    """A copy of ``model`` whose float node outputs are all graph outputs; producer of each."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    producers = {}
    for node in exposed.graph.node:
        for name in node.output:
            if name and types.get(name) in _FLOATS:
                producers[name] = node
                if name not in existing:
                    exposed.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    return exposed, producers


def audit(model_path: Path, images: np.ndarray, batch: int = 4) -> list[TensorRange]:
    """Per float tensor of the model at ``model_path``, its range on ``images`` (uint8 NHWC)."""
    import onnxruntime as ort

    exposed, producers = _exposed(onnx.load(str(model_path)))
    lrn_sizes = {node.output[0]: next(a.i for a in node.attribute if a.name == "size")
                 for node in producers.values() if node.op_type == "LRN"}
    lrn_inputs = {node.input[0]: node.output[0] for node in producers.values() if node.op_type == "LRN"}
    with onnxruntime_errors(f"FP16 range audit: ONNX Runtime cannot load {model_path.name}"):
        session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs() if o.name in producers or o.name in lrn_inputs]
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4   # a failed run is said once, by the exception it raises
    peaks = dict.fromkeys(producers, 0.0)
    windows = dict.fromkeys(lrn_sizes, 0.0)
    for start in range(0, len(images), batch):
        checkpoint()
        with onnxruntime_errors(f"FP16 range audit: ONNX Runtime cannot run {model_path.name}"):
            outputs = session.run(names, {"images": images[start:start + batch]}, quiet)
        values = dict(zip(names, outputs, strict=True))
        for name, value in values.items():
            if name in peaks:
                peaks[name] = max(peaks[name], float(np.abs(value).max(initial=0.0)))
            if name in lrn_inputs:
                lrn = lrn_inputs[name]
                windows[lrn] = max(windows[lrn], _lrn_window_sum_sq(value, lrn_sizes[lrn]))
    return [TensorRange(name, producers[name].op_type, peaks[name], windows.get(name)) for name in producers]


def record(ranges: list[TensorRange], images: int, source: str, fp16_model: onnx.ModelProto,
           float32: dict[str, str]) -> dict:
    """The manifest's ``fp16_range`` entry: per tensor its range, its type in the FP16 file, and
    (``float32``, from :func:`kept_float32`) why it must not be FP16."""
    half = float16_tensors(fp16_model)
    return {"limit": FP16_MAX, "margin": MARGIN, "images": images, "source": source,
            "largest_fp16": max((r.max_abs for r in ranges if r.tensor in half), default=0.0),
            "tensors": [{**asdict(r), "near_limit": r.near_limit,
                         "fp16_file": "float16" if r.tensor in half else "float32", "float32": float32.get(r.tensor)}
                        for r in ranges]}


def float16_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the tensors a model computes in float16 (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name for v in [*inferred.graph.value_info, *inferred.graph.output]
            if v.type.tensor_type.elem_type == TensorProto.FLOAT16}


def kept_float32(fp16_model: onnx.ModelProto, ranges: list[TensorRange]) -> dict[str, str]:
    """For each audited tensor that must not be FP16 (LRN, or near the limit): why it is float32
    in ``fp16_model``, or why it could not be kept so (the caller reports those)."""
    half = float16_tensors(fp16_model)
    produced = {o for n in fp16_model.graph.node for o in n.output}
    out = {}
    for r in ranges:
        if r.op != "LRN" and not r.near_limit:
            continue
        why = (f"TensorRT runs LRN in float32 only (window sum of squares up to {r.peak:.4g})" if r.op == "LRN"
               else f"max |x| {r.max_abs:.4g} within {MARGIN:g}x of FP16's {FP16_MAX:g}")
        if r.tensor in half:
            out[r.tensor] = f"NOT kept float32 ({why}): the FP16 graph computes it in float16"
        elif r.tensor not in produced:
            out[r.tensor] = f"NOT kept float32 ({why}): the FP16 graph has no tensor of that name"
        else:
            out[r.tensor] = why
    return out
