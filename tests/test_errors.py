"""The one exception tree: foreign exceptions become ours at one boundary."""
from __future__ import annotations

import pytest

from engine_build.errors import ModelFormatError, onnxruntime_errors


def _onnxruntime_exceptions() -> list[type[BaseException]]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state
    found = [v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(found) >= 10, found      # Fail, InvalidArgument, InvalidGraph, NoSuchFile, RuntimeException, ...
    return found


@pytest.mark.parametrize("kind", _onnxruntime_exceptions(), ids=lambda kind: kind.__name__)
def test_every_onnxruntime_exception_becomes_one_line(kind):
    with pytest.raises(ModelFormatError) as info, onnxruntime_errors("ONNX Runtime cannot run model.onnx"):
        raise kind("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code\nmore detail")
    assert str(info.value) == "ONNX Runtime cannot run model.onnx: [ONNXRuntimeError] : 1 : FAIL : Non-zero status code"
    assert isinstance(info.value.__cause__, kind)


def test_other_exceptions_keep_their_own_class():
    """A bug (or ours, or an interrupt) raised inside is not ONNX Runtime's: it goes on as it was."""
    for exc in (ValueError("a bug"), KeyboardInterrupt(), ModelFormatError("ours")):
        with pytest.raises(type(exc)), onnxruntime_errors("ONNX Runtime cannot run model.onnx"):
            raise exc
