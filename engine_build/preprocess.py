"""The authors' preprocessing, as plain facts and a numpy reference.

The model input is a batch of 256x256 BGR uint8 images (the resize happens when the
image is decoded). From there ``caffe.Classifier`` as configured by the authors:
per-channel ILSVRC-2012 mean subtracted (BGR), then either the centre 227x227 crop or
the 10 oversampling crops (4 corners + centre, then the same 5 mirrored), with the
softmax probabilities averaged over the crops.
"""
from __future__ import annotations

import numpy as np

IMAGE_SIZE = 256
CROP_SIZE = 227
# ILSVRC-2012 mean image averaged per channel, BGR order (authors' evaluation script).
MEAN_BGR = (104.0069879317889, 116.66876761696767, 122.6789143406786)
LABELS = ("negative", "positive")


def crop_origins(oversample: bool, image: int = IMAGE_SIZE, crop: int = CROP_SIZE) -> list[tuple[int, int, bool]]:
    """(row, col, mirrored) of each crop, in caffe.io.oversample's order.

    Centre offset follows Caffe's ``int(image/2 - crop/2)`` (14 for 256/227).
    """
    centre = int(image / 2.0 - crop / 2.0)
    if not oversample:
        return [(centre, centre, False)]
    far = image - crop
    plain = [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]
    return [(r, c, False) for r, c in plain] + [(r, c, True) for r, c in plain]


def reference_crops(images: np.ndarray, oversample: bool) -> np.ndarray:
    """Mean-subtracted NCHW float32 crops, crop-major: shape [n_crops * N, 3, 227, 227].

    A direct numpy statement of the protocol; the ONNX graph must match it.
    """
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N,{IMAGE_SIZE},{IMAGE_SIZE},3], got {images.dtype} {images.shape}")
    centred = images.astype(np.float32) - np.asarray(MEAN_BGR, dtype=np.float32)
    crops = []
    for row, col, mirrored in crop_origins(oversample):
        crop = centred[:, row:row + CROP_SIZE, col:col + CROP_SIZE, :]
        if mirrored:
            crop = crop[:, :, ::-1, :]
        crops.append(crop)
    return np.ascontiguousarray(np.concatenate(crops).transpose(0, 3, 1, 2))

