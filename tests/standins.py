"""A model stand-in for service tests that do not test the model: handed to ``stream.app.build(model=...)``
in place of an opened artifact, so those tests neither compile nor run a network."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from engine_build.artifact import Selection
from engine_build.manifest import FORMAT, Manifest
from engine_build.runtime.base import Backend, Outputs

MANIFEST = Manifest.from_dict({"format": FORMAT, "model": {"name": "stand-in", "placeholder": True}})
SELECTION = Selection("stand-in", "fp32", Path("stand-in"), True, "a test's stand-in for the model", "0" * 64)
ARTIFACT = Path("stand-in")   # the config's --artifact for a service handed the stand-in: never opened


class PixelModel(Backend):
    """Two scores from each image's mean brightness: cheap, deterministic, different per image.
    ``delay_s``: how long each batch takes, as a slow device's would."""

    name = "stand-in"

    def __init__(self, delay_s: float = 0.0, concurrency: int = 1, max_batch: int = 64) -> None:
        super().__init__(SELECTION.file, "fp32", max_batch)
        self.delay_s, self.concurrency = delay_s, concurrency

    def _infer_impl(self, images: np.ndarray) -> Outputs:
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        positive = images.mean(axis=(1, 2, 3), dtype=np.float64) / 255
        probs = np.stack([1 - positive, positive], axis=1).astype(np.float32)
        return Outputs(probs, np.log(np.clip(probs, 1e-6, 1.0)))


def stand_in(backend: Backend | None = None) -> tuple[Manifest, Selection, Backend]:
    """What ``open_artifact`` returns, with ``backend`` (a :class:`PixelModel` by default) as the model."""
    return MANIFEST, SELECTION, backend or PixelModel()
