"""Detector training augmentation (numpy / OpenCV, BGR uint8): letterbox, mosaic, random affine, mixup, flips, HSV.

One training sample (:class:`DetectionDataset`), as YOLOX trains:

1. with probability ``mosaic_prob`` a **mosaic**: the image and 3 random others, each resized to fit the output
   side ``S``, tiled around a random centre of a ``2S x 2S`` grey canvas; then a **random affine** (rotation,
   scale from ``mosaic_scale``, shear, translation) maps the canvas to ``S x S``; then, with probability
   ``mixup_prob``, **mixup**: another image, rescaled by a factor from ``mixup_scale`` and randomly cropped, blended
   50/50 with the mosaic, its boxes added;
2. otherwise (and always in the last epochs, when the trainer turns mosaic off) the **letterbox** of the image:
   resized to fit ``S``, centred on grey 114 -- exactly what prediction does;
3. then horizontal / vertical **flips** (cells have no up or down) and a small **HSV** jitter.

Boxes under the affine map are transformed as the *ellipse* inscribed in them, not as their four corners: a cell is
round, and the corner rule inflates the box of a rotated round cell (by ~15 % of its side at 10 degrees), which would
teach loose boxes -- the challenge scores box tightness (GIoU). A box is dropped when less than
``min_area_ratio`` of it stays in the image or a side falls under ``min_side`` px.

Randomness comes from a generator seeded by (seed, epoch, index): a sample is the same whatever the number of
loader workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from cytologia.data.images import decode
from cytologia.detection.letterbox import PAD_VALUE, Frame, letterbox


def to_frame(boxes: np.ndarray, frame: Frame) -> np.ndarray:
    """Image-pixel ``x1, y1, x2, y2`` boxes (n, 4) -> network-input pixels of the letterboxed image."""
    out = boxes.astype(np.float32).copy()
    out[:, [0, 2]] = out[:, [0, 2]] * frame.gain_x + frame.pad_x
    out[:, [1, 3]] = out[:, [1, 3]] * frame.gain_y + frame.pad_y
    return out


# ------------------------------------------------------------------------------------------------- transforms
@dataclass
class AugmentConfig:
    """Augmentation of detector training (``detector.train_args`` keys of the same names)."""

    mosaic_prob: float = 1.0
    mixup_prob: float = 1.0  # applied to mosaic samples only
    mosaic_scale: tuple[float, float] = (0.5, 1.5)  # scale range of the affine map after mosaic
    mixup_scale: tuple[float, float] = (0.5, 1.5)
    degrees: float = 10.0  # rotation range +- (cells are round: see the module docstring for how boxes follow)
    translate: float = 0.1  # fraction of the side
    shear: float = 2.0  # degrees
    flip_lr: float = 0.5
    flip_ud: float = 0.5  # cells have no up or down
    hsv_prob: float = 1.0
    # Additive HSV jitter ranges in OpenCV units (hue 0-180, saturation and value 0-255): small by default, stain
    # colour differs between centres and the detector should not learn a colour prior from jitter either way.
    hsv_gains: tuple[float, float, float] = (2.0, 10.0, 10.0)
    min_side: float = 2.0  # px: boxes smaller after augmentation are dropped
    min_area_ratio: float = 0.1  # fraction of a transformed box that must stay in the image


def filter_boxes(boxes: np.ndarray, full_area: np.ndarray, size: int, cfg: AugmentConfig) -> np.ndarray:
    """Clip ``x1, y1, x2, y2`` boxes to the ``size`` square; keep those with sides >= ``min_side`` and at least
    ``min_area_ratio`` of ``full_area`` (their area before clipping) inside."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32)
    clipped = np.clip(boxes, 0, size).astype(np.float32)
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (w >= cfg.min_side) & (h >= cfg.min_side) & (w * h >= cfg.min_area_ratio * np.maximum(full_area, 1e-6))
    return clipped[keep]


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def fit(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize ``image`` so that its longer side is ``size``; returns it and the scale."""
    h, w = image.shape[:2]
    r = size / max(h, w)
    if r != 1.0:
        image = cv2.resize(image, (max(round(w * r), 1), max(round(h * r), 1)), interpolation=cv2.INTER_LINEAR)
    return image, r


def mosaic(
    images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Tile 4 images (each fitted to ``size``) around a random centre of a ``2 size`` grey canvas; boxes follow and are
    cut to the visible part of their tile."""
    s2 = 2 * size
    canvas = np.full((s2, s2, 3), PAD_VALUE, dtype=np.uint8)
    xc, yc = (int(rng.uniform(0.5 * size, 1.5 * size)) for _ in range(2))
    out = []
    for k, (img, b) in enumerate(zip(images, boxes)):
        img, r = fit(img, size)
        h, w = img.shape[:2]
        # the tile's corner at the centre: k=0 top-left tile, 1 top-right, 2 bottom-left, 3 bottom-right
        x0 = xc - w if k in (0, 2) else xc
        y0 = yc - h if k in (0, 1) else yc
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, s2), min(y0 + h, s2)
        canvas[cy1:cy2, cx1:cx2] = img[cy1 - y0 : cy2 - y0, cx1 - x0 : cx2 - x0]
        if len(b):
            t = b.astype(np.float32) * r + np.array([x0, y0, x0, y0], np.float32)
            t[:, [0, 2]] = t[:, [0, 2]].clip(cx1, cx2)
            t[:, [1, 3]] = t[:, [1, 3]].clip(cy1, cy2)
            out.append(t[(t[:, 2] > t[:, 0]) & (t[:, 3] > t[:, 1])])
    return canvas, np.concatenate(out) if out else np.zeros((0, 4), np.float32)


def affine_matrix(
    src_center: tuple[float, float],
    size: int,
    rng: np.random.Generator,
    *,
    degrees: float,
    scale: tuple[float, float],
    shear: float,
    translate: float,
) -> np.ndarray:
    """A random 2x3 affine map: ``src_center`` to the origin, rotate + scale, shear, then to the centre of a
    ``size`` square shifted by up to ``translate * size``."""
    c = np.eye(3)
    c[0, 2], c[1, 2] = -src_center[0], -src_center[1]
    r = np.eye(3)
    r[:2] = cv2.getRotationMatrix2D((0, 0), rng.uniform(-degrees, degrees), rng.uniform(*scale))
    s = np.eye(3)
    s[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
    s[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    t = np.eye(3)
    t[0, 2] = size / 2 + rng.uniform(-translate, translate) * size
    t[1, 2] = size / 2 + rng.uniform(-translate, translate) * size
    return (t @ s @ r @ c)[:2]


def affine_boxes(boxes: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Boxes under the affine map ``m`` (2x3), each taken as its inscribed ellipse: the new box bounds the mapped
    ellipse (half-extents ``sqrt((m00 a)^2 + (m01 b)^2)``, ``sqrt((m10 a)^2 + (m11 b)^2)``)."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    a, b = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
    ncx = m[0, 0] * cx + m[0, 1] * cy + m[0, 2]
    ncy = m[1, 0] * cx + m[1, 1] * cy + m[1, 2]
    hx = np.hypot(m[0, 0] * a, m[0, 1] * b)
    hy = np.hypot(m[1, 0] * a, m[1, 1] * b)
    return np.stack((ncx - hx, ncy - hy, ncx + hx, ncy + hy), axis=1).astype(np.float32)


def random_affine(
    image: np.ndarray, boxes: np.ndarray, size: int, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` (the mosaic canvas, centred on its own centre) to a ``size`` square; boxes follow."""
    h, w = image.shape[:2]
    m = affine_matrix(
        (w / 2, h / 2),
        size,
        rng,
        degrees=cfg.degrees,
        scale=cfg.mosaic_scale,
        shear=cfg.shear,
        translate=cfg.translate,
    )
    out = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=(PAD_VALUE,) * 3)
    moved = affine_boxes(boxes, m)
    return out, filter_boxes(moved, _area(moved), size, cfg)


def mixup(
    image: np.ndarray,
    boxes: np.ndarray,
    other: np.ndarray,
    other_boxes: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``other`` (fitted to the side of ``image``, rescaled by a factor from ``mixup_scale``, maybe mirrored,
    placed at a random offset) 50/50 into ``image``; the boxes of both are kept."""
    size = image.shape[0]
    jitter = rng.uniform(*cfg.mixup_scale)
    other, r = fit(other, round(size * jitter))
    ob = other_boxes.astype(np.float32) * r
    if rng.random() < 0.5:
        other = other[:, ::-1]
        ob = ob.copy()
        ob[:, [0, 2]] = other.shape[1] - ob[:, [2, 0]]
    h, w = other.shape[:2]
    # random offset: inside the square when the image is smaller, covering the square when it is larger
    ox = int(rng.integers(min(0, size - w), max(size - w, 0) + 1))
    oy = int(rng.integers(min(0, size - h), max(size - h, 0) + 1))
    layer = np.full_like(image, PAD_VALUE)
    x1, y1, x2, y2 = max(ox, 0), max(oy, 0), min(ox + w, size), min(oy + h, size)
    layer[y1:y2, x1:x2] = other[y1 - oy : y2 - oy, x1 - ox : x2 - ox]
    shifted = ob + np.array([ox, oy, ox, oy], np.float32)
    kept = filter_boxes(shifted, _area(shifted), size, cfg)
    blended = (image.astype(np.float32) * 0.5 + layer.astype(np.float32) * 0.5).astype(np.uint8)
    return blended, np.concatenate([boxes.reshape(-1, 4).astype(np.float32), kept])


def flip(
    image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal and vertical flips of a square image and its boxes."""
    size = image.shape[1]
    boxes = boxes.copy()
    if rng.random() < cfg.flip_lr:
        image = image[:, ::-1]
        boxes[:, [0, 2]] = size - boxes[:, [2, 0]]
    if rng.random() < cfg.flip_ud:
        image = image[::-1]
        boxes[:, [1, 3]] = image.shape[0] - boxes[:, [3, 1]]
    return np.ascontiguousarray(image), boxes


def hsv_jitter(image: np.ndarray, rng: np.random.Generator, gains: Sequence[float]) -> np.ndarray:
    """Add a random offset in ``[-gain, gain]`` to hue (wrapping at 180), saturation and value (clipped)."""
    dh, ds, dv = (rng.uniform(-g, g) for g in gains)
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = np.mod(x + dh, 180).astype(np.uint8)
    lut_s = np.clip(x + ds, 0, 255).astype(np.uint8)
    lut_v = np.clip(x + dv, 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


# ------------------------------------------------------------------------------------------------------ dataset
@dataclass
class Sample:
    """One training image: its file and its boxes ``x1, y1, x2, y2`` (n, 4) in its own pixels (n may be 0)."""

    path: Path
    boxes: np.ndarray


class DetectionDataset(torch.utils.data.Dataset):
    """Training samples at side ``size`` (see the module docstring); item: (BGR uint8 (S, S, 3), targets (n, 5) =
    ``class 0, cx, cy, w, h`` in input pixels)."""

    def __init__(self, samples: Sequence[Sample], size: int, cfg: AugmentConfig, seed: int = 0) -> None:
        if not samples:
            raise ValueError("a detection dataset needs at least one image")
        self.samples = list(samples)
        self.size = size
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        self.mosaic = True

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int, mosaic: bool) -> None:
        """The epoch (part of every sample's seed) and whether mosaic/mixup are on."""
        self.epoch, self.mosaic = epoch, mosaic

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[index]
        return decode(s.path), s.boxes.astype(np.float32).reshape(-1, 4)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        cfg, size = self.cfg, self.size
        if self.mosaic and rng.random() < cfg.mosaic_prob:
            picks = [index, *(int(i) for i in rng.integers(0, len(self), 3))]
            tiles = [self.load(i) for i in picks]
            canvas, boxes = mosaic([t[0] for t in tiles], [t[1] for t in tiles], size, rng)
            image, boxes = random_affine(canvas, boxes, size, rng, cfg)
            if rng.random() < cfg.mixup_prob:
                image, boxes = mixup(image, boxes, *self.load(int(rng.integers(0, len(self)))), rng, cfg)
        else:
            image, boxes = self.load(index)
            image, frame = letterbox(image, size)
            boxes = to_frame(boxes, frame)
            boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)]
        image, boxes = flip(image, boxes, rng, cfg)
        if rng.random() < cfg.hsv_prob and any(cfg.hsv_gains):
            image = hsv_jitter(image, rng, cfg.hsv_gains)
        wh = boxes[:, 2:4] - boxes[:, :2]
        targets = np.concatenate([np.zeros((len(boxes), 1), np.float32), boxes[:, :2] + wh / 2, wh], axis=1)
        return image, targets.astype(np.float32)


def collate(batch: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stack images to a (B, 3, S, S) uint8 BGR tensor; targets stay a list (one (n, 5) tensor per image)."""
    images = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2).contiguous()
    return images, [torch.from_numpy(b[1]) for b in batch]
