"""A test run leaves nothing behind in the system temp folder when it passes (a full run used to leave
about 1.6 GB there: pytest kept every run's tmp_path folders)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = '''
import pytest

@pytest.fixture(scope="session")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "weights.bin"
    path.write_bytes(b"x" * (1 << 20))
    return path

def test_writes_into_its_tmp_path(model, tmp_path):
    (tmp_path / "artifact.bin").write_bytes(model.read_bytes())
'''


def test_a_passing_run_leaves_nothing_in_the_system_temp_folder(tmp_path):
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {**os.environ, "TMPDIR": str(system_temp), "PYTEST_DEBUG_TEMPROOT": str(system_temp)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "setup.cfg"), "--rootdir",
                             str(tmp_path), "-p", "no:cacheprovider", "-q", str(tmp_path / "test_sample.py")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    left = [p for p in system_temp.rglob("*") if p.is_file()]
    assert left == [], f"left behind: {left}"
