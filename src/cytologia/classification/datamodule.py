"""Data loaders of one fold: crops of the training folds (augmented) and of the held-out fold (plain).

Crops are cut on the fly by :class:`cytologia.classification.crops.CropDataset` (box + margin, resized); training
may draw from several sources (the annotated images and, for a background-class model, the background images),
each a table plus its image folder. Under DDP the engine shards both loaders with a distributed sampler.

:class:`FullImageDataModule` is the same for the multi-label full-image model: its sources are image tables
(:func:`cytologia.classification.fullimage.image_table`), items whole letterboxed images with multi-hot targets.

Per-data-set sampling (combined folders, ``data.sampling_weights``): with ``sampling`` (data set -> weight) the
training loader draws with replacement (:func:`sampling_weights` gives each item's probability) instead of
shuffling; an epoch keeps its length (one draw per training item).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, WeightedRandomSampler

from cytologia.errors import CytologiaInputError

UNGROUPED = "background"  # the group of training items whose table has no dataset column (background crops)


def sampling_weights(groups: Sequence[str], weights: Mapping[str, float]) -> np.ndarray:
    """Probability of drawing each item (sums to 1) so that each group (data set) named in ``weights`` gets a share
    of the draws proportional to its weight, items uniform within a group.

    Groups not named in ``weights`` keep their natural share (their count over all items); the named groups split
    the rest in proportion to their weights. A weight must be >= 0 (0: never drawn) and the named groups present
    must not all weigh 0. ``{"cytologia": 1, "pbc": 1}`` draws as many PBC as Cytologia crops per epoch, whatever
    their sizes. A weight of a group absent from ``groups`` is ignored (a held-out data set: leave one data set out
    trains without it); the stage checks the names against the data folder's data sets."""
    groups_arr = np.asarray(groups, dtype=object)
    names, counts = np.unique(groups_arr, return_counts=True)
    present = dict(zip(names.tolist(), counts.tolist()))
    bad = {k: v for k, v in weights.items() if not np.isfinite(v) or v < 0}
    if bad:
        raise CytologiaInputError(f"sampling weights must be >= 0, got {dict(weights)}")
    weights = {g: float(w) for g, w in weights.items() if g in present}
    if weights and sum(weights.values()) <= 0:
        raise CytologiaInputError(f"sampling weights of the training data sets are all 0: {weights}")
    n = len(groups_arr)
    free = sum(c for g, c in present.items() if g not in weights) / n  # natural share of the groups not named
    total = float(sum(weights.values()))
    share = {g: (c / n if g not in weights else (1.0 - free) * weights[g] / total) for g, c in present.items()}
    prob = np.array([share[g] / present[g] for g in groups_arr.tolist()], dtype=np.float64)
    return prob / prob.sum()


def reseed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed the augmentations of every crop dataset in the worker (albumentations
    keeps its own generators, which forked workers would otherwise share), from the worker's torch seed."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    stack = [info.dataset]
    while stack:
        dataset = stack.pop()
        if isinstance(dataset, ConcatDataset):
            stack.extend(dataset.datasets)
        elif hasattr(dataset, "reseed"):
            dataset.reseed(info.seed % 2**32)


@dataclass(frozen=True)
class CropSource:
    """Boxes to crop (``NAME, x1, y1, x2, y2, class`` and a ``box_id``) and the folder their images are in; for
    :class:`FullImageDataModule`, an image table (``NAME, classes, cell_class``) and its folder."""

    table: pd.DataFrame
    image_dir: Path


class CropDataModule(L.LightningDataModule):
    """Training and validation crop loaders for one fold. ``dataset_class``: the crop dataset
    (:class:`~cytologia.classification.crops.CropDataset` or a subclass with more fields per item, e.g. a distilled
    student's teacher targets)."""

    dataset_class: type | None = None  # None: CropDataset (imported when used)

    def __init__(
        self,
        train: Sequence[CropSource],
        val: CropSource,
        label_names: Sequence[str],
        img_size: int,
        *,
        margin: int = 16,
        batch_size: int = 32,
        num_workers: int = 0,
        augment: dict[str, Any] | None = None,
        cache: str = "none",
        sampling: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if not train or sum(len(s.table) for s in train) == 0:
            raise ValueError("no training boxes or images (every training table is empty)")
        self.train_sources = list(train)
        self.val_source = val
        self.label_names = list(label_names)
        self.img_size = img_size
        self.margin = margin
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = dict(augment or {})
        self.cache = cache
        self.sampling = dict(sampling or {})  # data set -> weight; empty: shuffle, every item once per epoch
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _dataset(self, source: CropSource, train: bool) -> Dataset:
        from cytologia.classification.augment import build_transforms
        from cytologia.classification.crops import CropDataset

        dataset_class = self.dataset_class or CropDataset
        transform = build_transforms(
            self.img_size,
            train,
            hue_saturation=bool(self.augment.get("hue_saturation", False)),
            bbox_aware_p=float(self.augment.get("bbox_aware_p", 0.5)),
            strength=str(self.augment.get("strength", "default")),
        )
        return dataset_class(
            source.table,
            source.image_dir,
            self.label_names,
            self.img_size,
            margin=self.margin,
            transform=transform,
            cache=self.cache,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            parts = [self._dataset(s, train=True) for s in self.train_sources if len(s.table)]
            # Augmentations drawn in this process (num_workers=0) follow the run's seed; workers reseed their own.
            for i, part in enumerate(parts):
                part.reseed((torch.initial_seed() + i) % 2**32)
            self.train_set = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        if self.val_set is None:
            self.val_set = self._dataset(self.val_source, train=False)

    def train_probabilities(self) -> np.ndarray | None:
        """Per training item (in the training set's order), its draw probability under ``sampling``; None without.
        An item's group is its table's ``dataset`` column, or :data:`UNGROUPED` for a table without one."""
        if not self.sampling:
            return None
        groups: list[str] = []
        for s in self.train_sources:
            if len(s.table):
                column = s.table["dataset"] if "dataset" in s.table.columns else [UNGROUPED] * len(s.table)
                groups.extend(str(g) for g in column)
        return sampling_weights(groups, self.sampling)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        n = len(dataset)  # type: ignore[arg-type]
        prob = self.train_probabilities() if train else None
        sampler = None
        if prob is not None:
            # One draw per item and epoch, with replacement; the generator follows the run's seed (seed_everything).
            generator = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**63)
            sampler = WeightedRandomSampler(torch.as_tensor(prob), num_samples=n, replacement=True, generator=generator)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            # A batch of one breaks batch norm and MixUp: training drops the ragged tail (when a full batch exists).
            drop_last=train and n >= self.batch_size,
            num_workers=self.num_workers,
            worker_init_fn=reseed_worker,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self.train_set is not None
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self.val_set is not None
        return self._loader(self.val_set, train=False)

    def predict_loader(self) -> DataLoader:
        """The held-out crops in table order, without augmentation or distributed sampler (out-of-fold logits)."""
        self.setup("predict")
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


class FullImageDataModule(CropDataModule):
    """Training and validation loaders of whole images for one fold (the multi-label model): each source is an image
    table (``NAME, classes, cell_class``, see :func:`cytologia.classification.fullimage.image_table`) and its folder.
    ``augment`` keys used: ``hue_saturation`` and ``strength`` (the bbox-aware ones need a cell box and are not)."""

    def __init__(
        self,
        train: Sequence[CropSource],
        val: CropSource,
        label_names: Sequence[str],
        img_size: int,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        augment: dict[str, Any] | None = None,
        cache: str = "none",
    ) -> None:
        super().__init__(
            train,
            val,
            label_names,
            img_size,
            margin=0,
            batch_size=batch_size,
            num_workers=num_workers,
            augment=augment,
            cache=cache,
        )

    def _dataset(self, source: CropSource, train: bool) -> Dataset:
        from cytologia.classification.fullimage import FullImageDataset, build_image_transforms

        transform = build_image_transforms(
            self.img_size,
            train,
            hue_saturation=bool(self.augment.get("hue_saturation", False)),
            strength=str(self.augment.get("strength", "default")),
        )
        return FullImageDataset(
            source.table, source.image_dir, self.label_names, self.img_size, transform=transform, cache=self.cache
        )
