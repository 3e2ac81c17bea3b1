"""Background images: training images with their leukocytes painted out, as cell-free negatives.

The 1st place added ~3,500 such images (of ~48,000) as detector negatives (no box) and as a 24th "background"
class for the classifiers (``schema.labels(background=True)``): a classifier then has an answer for a detection on a
red cell, a platelet clump or stain debris.

Painting one cell (:func:`paint_out`):

1. **Mask** (:func:`cell_mask`): the ellipse inscribed in the box, grown by ``grow`` (annotators box the cell with
   a few px of slack, and cells are round), united with the *stained* pixels touching it -- HSV saturation above the
   image's own background level (the ``bg_quantile`` of the saturation outside every box: plasma and red cells) --
   so a lobe or a granule past the ellipse goes too; then closed and dilated by ``dilate`` of the box size for the
   blurred rim. Only the box grown by ``grow`` is touched.
2. **Fill**: ``reflect`` (default) mirrors the image outside the cell into the hole -- the left half of the hole
   from the left of the box, the right half from the right (or top/bottom, whichever fits inside the image), so the
   hole is filled with the image's own red cells and plasma, not a smooth blob a detector would learn to spot; the
   seam between the halves and any pixel mirrored from another cell are then inpainted (OpenCV TELEA), and the fill
   is blended into the image through a feathered mask. ``telea`` inpaints the whole hole; ``fill`` paints it with
   the median background colour plus noise.

:func:`make_background_set` writes the painted images apart (``OUT/images/bg-<NAME>``) with ``background.csv``
(:data:`BACKGROUND_COLUMNS`: one row per painted box, the image's fold copied from its source image, so a background
image never lands in another fold than its source -- no leakage). Originals are never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cytologia.data.schema import ANNOTATION_COLUMNS, BACKGROUND, BOX_COLUMNS
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

BACKGROUND_COLUMNS: tuple[str, ...] = ("NAME", "source_name", "fold", *BOX_COLUMNS)
METHODS: tuple[str, ...] = ("reflect", "telea", "fill")
PREFIX = "bg-"
JPEG_QUALITY = 95  # written once, read many times: visually lossless
GROW = 0.08  # the ellipse and the working region: box grown by 8 % of its size (annotators' slack is 1-5 px)
DILATE = 0.04  # mask dilation, share of the box side (the blurred rim of the cell)
BG_QUANTILE = 0.9  # saturation above this quantile of the outside pixels counts as stained
SEAM_PX = 3  # half-width of the seam between the two mirrored halves that is inpainted
INPAINT_RADIUS = 5  # px, OpenCV's neighbourhood for TELEA
FILL_NOISE = 3.0  # grey levels, sd of the noise of the "fill" method


def _box_int(box: Sequence[float], w: int, h: int, grow: float = 0.0) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (float(v) for v in box)
    gx, gy = grow * (x2 - x1), grow * (y2 - y1)
    return (
        max(0, int(np.floor(x1 - gx))),
        max(0, int(np.floor(y1 - gy))),
        min(w, int(np.ceil(x2 + gx))),
        min(h, int(np.ceil(y2 + gy))),
    )


def outside_mask(shape: tuple[int, ...], boxes: np.ndarray, grow: float = GROW) -> np.ndarray:
    """Boolean (H, W) mask of the pixels outside every (grown) box."""
    h, w = shape[:2]
    out = np.ones((h, w), dtype=bool)
    for b in np.asarray(boxes, np.float64).reshape(-1, 4):
        x1, y1, x2, y2 = _box_int(b, w, h, grow)
        out[y1:y2, x1:x2] = False
    return out


def saturation(image: np.ndarray) -> np.ndarray:
    """HSV saturation (0-255) of a BGR image."""
    return cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[:, :, 1]


def background_saturation(image: np.ndarray, boxes: np.ndarray, q: float = BG_QUANTILE) -> float:
    """The ``q`` quantile of the saturation outside every box (the whole image when the boxes cover it)."""
    sat = saturation(image)
    out = outside_mask(image.shape, boxes)
    values = sat[out] if out.sum() >= 64 else sat.reshape(-1)
    return float(np.quantile(values, q))


def cell_mask(
    image: np.ndarray,
    box: Sequence[float],
    *,
    bg_saturation: float | None = None,
    grow: float = GROW,
    dilate: float = DILATE,
) -> np.ndarray:
    """uint8 (H, W) mask (255 = cell) of the leukocyte in ``box``; see the module doc."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"empty box {tuple(box)}")
    mask = np.zeros((h, w), np.uint8)
    centre = ((x1 + x2) / 2, (y1 + y2) / 2)
    axes = ((x2 - x1) / 2 * (1 + grow), (y2 - y1) / 2 * (1 + grow))
    cv2.ellipse(mask, (centre, (2 * axes[0], 2 * axes[1]), 0.0), 255, -1)
    rx1, ry1, rx2, ry2 = _box_int(box, w, h, grow)
    if rx2 <= rx1 or ry2 <= ry1:
        return np.zeros((h, w), np.uint8)
    if bg_saturation is None:
        bg_saturation = background_saturation(image, np.array([box]))
    region = saturation(image[ry1:ry2, rx1:rx2])
    stained = (region > bg_saturation).astype(np.uint8)
    # keep the stained components that touch the ellipse (a nucleus lobe past it), not separate red-cell rims
    n, labels = cv2.connectedComponents(stained, connectivity=8)
    if n > 1:
        touching = np.unique(labels[(mask[ry1:ry2, rx1:rx2] > 0) & (stained > 0)])
        keep = np.isin(labels, touching[touching > 0])
        mask[ry1:ry2, rx1:rx2] |= (keep * 255).astype(np.uint8)
    side = float(np.sqrt((x2 - x1) * (y2 - y1)))
    k = max(3, int(round(dilate * side)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = cv2.dilate(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel), kernel)
    clip = np.zeros_like(mask)
    clip[ry1:ry2, rx1:rx2] = 255
    return cv2.bitwise_and(mask, clip)


def _reflect_fill(image: np.ndarray, hole: np.ndarray, union: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill ``hole`` (bool) by mirroring the image across the sides of its bounding rectangle. Returns the filled
    image and a bool mask of the hole pixels still to inpaint (seam, sources inside ``union`` or the border)."""
    h, w = hole.shape
    ys, xs = np.nonzero(hole)
    x1, x2, y1, y2 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    out = image.copy()
    todo = np.zeros((h, w), dtype=bool)
    # Each half of the hole is mirrored from its own side: the source of x in [x1, cx) is 2*x1 - 1 - x, which stays
    # inside the image when x1 >= (x2 - x1) / 2. Try the horizontal split, then the vertical one; score each by the
    # share of sources that fall outside the image or on a cell.
    best = None
    for axis in (1, 0):
        lo, hi, n = (x1, x2, w) if axis == 1 else (y1, y2, h)
        mid = (lo + hi) // 2
        coord = xs if axis == 1 else ys
        src = np.where(coord < mid, 2 * lo - 1 - coord, 2 * hi - 1 - coord)
        inside = (src >= 0) & (src < n)
        src_c = np.clip(src, 0, n - 1)
        sy, sx = (ys, src_c) if axis == 1 else (src_c, xs)
        bad = ~inside | union[sy, sx]
        if best is None or bad.mean() < best[0]:
            best = (bad.mean(), axis, sy, sx, bad, mid)
    assert best is not None
    _, axis, sy, sx, bad, mid = best
    out[ys, xs] = image[sy, sx]
    todo[ys[bad], xs[bad]] = True
    coord = xs if axis == 1 else ys
    seam = np.abs(coord - mid) <= SEAM_PX
    todo[ys[seam], xs[seam]] = True
    return out, todo


def paint_out(
    image: np.ndarray,
    boxes: np.ndarray | Sequence[Sequence[float]],
    *,
    method: str = "reflect",
    seed: int = 0,
    masks: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """A copy of a BGR image with the cells of ``boxes`` (x1, y1, x2, y2) painted out; the input is not modified.

    ``masks`` (uint8, one per box) replaces :func:`cell_mask`. See the module doc for the methods.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a BGR uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return image.copy()
    if masks is None:
        bg_sat = background_saturation(image, boxes)
        masks = [cell_mask(image, b, bg_saturation=bg_sat) for b in boxes]
    union = np.zeros(image.shape[:2], dtype=bool)
    for m in masks:
        union |= m > 0
    if not union.any():
        return image.copy()
    if method == "telea":
        return cv2.inpaint(image, union.astype(np.uint8) * 255, INPAINT_RADIUS, cv2.INPAINT_TELEA)
    if method == "fill":
        rng = np.random.default_rng(seed)
        outside = ~union
        colour = np.median(image[outside], axis=0) if outside.any() else np.median(image.reshape(-1, 3), axis=0)
        out = image.copy()
        # grey sensor-like noise (the same on B, G, R: independent colour noise would raise the saturation)
        noise = rng.normal(0, FILL_NOISE, (int(union.sum()), 1))
        out[union] = np.clip(colour + noise, 0, 255).astype(np.uint8)
        return out
    out = image.copy()
    todo = np.zeros(image.shape[:2], dtype=bool)
    for m in masks:
        hole = m > 0
        if not hole.any():
            continue
        filled, rest = _reflect_fill(out, hole, union)
        out[hole] = filled[hole]
        todo |= rest
    if todo.any():
        out = cv2.inpaint(out, todo.astype(np.uint8) * 255, INPAINT_RADIUS, cv2.INPAINT_TELEA)
    # feather the edge of the hole: blend the filled image into the original over a few px
    alpha = cv2.GaussianBlur(union.astype(np.float32), (0, 0), 2.0)
    alpha = np.maximum(alpha, union.astype(np.float32))[:, :, None]  # fully painted inside the hole
    return (alpha * out + (1 - alpha) * image).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# a background set on disk


def background_name(name: str) -> str:
    """File name of the background image made from image ``name``."""
    return PREFIX + Path(name).name


def make_background_set(
    annotations: pd.DataFrame,
    image_dir: str | Path,
    folds: pd.DataFrame,
    out_dir: str | Path,
    n_images: int,
    *,
    seed: int = 0,
    method: str = "reflect",
    exclude: Sequence[str] = (),
    max_cells: int | None = None,
    workers: int | None = None,
) -> pd.DataFrame:
    """Paint ``n_images`` training images (a seeded random choice) and write them to ``out_dir/images/`` with
    ``out_dir/background.csv`` (:data:`BACKGROUND_COLUMNS`); returns that table.

    Candidates are the images of ``annotations`` that have a fold in ``folds`` (``NAME, fold``), are not in
    ``exclude`` (e.g. images the cleaning flagged: a box that misses its cell would leave the cell in the
    "background") and hold at most ``max_cells`` boxes. An image that cannot be read is skipped and counted in the log.
    """
    from cytologia.data.images import decode, thread_map

    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    if not image_dir.is_dir():
        raise CytologiaInputError(f"image folder {image_dir} does not exist")
    for col in ("NAME", "fold"):
        if col not in folds.columns:
            raise CytologiaInputError(f"folds table lacks column {col!r}")
    ann = annotations.copy()
    ann["NAME"] = ann["NAME"].astype(str)
    fold_of = folds.assign(NAME=folds["NAME"].astype(str)).drop_duplicates("NAME").set_index("NAME")["fold"]
    per_image = ann.groupby("NAME", sort=True).size()
    candidates = per_image.index[per_image.index.isin(fold_of.index) & ~per_image.index.isin(set(map(str, exclude)))]
    if max_cells is not None:
        candidates = candidates[(per_image.reindex(candidates) <= max_cells).to_numpy()]
    if n_images > len(candidates):
        raise CytologiaInputError(f"{n_images} background images asked for, only {len(candidates)} candidate images")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(np.asarray(candidates, dtype=object), size=n_images, replace=False).tolist())
    images_out = out_dir / "images"
    images_out.mkdir(parents=True, exist_ok=True)
    by_name = {n: g[list(BOX_COLUMNS)].to_numpy(np.float64) for n, g in ann[ann["NAME"].isin(chosen)].groupby("NAME")}

    def one(item: tuple[int, str]) -> str | None:
        k, name = item
        try:
            image = decode(image_dir / name)
        except CytologiaInputError as err:
            return str(err)
        painted = paint_out(image, by_name[name], method=method, seed=seed * 1_000_003 + k)
        ok, data = cv2.imencode(".jpg", painted, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            return f"{name}: JPEG encoding failed"
        (images_out / background_name(name)).write_bytes(data.tobytes())
        return None

    errors = thread_map(one, list(enumerate(chosen)), workers)
    failed = {name for name, err in zip(chosen, errors) if err is not None}
    for err in [e for e in errors if e is not None][:10]:
        log.warning("background: skipped %s", err)
    if failed:
        log.warning("background: %d of %d images could not be painted and were skipped", len(failed), len(chosen))
    rows = []
    for name in chosen:
        if name in failed:
            continue
        for b in by_name[name]:
            rows.append((background_name(name), name, int(fold_of[name]), *b))
    table = pd.DataFrame(rows, columns=list(BACKGROUND_COLUMNS))
    from cytologia.data.io import write_csv

    write_csv(table, out_dir / "background.csv")
    log.info("background: %d images painted (%s) into %s", table["NAME"].nunique(), method, images_out)
    return table


def read_background(path: str | Path) -> pd.DataFrame:
    """Read ``background.csv``; a missing column is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such file")
    table = pd.read_csv(path, dtype={"NAME": str, "source_name": str}, keep_default_na=False)
    missing = [c for c in BACKGROUND_COLUMNS if c not in table.columns]
    if missing:
        raise CytologiaInputError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def detector_negatives(background: pd.DataFrame) -> pd.DataFrame:
    """``NAME, fold`` of the background images, one row each: detector training images with no box."""
    return background.drop_duplicates("NAME")[["NAME", "fold"]].reset_index(drop=True)


def as_annotations(background: pd.DataFrame, img_w: int = -1, img_h: int = -1) -> pd.DataFrame:
    """The painted boxes as annotation rows of class ``"background"`` (:data:`ANNOTATION_COLUMNS`), for a classifier
    trained with ``schema.labels(background=True)``: each crop is where a cell was. ``box_id`` is negative
    (-1, -2, ...) so it never collides with a train.csv row."""
    out = pd.DataFrame(
        {
            "NAME": background["NAME"].astype(str).to_numpy(),
            "box_id": -(np.arange(len(background), dtype=np.int64) + 1),
            **{c: background[c].to_numpy(np.float64) for c in BOX_COLUMNS},
            "class": BACKGROUND,
            "img_w": img_w,
            "img_h": img_h,
            "fixes": "background",
        }
    )
    return out[list(ANNOTATION_COLUMNS)]
