"""Which machine an engine fits: one frozen identity, written by the build, compared by all.

A TensorRT engine runs only under the TensorRT version and on the GPU model it was
built for, and only for batch sizes in its optimisation profile. The build records
:class:`EngineIdentity` in the manifest; the build (to decide on a rebuild) and the
service (to refuse a stale engine) compare it field by field with :func:`current_identity`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import StaleEngineError

REBUILD = "rebuild with python -m engine_build build --tensorrt"


@dataclass(frozen=True)
class EngineIdentity:
    tensorrt: str                 # TensorRT version, e.g. "10.13.3.9"
    gpu: str                      # GPU name, e.g. "NVIDIA H200"
    compute_capability: str       # "major.minor", e.g. "9.0"
    min_batch: int = 1
    max_batch: int = 32

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict | None) -> EngineIdentity | None:
        """The identity a manifest recorded; None when it is missing or incomplete."""
        if not isinstance(record, dict) or any(record.get(f.name) in (None, "") for f in fields(cls)):
            return None
        return cls(**{f.name: record[f.name] for f in fields(cls)})

    def describe(self) -> str:
        return (f"{self.gpu} (sm {self.compute_capability}), TensorRT {self.tensorrt}, "
                f"batch {self.min_batch}..{self.max_batch}")


_LABELS = {"tensorrt": "TensorRT", "gpu": "GPU", "compute_capability": "compute capability"}


def current_identity(min_batch: int = 1, max_batch: int = 32, device: int = 0) -> EngineIdentity:
    """This machine's TensorRT version and GPU, with the batch range asked for."""
    import tensorrt as trt

    from .cuda_memory import gpu_info
    gpu = gpu_info(device)
    return EngineIdentity(trt.__version__, gpu.name, gpu.compute_capability, min_batch, max_batch)


def staleness(recorded: dict | None, current: EngineIdentity, exact_batch: bool = True) -> str | None:
    """Why an engine recorded as ``recorded`` does not fit ``current``, or None if it does.

    ``exact_batch``: the build wants the very batch range asked for; the service only needs
    its largest batch inside the engine's range (larger batches would run in parts).
    """
    built = EngineIdentity.from_dict(recorded)
    if built is None:
        return "the manifest records no complete engine identity (TensorRT, GPU, compute capability, batch range)"
    for key, label in _LABELS.items():
        if getattr(built, key) != getattr(current, key):
            return f"built for {label} {getattr(built, key)}, this machine has {getattr(current, key)}"
    if exact_batch and (built.min_batch, built.max_batch) != (current.min_batch, current.max_batch):
        return (f"built for batch {built.min_batch}..{built.max_batch}, "
                f"{current.min_batch}..{current.max_batch} requested")
    if not exact_batch and not built.min_batch <= current.max_batch <= built.max_batch:
        return f"built for batch {built.min_batch}..{built.max_batch}, batches of {current.max_batch} requested"
    return None


def check_engine(recorded: dict | None, current: EngineIdentity, exact_batch: bool = False) -> None:
    """Raise StaleEngineError (one line) when the engine does not fit this machine."""
    reason = staleness(recorded, current, exact_batch)
    if reason:
        raise StaleEngineError(f"engine.plan is stale ({reason}); {REBUILD}")
