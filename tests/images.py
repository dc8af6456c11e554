"""Encoded test images made from the built-in real photos: good ones of every accepted
format and pixel layout, and bad ones of each kind the service must dead-letter.

Each set is encoded once per test session (a few hundred milliseconds, the 2048x1536
resize most of it) and handed out as a fresh dict, so a caller may change its copy."""
from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "engine_build" / "photos").glob("*.jpg"))


def photo(which: int | str = 0) -> np.ndarray:
    """A built-in photo by index or by name (``"chelsea"``)."""
    path = next(p for p in PHOTOS if p.stem == which) if isinstance(which, str) else PHOTOS[which % len(PHOTOS)]
    return cv2.imread(str(path), cv2.IMREAD_COLOR)


def encode(image: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, data = cv2.imencode(ext, image, params or [])
    assert ok
    return data.tobytes()


def good_images() -> dict[str, bytes]:
    """name -> encoded bytes, one of every accepted format and pixel layout."""
    return dict(_good_images())


@functools.cache
def _good_images() -> dict[str, bytes]:
    base = photo(0)
    gray = cv2.cvtColor(photo(2), cv2.COLOR_BGR2GRAY)
    alpha = cv2.cvtColor(photo(3), cv2.COLOR_BGR2BGRA)
    alpha[:, :, 3] = 128
    sixteen = (photo(4).astype(np.uint16) * 257)
    cmyk = io.BytesIO()
    Image.fromarray(cv2.cvtColor(photo(5), cv2.COLOR_BGR2RGB)).convert("CMYK").save(cmyk, "JPEG")
    big = cv2.resize(photo(0), (2048, 1536), interpolation=cv2.INTER_CUBIC)
    return {
        **{f"jpeg_{p.stem}": p.read_bytes() for p in PHOTOS},
        "png": encode(base, ".png"),
        "webp": encode(base, ".webp"),
        "bmp": encode(base, ".bmp"),
        "tiff": encode(base, ".tiff"),
        "gray_png": encode(gray, ".png"),
        "alpha_png": encode(alpha, ".png"),
        "png16": encode(sixteen, ".png"),
        "cmyk_jpeg": cmyk.getvalue(),
        "jpeg_2048": encode(big, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
    }


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge size (a decompression bomb's calling card)."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8), ".png"))
    ihdr = 8 + 8                                         # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected error.reason)."""
    return dict(_bad_images())


@functools.cache
def _bad_images() -> dict[str, tuple[bytes, str]]:
    jpeg = PHOTOS[0].read_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    return {
        "text": (b"hello, I am not a picture", "not_an_image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "bomb_png": (png_declaring(100_000, 100_000), "too_many_pixels"),
        "gif": (gif.getvalue(), "unsupported_format"),
        "empty": (b"", "empty"),
    }
