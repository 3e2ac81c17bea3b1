"""Data loaders of one fold: crops of the training folds (augmented) and of the held-out fold (plain).

Crops are cut on the fly by :class:`cytologia.classification.crops.CropDataset` (box + margin, resized); training
may draw from several sources (the annotated images and, for a background-class model, the background images),
each a table plus its image folder. Under DDP the engine shards both loaders with a distributed sampler.

:class:`FullImageDataModule` is the same for the multi-label full-image model: its sources are image tables
(:func:`cytologia.classification.fullimage.image_table`), items whole letterboxed images with multi-hot targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset


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
    """Training and validation crop loaders for one fold."""

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
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _dataset(self, source: CropSource, train: bool) -> Dataset:
        from cytologia.classification.augment import build_transforms
        from cytologia.classification.crops import CropDataset

        transform = build_transforms(
            self.img_size,
            train,
            hue_saturation=bool(self.augment.get("hue_saturation", False)),
            bbox_aware_p=float(self.augment.get("bbox_aware_p", 0.5)),
            strength=str(self.augment.get("strength", "default")),
        )
        return CropDataset(
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

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        n = len(dataset)  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
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
