"""Whole-image inputs of the multi-label classifier (the 1st place's full-image EfficientNetV2-M).

One item per image, not per box: the whole image **letterboxed** to ``img_size`` x ``img_size`` -- the long side
scaled to ``img_size``, the short side padded, centred, with the image's border colour (the median of its outermost
rows and columns: the smear's background; :func:`cytologia.classification.crops.border_colour`) -- so cells keep
their shape and relative size. Most Cytologia images are ~360x368 px (2 % padding); the wider ones (up to ~800 px)
would be stretched by a plain resize, and cell size and shape carry class information (LGL vs LY, blast vs
lymphocyte). Predicting must letterbox the same way: :func:`letterbox`.

The target is multi-hot over the model's labels (:func:`cytologia.data.schema.labels`): 1 for every class present
among the image's boxes; with ``background=True`` the 24th label "background" is 1 for the cell-free background
images (:mod:`cytologia.detection.background`) and 0 for every annotated image. A model without background has 23
labels only (no always-0 column: it would teach the network nothing but to push one logit down).

Augmentation is image-level only (:func:`build_image_transforms`): flips, 90-degree rotations (the letterboxed
image is square), light brightness/contrast and noise. No affine zoom or shift and no coarse dropout: either can push
a cell out of view or hide it, and its label would then be wrong; no bbox-aware rotation (it needs one cell box).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch

from cytologia.classification.augment import _MAGNITUDE, STRENGTHS, check_arguments
from cytologia.classification.crops import (
    DEFAULT_CACHE_IMAGES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_REPORTED,
    ItemDataset,
)
from cytologia.classification.geometry import letterbox  # noqa: F401  (re-exported)
from cytologia.data.schema import BACKGROUND
from cytologia.errors import CytologiaInputError, ValidationError

# Columns of an image table (:func:`image_table`): ``classes`` is the space-separated label names present (class
# names hold no spaces), ``cell_class`` the class of the only box of a single-cell image (None otherwise).
IMAGE_COLUMNS: tuple[str, ...] = ("NAME", "fold", "n_cells", "classes", "cell_class")


# ----------------------------------------------------------------------------------------------------- image tables
def image_table(boxes: pd.DataFrame, source: str = "boxes table") -> pd.DataFrame:
    """One row per image of a box table (``NAME, class, fold``; every box a known class): :data:`IMAGE_COLUMNS`.

    ``classes``: the distinct classes of its boxes, in the order of first appearance; ``n_cells``: its box count;
    ``cell_class``: the class of a single-cell image, None for the others. An image whose boxes carry different
    folds is an error naming the rows. Rows come in order of first appearance of the image.
    """
    missing = [c for c in ("NAME", "class", "fold") if c not in boxes.columns]
    if missing:
        raise CytologiaInputError(f"{source}: missing column(s) {', '.join(missing)}")
    empty = np.flatnonzero(boxes["class"].isna().to_numpy() | (boxes["class"].astype(str) == "").to_numpy())
    if len(empty):
        problems: list[tuple[int | None, str]] = [
            (int(i) + 1, f"NAME={boxes['NAME'].iat[i]!r}: no class") for i in empty[:MAX_REPORTED]
        ]
        raise ValidationError(source, problems, total=len(empty))
    frame = pd.DataFrame(
        {
            "NAME": boxes["NAME"].astype(str).to_numpy(),
            "class": boxes["class"].astype(str).to_numpy(),
            "fold": boxes["fold"].to_numpy(np.int64),
        }
    )
    folds_per_image = frame.groupby("NAME", sort=False)["fold"].nunique()
    split = folds_per_image.index[folds_per_image.to_numpy() > 1]
    if len(split):
        rows = np.flatnonzero(frame["NAME"].isin(split).to_numpy())
        problems = [
            (int(i) + 1, f"NAME={frame['NAME'].iat[i]!r} has boxes in more than one fold") for i in rows[:MAX_REPORTED]
        ]
        raise ValidationError(source, problems, total=len(rows))
    grouped = frame.groupby("NAME", sort=False)
    out = pd.DataFrame(
        {
            "NAME": grouped["fold"].first().index.to_numpy(dtype=object),
            "fold": grouped["fold"].first().to_numpy(np.int64),
            "n_cells": grouped.size().to_numpy(np.int64),
            "classes": grouped["class"].agg(lambda c: " ".join(pd.unique(c))).to_numpy(dtype=object),
        }
    )
    single = out["n_cells"].to_numpy() == 1
    # object dtype, so that "no single cell" stays None (pandas would infer a string column and turn None into NaN)
    out["cell_class"] = pd.Series(np.where(single, grouped["class"].first().to_numpy(dtype=object), None), dtype=object)
    return out


def background_image_table(background: pd.DataFrame, source: str = "background table") -> pd.DataFrame:
    """One row per cell-free background image of a background table (``NAME, fold``, one row per painted box, as
    :func:`cytologia.detection.background.make_background_set` writes it): :data:`IMAGE_COLUMNS` with ``classes`` =
    "background", ``n_cells`` 0. An image listed with two folds is an error naming the rows."""
    missing = [c for c in ("NAME", "fold") if c not in background.columns]
    if missing:
        raise CytologiaInputError(f"{source}: missing column(s) {', '.join(missing)}")
    frame = background.assign(NAME=background["NAME"].astype(str))
    split = frame.groupby("NAME", sort=False)["fold"].nunique()
    bad = np.flatnonzero(frame["NAME"].isin(split.index[split.to_numpy() > 1]).to_numpy())
    if len(bad):
        problems: list[tuple[int | None, str]] = [
            (int(i) + 1, f"NAME={frame['NAME'].iat[i]!r} is listed with more than one fold") for i in bad[:MAX_REPORTED]
        ]
        raise ValidationError(source, problems, total=len(bad))
    first = frame.drop_duplicates("NAME")
    n = len(first)
    return pd.DataFrame(
        {
            "NAME": first["NAME"].to_numpy(dtype=object),
            "fold": first["fold"].to_numpy(np.int64),
            "n_cells": np.zeros(n, np.int64),
            "classes": np.full(n, BACKGROUND, dtype=object),
        }
    ).assign(cell_class=pd.Series([None] * n, dtype=object))


# ------------------------------------------------------------------------------------------------------ transforms
def build_image_transforms(
    img_size: int, train: bool, *, hue_saturation: bool = False, strength: str = "default"
) -> A.Compose:
    """Augmentation of letterboxed ``img_size`` square uint8 RGB images: identity for evaluation; for training,
    horizontal/vertical flips, 90-degree rotations, brightness/contrast and Gaussian noise at the magnitudes of
    ``strength`` (those of :func:`cytologia.classification.augment.build_transforms`), hue/saturation only when
    ``hue_saturation`` (stain colour carries class information)."""
    if strength not in STRENGTHS:
        raise CytologiaInputError(f"augmentation strength {strength!r}: must be one of {', '.join(STRENGTHS)}")
    if img_size < 8:
        raise CytologiaInputError(f"img_size={img_size}: too small for augmentation (>= 8)")
    if not train:
        return A.Compose([])
    g = _MAGNITUDE[strength]
    steps: list[A.BasicTransform] = [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=1.0),
        A.RandomBrightnessContrast(brightness_limit=g["bc"], contrast_limit=g["bc"], p=g["bc_p"]),
    ]
    if hue_saturation:
        steps.append(A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=12, val_shift_limit=0, p=0.3))
    if g["noise_p"] > 0:
        steps.append(A.GaussNoise(std_range=g["noise_std"], p=g["noise_p"]))
    check_arguments(steps)
    return A.Compose(steps)


# ---------------------------------------------------------------------------------------------------------- dataset
class FullImageDataset(ItemDataset):
    """Whole letterboxed images with multi-hot targets, for training or predicting the multi-label classifier.

    ``table``: ``NAME`` and ``classes`` (space-separated label names of ``labels`` present in the image; empty for
    none), optionally ``cell_class`` (the class of a single-cell image; None / NA otherwise). Each item reads
    ``image_dir/NAME`` (or its repaired copy in ``repair_dir``), converts it to RGB, letterboxes it to ``img_size``
    (:func:`letterbox`), applies ``transform`` (an albumentations ``Compose`` on the uint8 HWC image, which must stay
    uint8 and ``img_size`` square) and normalises with ``mean``/``std``. Items are dicts: ``image`` float32 CHW,
    ``target`` float32 (K,) multi-hot, ``label`` int64 (index of ``cell_class``, -1 when there is none: what the
    single-cell macro-F1 is computed on) and ``index`` int64 (the row).

    ``cache="memory"`` keeps up to ``cache_images`` letterboxed images per process (LRU).
    """

    noun = "image"

    def __init__(
        self,
        table: pd.DataFrame,
        image_dir: str | Path,
        labels: Sequence[str],
        img_size: int,
        transform: Callable[..., dict[str, Any]] | None = None,
        cache: str = "none",
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        repair_dir: str | Path | None = None,
        cache_images: int = DEFAULT_CACHE_IMAGES,
        source: str = "image table",
    ) -> None:
        missing = [c for c in ("NAME", "classes") if c not in table.columns]
        if missing:
            raise CytologiaInputError(f"{source}: missing column(s) {', '.join(missing)}")
        super().__init__(
            table["NAME"].astype(str).tolist(),
            image_dir,
            labels,
            img_size,
            transform,
            cache,
            mean=mean,
            std=std,
            repair_dir=repair_dir,
            cache_images=cache_images,
            source=source,
        )
        self.targets, self.cell_labels = self._encode(table)

    def _encode(self, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Multi-hot targets (n, K) and single-cell label indices (n,); unknown label names are an error listing the
        rows."""
        index = {name: i for i, name in enumerate(self.labels)}
        n = len(table)
        targets = np.zeros((n, len(self.labels)), np.float32)
        cell = np.full(n, -1, np.int64)
        has_cell = "cell_class" in table.columns
        problems: list[tuple[int | None, str]] = []
        for row, value in enumerate(table["classes"].tolist()):
            names = [] if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).split()
            for name in names:
                if name not in index:
                    problems.append((row + 1, f"label {name!r} is not one of the {len(self.labels)} labels"))
                else:
                    targets[row, index[name]] = 1.0
            if has_cell:
                c = table["cell_class"].iat[row]
                if c is not None and not (isinstance(c, float) and math.isnan(c)):
                    if str(c) not in index:
                        problems.append((row + 1, f"cell_class {c!r} is not one of the {len(self.labels)} labels"))
                    else:
                        cell[row] = index[str(c)]
        if problems:
            raise ValidationError(self.source, problems[:MAX_REPORTED], total=len(problems))
        return targets, cell

    def item_image(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The letterboxed uint8 RGB image of row ``index`` (before the transform), through the cache."""
        return self.cached(self.names[index], lambda: letterbox(self.read_rgb(index), self.img_size)), {}

    def item_fields(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "target": torch.from_numpy(self.targets[index].copy()),
            "label": torch.tensor(self.cell_labels[index], dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }
