"""Cell crops for the classifiers: a box plus a margin, clipped to the image, resized to the model's input size.

Pixel convention
----------------
Box corners are continuous pixel-edge coordinates: pixel ``i`` covers ``[i, i + 1)``, so the Trustii box
``(10, 10, 20, 20)`` covers pixels 10..19 and its window (margin 0) is ``[10, 20)``. A float corner keeps every
pixel it touches: the window is ``[floor(x1 - margin), ceil(x2 + margin))``, clipped to ``[0, width)``. A box that is
degenerate or lies wholly outside the image still gives a window of at least one pixel (at the nearest border), so a
crop is never empty.

Crops are made on the fly inside :class:`CropDataset` (no PNG dump); decoded images can be kept in a bounded LRU
cache per worker process. Out-of-fold detected boxes get their labels from the ground truth with
:func:`label_boxes_from_truth`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cytologia.classification.geometry import (  # noqa: F401  (re-exported: the geometry lives there, torch-free)
    IMAGENET_MEAN,
    IMAGENET_STD,
    _box_floats,
    border_colour,
    crop_and_locate,
    crop_box_with_margin,
    crop_with_margin,
    resize_interpolation,
)
from cytologia.data.images import decode, resolve_image
from cytologia.data.schema import BOX_COLUMNS
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.metrics import giou_pairs

log = logging.getLogger(__name__)

CACHE_MODES: tuple[str, ...] = ("none", "memory")
# Decoded images kept per worker with cache="memory": a 368x360 RGB smear is ~0.4 MB, so 256 images ~ 100 MB.
DEFAULT_CACHE_IMAGES = 256
MAX_REPORTED = 20  # rows listed in an error message


# ------------------------------------------------------------------------------------------------ labels from truth
def _check_box_table(table: pd.DataFrame, what: str, extra: tuple[str, ...] = ()) -> None:
    missing = [c for c in ("NAME", *BOX_COLUMNS, *extra) if c not in table.columns]
    if missing:
        raise CytologiaInputError(f"{what}: missing column(s) {', '.join(missing)}")
    coords = table[list(BOX_COLUMNS)].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(coords).all(axis=1) | (coords[:, 2] < coords[:, 0]) | (coords[:, 3] < coords[:, 1])
    if bad.any():
        rows = np.flatnonzero(bad)
        problems: list[tuple[int | None, str]] = [
            (int(r) + 1, f"NAME={table['NAME'].iloc[r]!r} box {coords[r].tolist()} is not finite or is inverted")
            for r in rows[:MAX_REPORTED]
        ]
        raise ValidationError(what, problems, total=len(rows))


def label_boxes_from_truth(boxes: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Give each (out-of-fold detected) box the class of the ground-truth box of its image with the best GIoU.

    ``boxes``: ``NAME, x1..y2`` and any other columns (score, fold, ...), kept as they are; ``truth``: ``NAME,
    x1..y2, class`` and ``box_id`` (when absent, the truth row position is used as its id). Returns a copy of
    ``boxes`` with ``class`` (missing -- NA -- where the image has no truth box), ``truth_box_id`` (-1 there),
    ``giou`` (NaN there), and a ``box_id`` (the row position) when ``boxes`` has none. A ``class`` column already in
    ``boxes`` is replaced. Ties go to the first truth row. Vectorised: one join on NAME, one GIoU pass.
    """
    _check_box_table(boxes, "boxes table")
    _check_box_table(truth, "truth table", ("class",))
    out = boxes.copy()
    n = len(out)
    t_ids = truth["box_id"].to_numpy(dtype=np.int64) if "box_id" in truth.columns else np.arange(len(truth))
    left = pd.DataFrame({"NAME": out["NAME"].to_numpy(), "_row": np.arange(n)})
    right = pd.DataFrame({"NAME": truth["NAME"].to_numpy(), "_truth": np.arange(len(truth))})
    pairs = left.merge(right, on="NAME", how="inner", sort=False)
    rows = pairs["_row"].to_numpy(dtype=np.int64)
    tr = pairs["_truth"].to_numpy(dtype=np.int64)
    b = out[list(BOX_COLUMNS)].to_numpy(dtype=np.float64)
    t = truth[list(BOX_COLUMNS)].to_numpy(dtype=np.float64)
    g = giou_pairs(b[rows], t[tr]) if len(pairs) else np.zeros(0)
    # Best per detected row: sort by (row, -giou, truth order) and keep each row's first pair.
    order = np.lexsort((tr, -g, rows))
    rows, tr, g = rows[order], tr[order], g[order]
    first = np.r_[True, rows[1:] != rows[:-1]] if len(rows) else np.zeros(0, dtype=bool)
    cls = np.full(n, None, dtype=object)
    truth_id = np.full(n, -1, dtype=np.int64)
    best = np.full(n, np.nan)
    cls[rows[first]] = truth["class"].to_numpy(dtype=object)[tr[first]]
    truth_id[rows[first]] = t_ids[tr[first]]
    best[rows[first]] = g[first]
    if "box_id" not in out.columns:
        out["box_id"] = np.arange(n, dtype=np.int64)
    out["class"] = cls
    out["truth_box_id"] = truth_id
    out["giou"] = best
    unmatched = int((truth_id < 0).sum())
    if unmatched:
        log.info("%d of %d boxes lie in images without a truth box: class None", unmatched, n)
    return out


# ---------------------------------------------------------------------------------------------------------- dataset
class ItemDataset(Dataset):
    """What the crop and the full-image datasets share: one image file per item, read as RGB (through a per-process
    LRU cache with ``cache="memory"``), an albumentations ``transform`` on the uint8 HWC picture (which must stay uint8
    and ``img_size`` square), normalisation with ``mean``/``std`` (0..1 scale) into a float32 CHW ``image`` tensor.

    The one difference is what an item is: a subclass gives :meth:`item_image` (the uint8 picture before the
    transform, with the transform's extra targets) and :meth:`item_fields` (the item's other tensors).
    """

    noun = "item"  # what an item is called in errors

    def __init__(
        self,
        names: Sequence[str],
        image_dir: str | Path,
        labels: Sequence[str],
        img_size: int,
        transform: Callable[..., dict[str, Any]] | None,
        cache: str,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        repair_dir: str | Path | None,
        cache_images: int,
        source: str,
    ) -> None:
        if cache not in CACHE_MODES:
            raise CytologiaInputError(f"cache={cache!r}: must be one of {', '.join(CACHE_MODES)}")
        if img_size < 1:
            raise CytologiaInputError(f"img_size={img_size}: must be >= 1")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise CytologiaInputError(f"mean {mean} / std {std}: need 3 values each, std > 0")
        self.image_dir = Path(image_dir)
        self.labels = tuple(labels)
        self.img_size = int(img_size)
        self.transform = transform
        self.cache = cache
        self.cache_images = max(1, int(cache_images))
        self.repair_dir = Path(repair_dir) if repair_dir is not None else None
        self.source = source
        self.mean = np.asarray(mean, dtype=np.float32) * 255.0  # applied to 0..255 values: one multiply-add
        self.inv_std = 1.0 / (np.asarray(std, dtype=np.float32) * 255.0)
        self.names = np.asarray([str(n) for n in names], dtype=object)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.names)

    def image_path(self, name: str) -> Path:
        """The file an image is read from: its repaired copy when there is one, else ``image_dir/name``."""
        return resolve_image(self.image_dir / name, self.repair_dir, name)

    def cached(self, name: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        """``make()``'s picture of image ``name``, through the LRU cache when enabled."""
        if self.cache == "memory" and name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        image = make()
        if self.cache == "memory":
            self._cache[name] = image
            while len(self._cache) > self.cache_images:
                self._cache.popitem(last=False)
        return image

    def read_rgb(self, index: int) -> np.ndarray:
        """The RGB uint8 HWC array of row ``index``'s image (not cached); a bad file names the table and row."""
        name = self.names[index]
        try:
            return cv2.cvtColor(decode(self.image_path(name)), cv2.COLOR_BGR2RGB)
        except CytologiaInputError as err:
            raise CytologiaInputError(f"{self.source}, row {index + 1} (NAME={name!r}): {err}") from None

    def item_image(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The uint8 RGB picture of item ``index`` before the transform, and the transform's extra targets."""
        raise NotImplementedError

    def item_fields(self, index: int) -> dict[str, torch.Tensor]:
        """The item's tensors other than ``image``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} {self.noun}s")
        index %= len(self)
        image, targets = self.item_image(index)
        if self.transform is not None:
            image = self.transform(image=image, **targets)["image"]
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
                raise CytologiaInputError(
                    f"transform returned {type(image).__name__} {getattr(image, 'dtype', '')}: it must return the "
                    "uint8 HWC image (the dataset normalises and converts to a tensor itself)"
                )
            if image.shape[:2] != (self.img_size, self.img_size):
                raise CytologiaInputError(
                    f"transform changed the {self.noun} size to {image.shape[:2]}; expected "
                    f"{self.img_size}x{self.img_size}"
                )
        pixels = (image.astype(np.float32) - self.mean) * self.inv_std
        return {"image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), **self.item_fields(index)}

    def reseed(self, seed: int) -> None:
        """Reseed the transform's random generators (albumentations ``set_random_seed``) when it has them."""
        if self.transform is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(seed))


class CropDataset(ItemDataset):
    """Cell crops made on the fly from a box table, for training or predicting a classifier.

    ``table``: ``NAME, box_id, x1..y2`` and optionally ``class`` (a name of ``labels``; missing or null gives label
    -1). Each item decodes ``image_dir/NAME`` (or its repaired copy in ``repair_dir``, see
    :func:`cytologia.data.images.resolve_image`), converts it to RGB, crops the box plus ``margin`` px
    (:func:`crop_and_locate`), applies ``transform`` (an albumentations ``Compose`` called as
    ``transform(image=crop, cell_box=box)`` on the HWC uint8 crop, which must stay uint8 and ``img_size`` square),
    and normalises with ``mean``/``std`` (0..1 scale). Items are dicts: ``image`` float32 CHW tensor, ``label``,
    ``box_id`` and ``index`` (the row position) int64 tensors.

    ``cache="memory"`` keeps up to ``cache_images`` decoded images per process (LRU); each DataLoader worker has
    its own. Albumentations transforms are not reseeded per worker by albumentations itself: pass
    :func:`worker_init_fn` to the DataLoader so workers draw different augmentations.
    """

    noun = "crop"

    def __init__(
        self,
        table: pd.DataFrame,
        image_dir: str | Path,
        labels: Sequence[str],
        img_size: int,
        margin: float = 16,
        transform: Callable[..., dict[str, Any]] | None = None,
        cache: str = "none",
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        keep_aspect: bool = False,
        repair_dir: str | Path | None = None,
        cache_images: int = DEFAULT_CACHE_IMAGES,
        source: str = "crop table",
    ) -> None:
        super().__init__(
            table["NAME"].astype(str).tolist() if "NAME" in table.columns else [],
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
        _check_box_table(table, source, ("box_id",))
        self.margin = float(margin)
        self.keep_aspect = keep_aspect
        self.boxes = table[list(BOX_COLUMNS)].to_numpy(dtype=np.float64)
        self.box_ids = table["box_id"].to_numpy(dtype=np.int64)
        self.targets = self._encode_labels(table)

    def _encode_labels(self, table: pd.DataFrame) -> np.ndarray:
        """Label index per row (-1 where there is no class); unknown class names are an error listing the rows."""
        n = len(table)
        if "class" not in table.columns:
            return np.full(n, -1, dtype=np.int64)
        classes = table["class"]
        known = classes.notna().to_numpy()
        index = {name: i for i, name in enumerate(self.labels)}
        codes = np.full(n, -1, dtype=np.int64)
        mapped = classes[known].astype(str).map(index)
        bad = mapped.isna().to_numpy()
        if bad.any():
            rows = np.flatnonzero(known)[bad]
            problems: list[tuple[int | None, str]] = [
                (int(r) + 1, f"class {classes.iloc[r]!r} is not one of the {len(self.labels)} labels")
                for r in rows[:MAX_REPORTED]
            ]
            raise ValidationError(self.source, problems, total=len(rows))
        codes[known] = mapped.to_numpy(dtype=np.int64)
        return codes

    def load_image(self, name: str) -> np.ndarray:
        """RGB uint8 HWC array of an image, through the LRU cache when enabled."""
        return self.cached(name, lambda: cv2.cvtColor(decode(self.image_path(name)), cv2.COLOR_BGR2RGB))

    def crop(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 RGB crop of row ``index`` (before the transform) and its cell box in crop coordinates."""
        name = self.names[index]
        try:
            image = self.load_image(name)
        except CytologiaInputError as err:
            raise CytologiaInputError(f"{self.source}, row {index + 1} (NAME={name!r}): {err}") from None
        return crop_and_locate(image, self.boxes[index], self.margin, self.img_size, keep_aspect=self.keep_aspect)

    def item_image(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        crop, cell = self.crop(index)
        return crop, {"cell_box": cell}

    def item_fields(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "label": torch.tensor(self.targets[index], dtype=torch.int64),
            "box_id": torch.tensor(self.box_ids[index], dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed the worker's :class:`CropDataset` transform from the worker's torch
    seed (``base_seed + worker_id``), so that forked workers do not repeat each other's augmentations."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    dataset = info.dataset
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if isinstance(dataset, CropDataset):
        dataset.reseed(info.seed % 2**32)
