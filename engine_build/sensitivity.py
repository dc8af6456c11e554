"""Which layers INT8 leaves in float: a per-layer sensitivity pass on held-out calibration photos.

MinMax ranges fit the photos they were measured on, so the error that matters shows only
on photos outside them: an activation beyond its calibrated range is clipped, and rounding
costs more where activations or logits are larger. (ONNX Runtime's quantiser also quantises
the classifier's own output, the logits; on a full-size model with many near-ties that one
layer gave max |dp| 0.058 on unseen photos and 0.002 on the calibration photos.) The pass
therefore splits the calibration photos by source file into two folds and measures both
ways, ranges from one fold and error on the other, keeping the larger error: both folds lie
inside the calibration set, so the validation photos stay unseen until the gate. (One way
alone read 0.034 for a file whose other way read 0.058 and whose validation error was 0.059.)

The layers that compute the model's outputs start in float (``always_float``): clipping shows
only on photos whose logits leave the calibration photos' range, which the folds share.

1. Every other layer in int8: if the held-out error is within ``target``, that is the choice.
2. Otherwise one layer at a time in int8 (the rest in float), each against FP32.
3. The most sensitive layers go to float, one by one, until every other layer in int8 meets
   ``target`` on the held-out fold.

Each quantiser is probed with itself and measured on the runtime that serves its file (their
layers differ in sensitivity: on one model NNCF's fc6 and MinMax's conv1 led), and each INT8
file keeps its own choice in float.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imagesets import ImageSet
from .interrupts import checkpoint

log = logging.getLogger(__name__)
Quantizer = Callable[[Path, Path, np.ndarray, Sequence[str]], dict]


@dataclass(frozen=True)
class FloatChoice:
    """The outcome of the pass, as the manifest records it."""
    float_layers: tuple[str, ...]
    target: float
    first: float                             # held-out max |dp| with only the output layers in float
    chosen: float                            # held-out max |dp| with ``float_layers`` in float
    sensitivity: dict[str, float]            # layer -> held-out max |dp| with only it in int8 (step 2)
    output_layers: tuple[str, ...] = ()      # in float from the start
    folds: tuple[tuple[str, ...], ...] = ()  # source photos of each fold
    skipped: str = ""                        # why the pass did not run

    def record(self) -> dict:
        return {"float_layers": list(self.float_layers), "output_layers": list(self.output_layers),
                "target_max_abs_diff": self.target,
                "held_out_max_abs_diff": {"output_layers_in_float": _number(self.first),
                                          "chosen": _number(self.chosen)},
                "sensitivity": {k: _number(v) for k, v in self.sensitivity.items()},
                "folds": [list(fold) for fold in self.folds], **({"skipped": self.skipped} if self.skipped else {})}


def _number(value: float) -> float | None:
    """JSON has no NaN or infinity: a pass that did not run (or a NaN output) is null."""
    return round(value, 5) if np.isfinite(value) else None


def split_folds(images: ImageSet) -> tuple[tuple[np.ndarray, tuple[str, ...]], tuple[np.ndarray, tuple[str, ...]]]:
    """Two folds of ``images`` by source photo (``name#view`` shares its photo's fold), alternating in name order."""
    sources = sorted({name.split("#")[0] for name in images.names})
    fit_sources = set(sources[0::2])
    in_fit = np.array([name.split("#")[0] in fit_sources for name in images.names])
    held = tuple(s for s in sources if s not in fit_sources)
    return (images.images[in_fit], tuple(sorted(fit_sources))), (images.images[~in_fit], held)


def held_out_error(fp32: Path, quantize: Quantizer, runtime: str, layers: Sequence[str], float_layers: Sequence[str],
                   fit: np.ndarray, held: np.ndarray, reference: np.ndarray, workdir: Path) -> float:
    """max |dp| on ``held``, run on ``runtime``, of a file quantised on ``fit`` with ``float_layers`` in float."""
    from .runtime import open_backend
    from .validate import stoppable_infer
    path = workdir / "probe.int8.onnx"
    quantize(fp32, path, fit, [layer for layer in layers if layer in set(float_layers)])
    checkpoint()
    with open_backend(runtime, path, "int8", 16, exact=True) as backend:
        probs = stoppable_infer(backend, held).probs
    path.unlink()
    return float(np.nanmax(np.abs(probs - reference))) if not np.isnan(probs).any() else float("inf")


def greedy_float_layers(fixed: Sequence[str], candidates: Sequence[str], error: Callable[[Sequence[str]], float],
                        target: float, limit: float) -> tuple[tuple[str, ...], float, dict[str, float],
                                                               dict[tuple[str, ...], float]]:
    """Steps 1-3 over any ``error(float_layers)``: (choice, its error, per-layer sensitivity, every set tried).

    The choice is the first set (fewest layers in float) that meets ``target``; where none does,
    the fewest within ``limit`` (the gate's own bound); where none does either, the smallest error.
    """
    tried = {tuple(fixed): error(fixed)}
    if tried[tuple(fixed)] <= target:
        return tuple(fixed), tried[tuple(fixed)], {}, tried
    everything = [*fixed, *candidates]
    sensitivity = {layer: error([other for other in everything if other != layer]) for layer in candidates}
    ranked = sorted(candidates, key=lambda layer: -sensitivity[layer])
    kept = list(fixed)
    for layer in ranked[:-1]:          # at least one layer stays in int8
        kept.append(layer)
        tried[tuple(kept)] = error(kept)
        if tried[tuple(kept)] <= target:
            break
    best = next((chosen for chosen, found in tried.items() if found <= target), None) \
        or next((chosen for chosen, found in tried.items() if found <= limit), None) \
        or min(tried, key=tried.__getitem__)
    return best, tried[best], sensitivity, tried


def choose_float_layers(fp32: Path, calibration: ImageSet, target: float, limit: float, quantize: Quantizer,
                        runtime: str, layers: Sequence[str], workdir: Path,
                        always_float: Sequence[str] = ()) -> FloatChoice:
    """The fewest layers (most sensitive first) to keep in float so that ``quantize``'s file, run on
    ``runtime``, meets ``target`` on the held-out folds (see :func:`greedy_float_layers` for ``limit``)."""
    from .validate import reference_probs
    (one, one_names), (two, two_names) = split_folds(calibration)
    folds = (one_names, two_names)
    fixed = [layer for layer in layers if layer in set(always_float)]
    if not len(one) or not len(two):
        why = "the calibration set has one source photo, nothing to hold out"
        log.warning("INT8 sensitivity pass (%s) skipped: %s", runtime, why)
        return FloatChoice(tuple(fixed), target, float("nan"), float("nan"), {}, tuple(fixed), skipped=why)
    with tempfile.TemporaryDirectory(prefix="sensitivity-", dir=workdir) as tmp:
        references = reference_probs(fp32, one), reference_probs(fp32, two)

        def error(float_layers: Sequence[str]) -> float:
            probe = Path(tmp)
            found = max(held_out_error(fp32, quantize, runtime, layers, float_layers, one, two, references[1], probe),
                        held_out_error(fp32, quantize, runtime, layers, float_layers, two, one, references[0], probe))
            log.info("INT8 sensitivity (%s): %s in float: held-out max |dp| %.4f (target %.4f)", runtime,
                     ", ".join(float_layers) or "no layer", found, target)
            return found

        candidates = [layer for layer in layers if layer not in fixed]
        best, found, sensitivity, tried = greedy_float_layers(fixed, candidates, error, target, limit)
    if found > target:
        log.warning("INT8 sensitivity (%s): nothing tried met %.4f on the held-out folds; keeping %s in float "
                    "(%.4f); the gate decides", runtime, target, ", ".join(best), found)
    return FloatChoice(best, target, tried[tuple(fixed)], found, sensitivity, tuple(fixed), folds)
