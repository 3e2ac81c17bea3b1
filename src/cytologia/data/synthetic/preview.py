"""Contact sheets of the renderer, for looking at it: one row per class (cell crops), plus rows of whole images.

    from cytologia.data.synthetic.preview import contact_sheet
    contact_sheet("/tmp/synth_sheet.png", per_class=6, seed=0)

or ``cytologia synth --contact-sheet /tmp/synth_sheet.png``. Each crop is the cell's clean box plus a 16 px margin
(the winners' classifier input), drawn from a different acquisition source per column so that stain and
illumination vary along a row as they do across real centres.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from cytologia.data.schema import CLASS_TO_INDEX, CLASSES
from cytologia.data.synthetic.render import render_scene
from cytologia.data.synthetic.sources import SOURCES

CROP_MARGIN_PX = 16  # the 1st place's classifiers saw the box plus 16 px
LABEL_W = 84  # px of the class-name column


def _crop(image: np.ndarray, box: Sequence[int], tile: int, margin: int = CROP_MARGIN_PX) -> np.ndarray:
    """Square crop around ``box`` (plus ``margin``), padded with the image's border colour, resized to ``tile``."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1) / 2 + margin
    a, b = int(round(cx - half)), int(round(cy - half))
    side = int(round(2 * half))
    pad = max(0, -a, -b, a + side - w, b + side - h)
    if pad:
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    crop = image[b + pad : b + pad + side, a + pad : a + pad + side]
    return cv2.resize(crop, (tile, tile), interpolation=cv2.INTER_AREA)


def _label(height: int, text: str) -> np.ndarray:
    out = np.full((height, LABEL_W, 3), 255, np.uint8)
    cv2.putText(out, text, (4, height // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def contact_sheet(
    path: str | Path,
    per_class: int = 6,
    seed: int = 0,
    tile: int = 112,
    classes: Sequence[str] = CLASSES,
    scenes: int = 6,
    size: int | None = None,
) -> Path:
    """Write a PNG: one row of ``per_class`` cell crops per class (column j from source j mod 10), then rows of
    ``scenes`` whole images (random classes, 1-4 cells, clean boxes drawn in green). Returns the path."""
    for c in classes:
        if c not in CLASS_TO_INDEX:
            raise ValueError(f"unknown class {c!r}; valid classes: {' '.join(CLASSES)}")
    rows = []
    for cls in classes:
        tiles = [_label(tile, cls)]
        for j in range(per_class):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(CLASS_TO_INDEX[cls], j)))
            scene = render_scene(rng, SOURCES[j % len(SOURCES)], [cls], size)
            tiles.append(_crop(scene.image, scene.cells[0].clipped, tile))
        rows.append(np.hstack(tiles))
    width = rows[0].shape[1]
    if scenes > 0:
        # whole images, twice the tile size, as many per row as fit
        side = 2 * tile
        per_row = max(1, (width - LABEL_W) // side)
        imgs = []
        for j in range(scenes):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(len(CLASSES), j)))
            n = 1 + j % 4
            picked = [str(c) for c in rng.choice(np.array(CLASSES), size=n)]
            scene = render_scene(rng, SOURCES[j % len(SOURCES)], picked, size)
            img = scene.image.copy()
            for cell in scene.cells:
                x1, y1, x2, y2 = cell.clipped
                cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), (0, 200, 0), 1)
            imgs.append(cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA))
        for k in range(0, len(imgs), per_row):
            chunk = imgs[k : k + per_row]
            chunk += [np.full((side, side, 3), 255, np.uint8)] * (per_row - len(chunk))
            row = np.hstack([_label(side, "scenes" if k == 0 else ""), *chunk])
            pad = width - row.shape[1]
            if pad > 0:
                row = np.hstack([row, np.full((side, pad, 3), 255, np.uint8)])
            rows.append(row[:, :width])
    sheet = np.vstack(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), sheet):
        raise OSError(f"{path}: could not write the contact sheet")
    return path
