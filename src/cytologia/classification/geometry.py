"""Crop and letterbox geometry, numpy and OpenCV only (no torch): what training feeds the classifiers and what the
inference pipeline computes the same way, so that an inference-only install (``cytologia[infer]``) cuts the same
crops. :mod:`cytologia.classification.crops` (datasets) and :mod:`cytologia.classification.fullimage` re-export them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from cytologia.errors import CytologiaInputError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # RGB, on the 0..1 scale (timm's defaults)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _box_floats(box: Sequence[float] | np.ndarray) -> tuple[float, float, float, float]:
    values = np.asarray(box, dtype=np.float64).reshape(-1)
    if values.size != 4:
        raise CytologiaInputError(f"box {list(values)}: expected 4 values x1, y1, x2, y2")
    x1, y1, x2, y2 = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise CytologiaInputError(f"box ({x1}, {y1}, {x2}, {y2}): coordinates must be finite")
    if x2 < x1 or y2 < y1:
        raise CytologiaInputError(f"box ({x1}, {y1}, {x2}, {y2}): inverted (x2 < x1 or y2 < y1)")
    return x1, y1, x2, y2


def crop_box_with_margin(
    box: Sequence[float] | np.ndarray, margin: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """Integer pixel window ``(x1, y1, x2, y2)`` (x2, y2 exclusive) of ``box`` grown by ``margin`` px on every side.

    Float corners round outwards (floor / ceil); the window is clipped to the ``width`` x ``height`` image and holds
    at least one pixel, also for a degenerate box or one that lies outside the image.
    """
    if width < 1 or height < 1:
        raise CytologiaInputError(f"image size {width}x{height}: must be at least 1x1")
    if not math.isfinite(margin) or margin < 0:
        raise CytologiaInputError(f"margin {margin}: must be a finite number >= 0")
    x1, y1, x2, y2 = _box_floats(box)
    wx1 = min(max(math.floor(x1 - margin), 0), width - 1)
    wy1 = min(max(math.floor(y1 - margin), 0), height - 1)
    wx2 = max(min(math.ceil(x2 + margin), width), wx1 + 1)
    wy2 = max(min(math.ceil(y2 + margin), height), wy1 + 1)
    return wx1, wy1, wx2, wy2


def border_colour(image: np.ndarray) -> np.ndarray:
    """Per-channel median of the outermost rows and columns of ``image`` (the smear's background around a cell)."""
    ring = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)
    return np.median(ring.reshape(ring.shape[0], -1), axis=0)


def resize_interpolation(height: int, width: int, size: int) -> int:
    """``cv2.INTER_AREA`` when the crop loses pixels (``height * width > size**2``), else ``cv2.INTER_LINEAR``."""
    return cv2.INTER_AREA if height * width > size * size else cv2.INTER_LINEAR


def crop_and_locate(
    image: np.ndarray,
    box: Sequence[float] | np.ndarray,
    margin: float,
    size: int | None,
    *,
    keep_aspect: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`crop_with_margin` and where the cell box lies in the returned crop (float x1, y1, x2, y2, in the
    crop's pixel-edge coordinates, clipped to it) -- what :class:`~cytologia.classification.augment.BBoxAwareRotate`
    rotates."""
    if image.ndim not in (2, 3) or image.shape[0] < 1 or image.shape[1] < 1:
        raise CytologiaInputError(f"image of shape {image.shape}: expected a non-empty HW or HWC array")
    if size is not None and size < 1:
        raise CytologiaInputError(f"crop size {size}: must be >= 1")
    height, width = image.shape[:2]
    wx1, wy1, wx2, wy2 = crop_box_with_margin(box, margin, width, height)
    crop = image[wy1:wy2, wx1:wx2]
    h, w = crop.shape[:2]
    x1, y1, x2, y2 = _box_floats(box)
    cell = np.array([x1 - wx1, y1 - wy1, x2 - wx1, y2 - wy1], dtype=np.float64)
    cell = np.clip(cell, 0.0, [w, h, w, h])
    if size is None:
        return np.ascontiguousarray(crop), cell
    if keep_aspect and h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        colour = border_colour(crop)
        value = [float(v) for v in np.atleast_1d(colour)] + [0.0] * (4 - np.atleast_1d(colour).size)
        crop = cv2.copyMakeBorder(crop, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=value)
        cell += [left, top, left, top]
        h = w = side
    out = cv2.resize(crop, (size, size), interpolation=resize_interpolation(h, w, size))
    cell *= [size / w, size / h, size / w, size / h]
    return out, cell


def crop_with_margin(
    image: np.ndarray,
    box: Sequence[float] | np.ndarray,
    margin: float,
    size: int | None,
    *,
    keep_aspect: bool = False,
) -> np.ndarray:
    """The pixels of ``box`` plus ``margin`` px (see :func:`crop_box_with_margin`), resized to ``size`` x ``size``.

    ``size=None`` keeps the native resolution. By default the window is stretched to a square (what the winners
    did; cells are round, their boxes nearly square). ``keep_aspect=True`` first pads the short side, centred, with
    the crop's border colour (:func:`border_colour`), so the cell keeps its shape. Shrinking uses ``INTER_AREA``,
    enlarging ``INTER_LINEAR``. The channel order is the input's (BGR from OpenCV).
    """
    return crop_and_locate(image, box, margin, size, keep_aspect=keep_aspect)[0]


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` (HW or HWC) scaled so its long side is ``size`` and padded, centred, to ``size`` x ``size`` with its
    border colour (``INTER_AREA`` when shrinking, ``INTER_LINEAR`` when enlarging). A square image is only resized."""
    if image.ndim not in (2, 3) or image.shape[0] < 1 or image.shape[1] < 1:
        raise CytologiaInputError(f"image of shape {image.shape}: expected a non-empty HW or HWC array")
    h, w = image.shape[:2]
    return crop_with_margin(image, (0.0, 0.0, float(w), float(h)), 0, size, keep_aspect=True)
