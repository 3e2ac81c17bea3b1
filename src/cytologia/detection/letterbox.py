"""Backend-neutral prediction plumbing: letterbox, network input, boxes back to image pixels, the batched loop.

Every detector backend sees an image identically (ultralytics' LetterBox rounding): the prediction loop of
:class:`cytologia.detection.base.Detector` and the inference pipeline use this module; it imports no backend's package
and not torch, so an Apache-only install uses it too. A backend brings only its network and the decoding of its raw
output (score threshold + NMS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from cytologia.data.images import decode, thread_map
from cytologia.errors import CytologiaInputError

PAD_VALUE = 114  # grey of the letterbox padding (ultralytics' value; YOLOX's mosaic canvas uses it too)


@dataclass(frozen=True)
class Frame:
    """How an image was put into the square network input: per-axis gain, padding (px) and its own size."""

    gain_x: float
    gain_y: float
    pad_x: int
    pad_y: int
    width: int
    height: int


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Frame]:
    """Resize ``image`` (H, W, 3) to fit a ``size`` square keeping its aspect, centred on grey 114.

    Rounding: new side ``round(side * gain)``, padding ``round((size - new) / 2 - 0.1)`` -- ultralytics' LetterBox,
    so boxes map back as its ``scale_boxes`` does."""
    h, w = image.shape[:2]
    gain = min(size / h, size / w)
    new_w, new_h = max(round(w * gain), 1), max(round(h * gain), 1)
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_x, pad_y = round((size - new_w) / 2 - 0.1), round((size - new_h) / 2 - 0.1)
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    out[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = image
    return out, Frame(new_w / w, new_h / h, pad_x, pad_y, w, h)


def to_input(batch: Sequence[np.ndarray], flip: bool = False) -> np.ndarray:
    """BGR uint8 squares -> the network input: float32 (B, 3, S, S) RGB in [0, 1], mirrored left-right if ``flip``."""
    x = np.stack(batch)[..., ::-1]  # BGR -> RGB
    if flip:
        x = x[:, :, ::-1]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def to_image_pixels(d: np.ndarray, frame: Frame, size: int, flipped: bool = False) -> np.ndarray:
    """Rows ``x1, y1, x2, y2, ...`` in network-input pixels (of the mirrored input when ``flipped``) -> the image's
    own pixels, clipped to it; changes and returns ``d`` (float64), other columns untouched."""
    if flipped:
        d[:, [0, 2]] = size - d[:, [2, 0]]
    d[:, [0, 2]] = np.clip((d[:, [0, 2]] - frame.pad_x) / frame.gain_x, 0, frame.width)
    d[:, [1, 3]] = np.clip((d[:, [1, 3]] - frame.pad_y) / frame.gain_y, 0, frame.height)
    return d


def map_back(dets: Sequence[np.ndarray], frames: Sequence[Frame], size: int, flipped: bool = False) -> list[np.ndarray]:
    """Per image rows ``x1, y1, x2, y2, ...`` in network-input pixels -> float64 arrays in each image's own pixels
    (:func:`to_image_pixels` with that image's frame)."""
    return [to_image_pixels(np.asarray(d, dtype=np.float64), f, size, flipped) for d, f in zip(dets, frames)]


def detect_in_batches(
    forward: Callable[[np.ndarray], Any],
    decode_output: Callable[[Any, list[Frame], bool], list[np.ndarray]],
    images: Sequence[str | Path],
    names: Sequence[str] | None,
    *,
    img_size: int,
    tta_flip: bool,
    batch_size: int,
    workers: int | None,
    columns: Sequence[str],
    types: dict[str, Any],
) -> pd.DataFrame:
    """Run ``forward`` over ``images`` in batches (decoding in ``workers`` threads) and ``decode_output(raw, frames,
    flipped)`` into per-image arrays in image pixels; one row per box: ``NAME``, the array's columns, ``tta``
    (``"none"``, or ``"hflip"`` for the mirrored pass) -- ``columns`` names them all, ``types`` sets their dtypes.
    An unreadable image is an error naming it."""
    paths = [Path(p) for p in images]
    names = [p.name for p in paths] if names is None else [str(n) for n in names]
    if len(names) != len(paths):
        raise CytologiaInputError(f"{len(names)} names for {len(paths)} images")
    if batch_size < 1:
        raise CytologiaInputError(f"batch_size={batch_size} must be >= 1")
    rows: list[tuple] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        boxed = thread_map(lambda p: letterbox(decode(p), img_size), chunk, workers)
        squares, frames = [b[0] for b in boxed], [b[1] for b in boxed]
        for flip in (False, True) if tta_flip else (False,):
            dets = decode_output(forward(to_input(squares, flip)), frames, flip)
            tag = "hflip" if flip else "none"
            for name, d in zip(names[start : start + batch_size], dets):
                rows += [(name, *r, tag) for r in d.tolist()]
    return pd.DataFrame(rows, columns=list(columns)).astype(types)
