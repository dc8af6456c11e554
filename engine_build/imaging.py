"""Bytes -> 256x256 BGR uint8, the way the service and every build step see an image.

Pure function over bytes: header probe (Pillow, no pixel decode) for the guards, then
OpenCV ``imdecode`` (EXIF orientation applied; grayscale, alpha, 16-bit and CMYK
normalised to 8-bit BGR), JPEG decoded at reduced scale when it is at least twice the
target in both dimensions, then a bilinear resize to 256x256 without keeping the
aspect ratio, as the authors did. Failures raise :class:`DecodeError` with a short
``reason`` code that becomes the dead-letter header.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DecodeError
from .preprocess import IMAGE_SIZE

Image.MAX_IMAGE_PIXELS = None   # we apply our own limit before any pixel is decoded
FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpeg"}
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 64_000_000
    reduced_decode: bool = True


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    scale: int          # JPEG reduced-decode factor used (1 = full)


def probe(data: bytes, limits: DecodeLimits = DecodeLimits()) -> ImageInfo:
    """Format and declared size from the header alone; applies the size guards."""
    if not data:
        raise DecodeError("empty", "message has no bytes")
    if len(data) > limits.max_bytes:
        raise DecodeError("too_large", f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = im.format, im.size
    except UnidentifiedImageError as exc:
        raise DecodeError("not_an_image", "bytes are not a recognised image format") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DecodeError("corrupt", f"unreadable image header: {exc}") from exc
    if fmt not in FORMATS:
        raise DecodeError("unsupported_format", f"{fmt} images are not accepted (JPEG, PNG, WebP, BMP, TIFF)")
    if width <= 0 or height <= 0:
        raise DecodeError("corrupt", f"declared size {width}x{height} is empty")
    if width * height > limits.max_pixels:
        raise DecodeError("too_many_pixels",
                          f"declared {width}x{height} = {width * height} pixels exceeds {limits.max_pixels}")
    fmt = FORMATS[fmt]
    if fmt == "jpeg" and data.rfind(b"\xff\xd9") < 0:
        raise DecodeError("truncated", "JPEG has no end-of-image marker")
    if fmt == "png" and data.rfind(b"IEND") < 0:
        raise DecodeError("truncated", "PNG has no IEND chunk")
    scale = 1
    if fmt == "jpeg" and limits.reduced_decode:
        for factor, _ in _REDUCED:
            if width >= 2 * IMAGE_SIZE and height >= 2 * IMAGE_SIZE and min(width, height) // factor >= IMAGE_SIZE:
                scale = factor
                break
    return ImageInfo(fmt, width, height, scale)


def decode(data: bytes, limits: DecodeLimits = DecodeLimits(), info: ImageInfo | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 BGR [256, 256, 3]; ``info``: what :func:`probe` read of ``data`` with
    ``limits`` already (the service reads each header once), else it is read here."""
    info = info or probe(data, limits)
    flag = dict(_REDUCED).get(info.scale, cv2.IMREAD_COLOR)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as exc:
        raise DecodeError("corrupt", f"OpenCV could not decode the {info.format}: {str(exc).strip()[:120]}") from exc
    if image is None:
        raise DecodeError("corrupt", f"OpenCV could not decode the {info.format} ({info.width}x{info.height})")
    if image.dtype != np.uint8:   # defensive: IMREAD_COLOR already yields 8-bit
        image = cv2.convertScaleAbs(image, alpha=255.0 / np.iinfo(image.dtype.name).max)
    return cv2.resize(image, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# The built-in photos in two disjoint halves, so that the gate never checks INT8 on the
# photos it was calibrated on. Each half mixes scenes, textures and grayscale images.
CALIBRATION_PHOTOS = ("astronaut", "brick", "chelsea", "coins", "grass", "hubble_deep_field", "ihc", "text")


def builtin_photos(subset: str | None = None) -> list[Path]:
    """The real photos shipped with the package (see photos/ATTRIBUTION.md).

    ``subset``: None for all, ``"calibration"`` or ``"validation"`` for one of the two disjoint halves.
    """
    photos = list_images(Path(__file__).parent / "photos")
    if subset is None:
        return photos
    if subset not in ("calibration", "validation"):
        raise ValueError(f"subset must be 'calibration' or 'validation', not {subset!r}")
    return [p for p in photos if (p.stem in CALIBRATION_PHOTOS) == (subset == "calibration")]


def view_names(paths: list[Path]) -> list[str]:
    """Names of the views :func:`photo_views` makes, in its order (``chelsea.jpg#0`` is the whole photo)."""
    return [f"{Path(p).name}#{i}" for p in paths for i in range(VIEWS_PER_PHOTO)]


VIEWS_PER_PHOTO = 6


def photo_views(paths: list[Path]) -> np.ndarray:
    """Each photo decoded whole plus four overlapping quarter views and a mirror.

    Turns a handful of real photos into a few dozen distinct real inputs for
    calibration and validation. Returns uint8 [6 * len(paths), 256, 256, 3].
    """
    views = []
    for path in paths:
        data = Path(path).read_bytes()
        views.append(decode(data))
        full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if full is None:   # decode() above read it, so only a reduced-size decode could have worked
            raise DecodeError("corrupt", f"OpenCV could not decode {path} at full size")
        h, w = full.shape[:2]
        for top, left in ((0, 0), (0, w // 3), (h // 3, 0), (h // 3, w // 3)):
            crop = full[top:top + 2 * h // 3, left:left + 2 * w // 3]
            views.append(cv2.resize(crop, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR))
        views.append(views[-5][:, ::-1])
    return np.ascontiguousarray(np.stack(views))
