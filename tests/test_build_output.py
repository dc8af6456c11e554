"""Where a build writes and what it reads: ``--output`` on another file system, inputs inside the output,
inputs a build would not use, and which flag came from where."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import uuid
from pathlib import Path

import pytest

from engine_build.cli import main
from engine_build.manifest import read_manifest

PHOTOS = Path(__file__).resolve().parents[1] / "engine_build" / "photos"


def caffe(small_model: tuple[Path, Path]) -> list[str]:
    return ["--prototxt", str(small_model[0]), "--caffemodel", str(small_model[1])]


@pytest.fixture(scope="module")
def classifier(small_model, tmp_path_factory) -> bytes:
    """The small model as an ONNX classifier file's bytes (what ``--onnx`` takes)."""
    from engine_build.caffe_io import iter_caffemodel, load_prototxt
    from engine_build.caffe_net import attach_weights, build_net
    from engine_build.onnx_graph import build_classifier_onnx
    net = build_net(load_prototxt(small_model[0]))
    attach_weights(net, iter_caffemodel(small_model[1], progress=False))
    return build_classifier_onnx(net).SerializeToString()


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in folder.iterdir()}


# --- bug: --output on another file system --------------------------------------------------------------------


def test_a_build_into_a_symlink_to_another_file_system_publishes(small_model, tmp_path, capsys):
    """``--output`` linked to a folder on another file system (here /dev/shm): the staging folder sat beside the
    link, on this one, and the last step failed with 'Invalid cross-device link' after all the work."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's temp folder")
    target = shm / f"engine-build-test-{uuid.uuid4().hex[:8]}"
    target.mkdir()
    try:
        (tmp_path / "art").symlink_to(target)
        assert main(["build", *caffe(small_model), "--output", str(tmp_path / "art"), "--precision", "fp32"]) == 0, \
            capsys.readouterr().err
        assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "model.onnx"], "no staging folder left"
        assert [p.name for p in tmp_path.iterdir()] == ["art"]
        read_manifest(target)
    finally:
        shutil.rmtree(target)


def test_a_build_into_a_mount_point_publishes_and_replaces_the_previous_artifact(small_model, tmp_path,
                                                                                  monkeypatch, capsys):
    """``--output /artifacts`` on a Docker or Kubernetes volume: a mount point, where the kernel refuses every
    rename from outside it (EXDEV). Here os.replace and os.rename refuse as the kernel does across ``mnt``."""
    mount = (tmp_path / "mnt").resolve()
    mount.mkdir()
    (mount / "model.int8.onnx").write_bytes(b"an earlier build's")      # a file this build does not make
    real_replace, real_rename = os.replace, os.rename

    def across(real):
        def move(src, dst, *args, **kwargs):
            inside = [Path(os.path.abspath(p)).resolve().is_relative_to(mount) for p in (src, dst)]
            if inside[0] != inside[1]:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
            return real(src, dst, *args, **kwargs)
        return move
    monkeypatch.setattr(os, "replace", across(real_replace))
    monkeypatch.setattr(os, "rename", across(real_rename))
    assert main(["build", *caffe(small_model), "--output", str(mount), "--precision", "fp32"]) == 0, \
        capsys.readouterr().err
    assert sorted(p.name for p in mount.iterdir()) == ["manifest.json", "model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["mnt"], "no staging folder beside it"


def test_a_killed_builds_staging_folder_is_removed_by_the_next_build_but_a_running_ones_is_not(small_model,
                                                                                               tmp_path):
    """A build killed by SIGKILL or the OOM killer leaves its staging folder (326 MB for the full-size model)
    inside the output; the next build removes it at once (a rebuild seconds after an OOM kill kept it while it
    was under a minute old), but not one a running build holds, nor a .making-* folder under a minute old
    (its build may be between making it and locking it)."""
    out = tmp_path / "art"
    out.mkdir()
    dead, live, young, stale = (out / ".building-deadbeef", out / ".building-0badcafe", out / ".making-12345678",
                                out / ".making-87654321")
    for folder in (dead, live, young, stale):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"half written")
    os.utime(stale, (0, 0))
    held = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["build", *caffe(small_model), "--output", str(out), "--precision", "fp32"]) == 0
    finally:
        os.close(held)
    assert sorted(p.name for p in out.iterdir()) == [live.name, young.name, "manifest.json", "model.onnx"]


@pytest.mark.parametrize("new_output", [False, True])
def test_builds_starting_together_never_fail_each_other(tmp_path, new_output):
    """A build's clean-up locked another's young staging folder for a moment to read its age; when that fell
    between the other's mkdir and its own non-blocking lock, that build failed ('Resource temporarily
    unavailable': 2 of 12,000 entries from 4 processes). Now a folder is locked before it gets the name the
    clean-up looks at. Into an output none had made, one build removing it (empty, its own) between another's
    making it and making its staging folder in it failed that one (FileNotFoundError, 1-2 of 6,000)."""
    import multiprocessing
    out = tmp_path / "a" / "b" / "art" if new_output else tmp_path / "art"
    if not new_output:
        out.mkdir()
    with multiprocessing.get_context("fork").Pool(4) as pool:
        failures = sum(pool.map(_enter_staging, [(out, 1500)] * 4))
    assert failures == 0 and not list(out.glob(".*"))


def test_a_failed_build_keeps_a_folder_its_output_path_only_passed_through(tmp_path, monkeypatch):
    """--output new/../existing/out with new/ missing: the path's new/.. did not exist, so the clean-up counted
    it as made and removed existing/, an empty folder that was there before (a mount point, say)."""
    from engine_build.staging import staging_folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    with pytest.raises(RuntimeError), staging_folder(Path("new/../existing/out")):
        raise RuntimeError("the build failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and not list((tmp_path / "existing").iterdir())


def _enter_staging(job: tuple[Path, int]) -> int:
    from engine_build.staging import staging_folder
    out, times = job
    failures = 0
    for _ in range(times):
        try:
            with staging_folder(out):
                pass
        except OSError:
            failures += 1
    return failures


def test_a_failed_build_removes_the_output_folders_it_made(tmp_path, capsys):
    """Only the last folder was removed: --output a/b/c left a/b behind."""
    out = tmp_path / "a" / "b" / "c"
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    assert main(["build", "--onnx", str(tmp_path / "bad.onnx"), "--output", str(out), "--precision", "fp32"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


# --- bug: inputs inside the output --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["input-in-output", "input-linked-from-elsewhere", "output-linked-to-inputs",
                                    "input-a-file-the-build-deletes"])
def test_an_input_the_build_would_overwrite_or_delete_is_refused_before_any_work(classifier, tmp_path, layout,
                                                                                capsys):
    """``--onnx x/model.onnx --output x`` replaced the user's classifier with the wrapped artifact (exit 0; a
    rerun then failed); an input named like a file the build does not make was deleted. Symlinks resolved."""
    folder = tmp_path / "x"
    folder.mkdir()
    name = "model.int8.onnx" if layout == "input-a-file-the-build-deletes" else "model.onnx"
    (folder / name).write_bytes(classifier)
    given, output = folder / name, folder
    if layout == "input-linked-from-elsewhere":
        given = tmp_path / "classifier.onnx"
        given.symlink_to(folder / name)
    elif layout == "output-linked-to-inputs":
        output = tmp_path / "out"
        output.symlink_to(folder)
    before = contents(folder)
    assert main(["build", "--onnx", str(given), "--output", str(output), "--precision", "fp32"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--onnx {given}: the build would overwrite or delete it" in err, err
    assert contents(folder) == before, "the input is as it was, and nothing was written"


def test_caffe_files_the_build_would_overwrite_are_refused(small_model, tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    shutil.copy(small_model[1], out / "model.fp16.onnx")     # an odd name, but the user's file
    before = contents(out)
    assert main(["build", "--prototxt", str(small_model[0]), "--caffemodel", str(out / "model.fp16.onnx"),
                 "--output", str(out), "--precision", "fp32"]) == 1
    assert "--caffemodel" in capsys.readouterr().err and contents(out) == before


# --- bug: --output "" ---------------------------------------------------------------------------------------


def test_an_empty_output_flag_is_refused_like_an_empty_environment_twin(small_model, tmp_path, monkeypatch,
                                                                        capsys):
    """``--output "$OUT"`` with OUT unset built into the current folder and deleted the artifact-named files
    there; ``ENGINE_BUILD_OUTPUT=`` already said 'missing --output'."""
    monkeypatch.chdir(tmp_path)
    for name in ("model.int8.onnx", "engine.plan"):
        (tmp_path / name).write_bytes(b"someone's")
    before = contents(tmp_path)
    assert main(["build", *caffe(small_model), "--output", "", "--precision", "fp32"], {}) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--output is empty" in err, err
    assert contents(tmp_path) == before
    assert main(["build", *caffe(small_model), "--precision", "fp32"], {"ENGINE_BUILD_OUTPUT": ""}) == 1
    assert "missing --output (or ENGINE_BUILD_OUTPUT)" in capsys.readouterr().err


# --- bug: inputs a build would not use were not checked -----------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["--calibration-images", "/definitely/not/here"], "--calibration-images /definitely/not/here: no such folder"),
    (["--calibration-images", "{empty}"], "no JPEG/PNG/WebP/BMP/TIFF files there"),
    (["--int8-float-layers", "fc7 fc8"], "--int8-float-layers 'fc7 fc8': a layer name has no spaces"),
])
def test_every_given_input_is_checked_before_any_work_whatever_the_precision(small_model, tmp_path, extra,
                                                                             message, capsys):
    """An fp32 build ignored a missing --calibration-images; docs: 'Every input file and folder is checked
    before any work'. A malformed --int8-float-layers is refused before any work too."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "never"
    extra = [e.replace("{empty}", str(tmp_path / "empty")) for e in extra]
    assert main(["build", *caffe(small_model), "--output", str(out), "--precision", "fp32", *extra]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1, captured.err
    assert not out.exists() and "importing" not in captured.out, "refused before any work"


@pytest.mark.parametrize("precisions", [["fp32"], ["fp32", "fp16", "int8"]])
def test_an_unknown_int8_float_layer_is_refused_right_after_the_import(small_model, tmp_path, precisions, capsys):
    """A layer the model lacks was ignored by an fp32 build, and refused only after the FP16 range audit (and,
    for a full-size model, minutes of work) by an int8 one: now right after the FP32 model is made."""
    out = tmp_path / "never"
    assert main(["build", *caffe(small_model), "--output", str(out), "--precision", *precisions,
                 "--int8-float-layers", "fc9"]) == 1
    captured = capsys.readouterr()
    assert "--int8-float-layers fc9: not a quantisable layer of model.onnx" in captured.err, captured.err
    assert "writing model.onnx" in captured.out and "FP16 range audit" not in captured.out, captured.out
    assert not out.exists()


# --- bug: the environment twin unnamed in a combination error -----------------------------------------------


def test_a_combination_error_names_the_environment_twin_a_value_came_from(small_model, tmp_path, capsys):
    """ENGINE_BUILD_ONNX set and --prototxt/--caffemodel given said only 'give either --prototxt and
    --caffemodel, or --onnx', leaving the user to find the variable (and the reverse)."""
    argv = ["build", "--output", str(tmp_path / "o")]
    assert main([*argv, *caffe(small_model)], {"ENGINE_BUILD_ONNX": "m.onnx"}) == 1
    err = capsys.readouterr().err
    assert "give either --prototxt and --caffemodel, or --onnx" in err and err.count("\n") == 1
    assert "--onnx from ENGINE_BUILD_ONNX" in err and "--prototxt from" not in err, err
    assert main([*argv, "--onnx", "m.onnx"], {"ENGINE_BUILD_PROTOTXT": str(small_model[0]),
                                             "ENGINE_BUILD_CAFFEMODEL": str(small_model[1])}) == 1
    err = capsys.readouterr().err
    assert "--prototxt from ENGINE_BUILD_PROTOTXT" in err and "--caffemodel from ENGINE_BUILD_CAFFEMODEL" in err
    assert "--onnx from" not in err and err.count("\n") == 1, err


# --- bug: the summary's claim about the validation images ---------------------------------------------------


def test_the_summary_says_so_when_the_validation_images_are_the_calibration_images(small_model, tmp_path, capsys):
    """An fp16 build may read one folder for both (the FP16 range audit only reads the calibration images),
    but the summary said 'none used for calibration'."""
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("coffee.jpg", "rocket.jpg"):
        shutil.copy(PHOTOS / name, images / name)
    assert main(["build", *caffe(small_model), "--output", str(tmp_path / "art"), "--precision", "fp32", "fp16",
                 "--calibration-images", str(images), "--validation-images", str(images)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("validation "))
    assert "none used for calibration" not in line and "2 source files, 2 of them also calibration images" in line, line
    assert main(["inspect", str(tmp_path / "art")]) == 0
    assert "2 of them also calibration images" in capsys.readouterr().out

