from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine_build.imaging import builtin_photos, decode

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "sentiment_deploy.prototxt").exists():
        pytest.skip(f"the shared reference folder is absent ({REFERENCE})")
    return REFERENCE


@pytest.fixture(scope="session")
def photos() -> np.ndarray:
    """The built-in real photos, decoded to uint8 BGR [10, 256, 256, 3]."""
    return np.stack([decode(p.read_bytes()) for p in builtin_photos()])


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> tuple[Path, Path]:
    """A quarter-width CaffeNet-Twitter placeholder (same layer types, fast to write)."""
    from engine_build.placeholder import write_placeholder
    return write_placeholder(tmp_path_factory.mktemp("small"), width=0.25, seed=1)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """``build(folder)`` run once for the whole test run, however many xdist workers need it: the first
    worker builds under a lock in the run's shared temp folder, the others wait and take its folder.
    For read-only inputs (a test that changes one works on a copy)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent      # the run's folder above every worker's own
    out, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # released when the file closes
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)   # a worker that failed half-way
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def small_artifact(small_model, tmp_path_factory) -> Path:
    """Every variant of the small model. Its random quarter-width layers are far more sensitive to INT8
    than a trained net (NNCF's file: max |dp| about 0.05 on the validation photos, beyond the default
    0.035), so the gate is widened here: the tests that use this artifact test the service and the
    runtimes; INT8 accuracy is tested in test_int8_gate.py. The INT8 layers kept in float are named
    (the logits layer): what the sensitivity pass chooses for this model, so the same files byte for byte
    (checked by sha256), without the pass's probes (about 9 s of the build's 14)."""
    from engine_build.cli import main

    def build(out: Path) -> None:
        assert main(["build", "--prototxt", str(small_model[0]), "--caffemodel", str(small_model[1]),
                     "--output", str(out / "artifact"), "--int8-max-diff", "0.1", "--int8-mean-diff", "0.02",
                     "--int8-float-layers", "fc8_twitter"]) == 0
    return built_once(tmp_path_factory, "small-artifact", build) / "artifact"


@pytest.fixture(scope="session")
def full_model(tmp_path_factory) -> tuple[Path, Path]:
    """Full-size placeholder (57M weights, ~217 MiB), written once per test run."""
    from engine_build.placeholder import write_placeholder
    folder = built_once(tmp_path_factory, "full-model", lambda out: write_placeholder(out, seed=0))
    return folder / "deploy.prototxt", folder / "placeholder.caffemodel"


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """A real Kafka-protocol broker (tansu, in memory) on a free loopback port."""
    from stream.embedded_broker import EmbeddedBroker
    broker = EmbeddedBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    yield broker
    broker.kill()   # in memory, nothing to keep: its graceful stop took 3-5 s of every session


@pytest.fixture(params=["kafka-python", "librdkafka"])
def kafka_client(request) -> str:
    """Each Kafka client the service can run (--kafka-client), for tests that hold for both."""
    return request.param


@pytest.fixture
def trt_double():
    """The TensorRT/cuda-python test double (tests/trt_double.py) installed in sys.modules;
    yields its Machine (GPU, versions, memory, what ran)."""
    from tests import trt_double as double
    replaced = double.install()
    try:
        yield double.machine()
    finally:
        double.uninstall(replaced)


BROKEN_PLUGINS = {   # name -> (entry point target, what the user's one line says)
    "missingmod": ("no_such_module_xyz:Codec", "No module named 'no_such_module_xyz'"),
    "missingattr": ("userplugs:NoSuchClass", "has no attribute 'NoSuchClass'"),
    "syntaxerr": ("userplugs_broken:Codec", "SyntaxError: invalid syntax"),
    "raisesinit": ("userplugs:RaisesInInit", "making RaisesInInit failed (RuntimeError: no /etc/mycodec.yaml)"),
    "nomethod": ("userplugs:NoMethod", "NoMethod has no unpack() method"),
}


@pytest.fixture
def broken_plugins(tmp_path, monkeypatch):
    """An installed package (a dist-info on sys.path) declaring the input codecs of :data:`BROKEN_PLUGINS`,
    each broken its own way, and one that works (``upper``)."""
    import importlib
    import sys
    dist = tmp_path / "userplugs-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userplugs\nVersion: 1.0\n")
    points = "".join(f"{name} = {target}\n" for name, (target, _) in BROKEN_PLUGINS.items())
    (dist / "entry_points.txt").write_text(f"[sentiment_stream.input_codecs]\nupper = userplugs:Upper\n{points}")
    (tmp_path / "userplugs.py").write_text(
        "class Upper:\n    def unpack(self, value, headers):\n        return value, {}\n"
        "class RaisesInInit:\n    def __init__(self):\n"
        "        raise RuntimeError('no /etc/mycodec.yaml\\nsecond line')\n"
        "class NoMethod:\n    pass\n")
    (tmp_path / "userplugs_broken.py").write_text("def broken(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield BROKEN_PLUGINS
    for module in ("userplugs", "userplugs_broken"):
        sys.modules.pop(module, None)
