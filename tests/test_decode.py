"""Decoding: every format and pixel layout becomes 256x256 BGR uint8; guards fire before allocation."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from engine_build.errors import DecodeError
from engine_build.imaging import DecodeLimits, decode, probe

from .images import PHOTOS, bad_images, encode, good_images, photo


@pytest.mark.parametrize("name", sorted(good_images()))
def test_good_inputs_become_256_bgr(name):
    image = decode(good_images()[name])
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert image.std() > 5, "a real photo, not a blank"


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_inputs_raise_with_reason(name):
    data, reason = bad_images()[name]
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.reason == reason


def test_size_guard_needs_no_decode():
    with pytest.raises(DecodeError) as info:
        decode(PHOTOS[0].read_bytes(), DecodeLimits(max_bytes=1000))
    assert info.value.reason == "too_large"


def test_matches_authors_resize_for_png():
    """Full decode + bilinear 256x256, aspect not kept, channels stay BGR."""
    original = photo(1)
    expected = cv2.resize(original, (256, 256), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(decode(encode(original, ".png")), expected)


def test_grayscale_becomes_three_equal_channels():
    image = decode(good_images()["gray_png"])
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])


def test_sixteen_bit_is_scaled_not_clipped():
    image = decode(good_images()["png16"])
    reference = cv2.resize(photo(4), (256, 256), interpolation=cv2.INTER_LINEAR)
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1


def test_large_jpeg_decodes_at_reduced_scale_close_to_full():
    data = good_images()["jpeg_2048"]
    assert probe(data).scale == 4              # 1536 // 4 = 384 >= 256 both ways
    reduced = decode(data).astype(float)
    full = decode(data, DecodeLimits(reduced_decode=False)).astype(float)
    assert np.abs(reduced - full).mean() < 6   # same picture; reduced decode averages blocks
    assert probe((PHOTOS[0].parent / "chelsea.jpg").read_bytes()).scale == 1   # 451x300: not twice the target
    assert probe(PHOTOS[0].read_bytes()).scale == 2    # astronaut, 512x512: exactly twice


def test_exif_orientation_is_applied():
    """A landscape photo stored with orientation 6 (rotate 90 CW) comes out portrait."""
    rgb = cv2.cvtColor(photo("chelsea"), cv2.COLOR_BGR2RGB)   # 451x300 landscape
    marker = rgb.copy()
    marker[:50, :50] = (255, 0, 0)                     # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(marker).save(buffer, "JPEG", exif=exif, quality=95)
    upright = cv2.imdecode(np.frombuffer(buffer.getvalue(), np.uint8), cv2.IMREAD_COLOR)
    assert upright.shape[0] > upright.shape[1], "rotated to portrait"
    # stored top-left ends at the top-right after a 90 degree clockwise turn
    assert upright[:40, -40:, 2].mean() > 200 and upright[:40, -40:, 0].mean() < 80
    image = decode(buffer.getvalue())
    assert image[:15, -15:, 2].mean() > 200
