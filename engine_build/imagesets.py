"""Calibration and validation images: decoded, named, and fingerprinted per source file.

INT8 is calibrated on one set and judged on another; the two may share no source file
(compared by sha256), so the gate never checks the calibration set against itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, DecodeError
from .imaging import builtin_photos, decode, list_images, photo_views, view_names
from .interrupts import checkpoint
from .manifest import ImagesUsed, sha256


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray        # uint8 [N, 256, 256, 3] BGR
    names: list[str]          # one per image: the file name, or file#view for built-in photos
    source: str               # where they came from, for people
    files: dict[str, str]     # source file name -> sha256, for the manifest

    def record(self) -> ImagesUsed:
        """What the manifest keeps: the source, the count and the sha256 of every source file."""
        return ImagesUsed(self.source, int(len(self.images)), dict(self.files))


def builtin_set(subset: str) -> ImageSet:
    """Views of one half of the built-in photos (``calibration`` or ``validation``)."""
    paths = builtin_photos(subset)
    return ImageSet(photo_views(paths), view_names(paths),
                    f"built-in {subset} photos (engine_build/photos, 6 views each)",
                    {p.name: sha256(p) for p in paths})


def image_files(folder: Path, flag: str) -> list[Path]:
    """The image files in ``folder`` (not read); a missing folder or one without images is a one-line error."""
    if not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: no such folder")
    paths = list_images(folder)
    if not paths:
        raise ConfigError(f"{flag} {folder}: no JPEG/PNG/WebP/BMP/TIFF files there")
    return paths


def folder_set(folder: Path, flag: str) -> ImageSet:
    """Every image file in ``folder``; a file that does not decode is a one-line error naming it."""
    folder = Path(folder)
    paths = image_files(folder, flag)
    images = []
    for path in paths:
        checkpoint()
        try:
            images.append(decode(path.read_bytes()))
        except (OSError, DecodeError) as exc:
            raise ConfigError(f"{flag} {folder}: {path.name} is not a usable image ({exc})") from exc
    return ImageSet(np.stack(images), [p.name for p in paths], str(folder), {p.name: sha256(p) for p in paths})


def load_sets(calibration: Path | None, validation: Path | None, need_calibration: bool,
              disjoint: bool = True) -> tuple[ImageSet | None, ImageSet]:
    """The calibration set (when needed) and the validation set, checked to be disjoint when
    ``disjoint`` (INT8 is calibrated on them; the FP16 range audit only reads them). A calibration
    folder given but not needed is checked all the same (it exists and holds images), not read."""
    cal = None
    if need_calibration:
        cal = folder_set(calibration, "--calibration-images") if calibration else builtin_set("calibration")
    elif calibration:
        image_files(Path(calibration), "--calibration-images")
    val = folder_set(validation, "--validation-images") if validation else builtin_set("validation")
    if cal is not None and disjoint:
        by_sha = {sha: name for name, sha in cal.files.items()}
        shared = [(name, by_sha[sha]) for name, sha in val.files.items() if sha in by_sha]
        if shared:
            examples = ", ".join(f"{v} = {c}" for v, c in shared[:3])
            raise ConfigError(f"{len(shared)} validation image(s) are also calibration images ({examples}): "
                              "the gate must judge INT8 on images it was not calibrated on")
    return cal, val
