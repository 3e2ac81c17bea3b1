"""The classifier as a LightningModule: one engine for CPU, one GPU and multi-GPU DDP.

AdamW (no weight decay on biases and norm weights), cosine schedule with linear warm-up stepped per optimizer step,
MixUp/CutMix per batch, validation macro-F1 each epoch (the challenge's scikit-learn macro average over the union
of true and predicted labels). Under DDP every rank sees a shard of the validation set (padded by repeating samples),
so predictions are gathered and de-duplicated by dataset index before the metric: every rank computes the same
number over the whole fold.

A model with a 24th "background" label is scored on the 23 cell classes: its prediction for a box is the best of
the 23 class logits (every box of the challenge must get a class).

Multi-label full-image model (``multilabel=True``, the 1st place's): batches carry a multi-hot ``target`` (B, K)
-- what the loss (``bce`` or ``focal_multilabel``) and MixUp/CutMix use -- and a ``label`` that is the class of the
image's only cell, -1 for images with several cells or none. The checkpoint metric ``val/macro_f1`` is then the
macro-F1 of the argmax over the 23 class logits on the **single-cell** held-out images: the only images on which the
ensemble blends this model in. ``val/mean_ap`` (macro average precision over the labels with a positive among the
held-out images, :func:`mean_average_precision`) is logged beside it: it measures the whole multi-label ranking,
multi-cell images included, without a threshold.

A distilled student (``distill={"temperature": T, "kd_weight": a}``, :mod:`cytologia.classification.distill`) is the
same module with another training target: batches also carry the teacher's log-probabilities (``teacher``), and the
configured loss becomes the hard-label term of a
:class:`~cytologia.classification.losses.DistillationLoss`. Validation, checkpoints and prediction are unchanged,
so a student loads, exports and predicts like any crop classifier.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from cytologia.classification.augment import mixup_cutmix
from cytologia.classification.losses import create_loss
from cytologia.classification.models import create_classifier
from cytologia.data.schema import CLASSES
from cytologia.errors import CytologiaInputError
from cytologia.metrics import macro_f1

MONITOR = "val/macro_f1"  # the metric that picks the best checkpoint (single-cell images for a multi-label model)
MEAN_AP = "val/mean_ap"  # multi-label models: macro average precision over the held-out images
MULTILABEL_LOSSES: tuple[str, ...] = ("bce", "focal_multilabel")  # sigmoid losses: the ones a multi-hot target fits


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning precision for a config value: "auto" is bf16 autocast on a GPU that supports it, fp16 autocast with
    loss scaling on other GPUs, fp32 on CPU; "32" means "32-true"; other values pass through."""
    if precision == "32":
        return "32-true"
    if precision != "auto":
        return precision
    if accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def checkpoint_callbacks(dirpath: str | Path) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """``(best, last)``: ``best.ckpt`` at the best validation macro-F1, ``last.ckpt`` rewritten after every epoch.

    Two callbacks because the engine's ``save_last=True`` (Lightning 2.6) refreshes ``last.ckpt`` only when another
    checkpoint is saved in the same step -- i.e. only when the monitored metric improves -- so a run killed after
    epochs without improvement would resume from an old epoch. ``last.ckpt`` keeps the raw weights next to the EMA
    ones (``current_model_state``) so a resume continues both.
    """
    best = ModelCheckpoint(
        dirpath=dirpath,
        filename="best",
        monitor=MONITOR,
        mode="max",
        save_top_k=1,
        save_last=False,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(
        dirpath=dirpath,
        filename="last",
        monitor=None,
        save_top_k=1,
        save_last=False,
        every_n_epochs=1,
        enable_version_counter=False,
    )
    return best, last


def cosine_with_warmup(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Any:
    """LR multiplier per optimizer step: linear from 1/warmup to 1 over ``warmup_steps``, then a half cosine down to
    ``min_lr_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on weight matrices / kernels, none on biases, norms, tokens and
    position embeddings (every parameter with fewer than 2 dimensions, plus timm's ``no_weight_decay`` names)."""
    skip: set[str] = set()
    if hasattr(model, "no_weight_decay"):
        skip = set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ClassifierModule(L.LightningModule):
    """A timm/DinoBloom classifier (from :func:`cytologia.classification.models.create_classifier`) plus its loss,
    optimizer, schedule and validation metric. Every argument is saved in the checkpoint's hyper-parameters, so
    :meth:`from_checkpoint` rebuilds it without the config."""

    def __init__(
        self,
        model_name: str,
        label_names: list[str],
        img_size: int,
        *,
        weights: str | None = None,
        drop_path: float = 0.0,
        train_last_k: int | None = None,
        loss: dict[str, Any] | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        mix: dict[str, float] | None = None,
        multilabel: bool = False,
        distill: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.label_names = list(label_names)
        self.num_classes = len(self.label_names)
        self.model = create_classifier(
            model_name,
            self.num_classes,
            img_size=img_size,
            weights=weights,
            drop_path=drop_path,
            train_last_k=train_last_k,
        )
        default_loss = "focal_multilabel" if multilabel else "cross_entropy"
        loss = dict(loss or {"name": default_loss, "label_smoothing": 0.0, "gamma": 2.0, "alpha": None})
        if multilabel and loss["name"] not in MULTILABEL_LOSSES:
            raise CytologiaInputError(
                f"loss {loss['name']!r} is a softmax loss: a multi-label model needs one of "
                f"{', '.join(MULTILABEL_LOSSES)}"
            )
        self.multilabel = bool(multilabel)
        self.criterion = create_loss(
            loss["name"],
            self.num_classes,
            label_smoothing=loss.get("label_smoothing", 0.0),
            gamma=loss.get("gamma", 2.0),
            alpha=loss.get("alpha"),
        )
        self.distill = dict(distill) if distill else None
        if self.distill is not None:  # a student: the configured loss becomes the hard-label term
            if multilabel:
                raise CytologiaInputError("distillation trains a single-label crop model, not a multi-label one")
            from cytologia.classification.losses import DistillationLoss

            self.criterion = DistillationLoss(self.criterion, **self.distill)
        self.mix = dict(mix or {})
        # The class logits a prediction is taken from: the 23 cell classes (background, when present, is last).
        self.n_cell_classes = min(self.num_classes, len(CLASSES))
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []

    # ----------------------------------------------------------------------------------------------------- steps
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _mixed(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MixUp/CutMix per batch with probability ``mix_prob`` (soft targets), else the batch as it is."""
        prob, mixup, cutmix = (float(self.mix.get(k, 0.0)) for k in ("mix_prob", "mixup_alpha", "cutmix_alpha"))
        if prob <= 0 or (mixup <= 0 and cutmix <= 0):
            return images, labels
        width = labels.shape[1] if labels.dim() == 2 else self.num_classes  # a student's targets are (B, 2K)
        return mixup_cutmix(images, labels, width, alpha_mixup=mixup, alpha_cutmix=cutmix, prob=prob)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        targets = batch["target" if self.multilabel else "label"]
        if self.distill is not None:  # hard label + the teacher's softened distribution, mixed together below
            targets = self.criterion.targets(targets, batch["teacher"])
        images, targets = self._mixed(batch["image"], targets)
        logits = self(images)
        loss = self.criterion(logits.float(), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["image"]).float()
        labels = batch["label"]
        if self.multilabel:
            loss = self.criterion(logits, batch["target"])
            self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=logits.shape[0])
            self._val_targets.append(batch["target"].detach())
        else:
            known = labels >= 0
            if known.any():
                loss = nn.functional.cross_entropy(logits[known], labels[known])
                self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=int(known.sum()))
        self._val_logits.append(logits.detach())
        self._val_labels.append(labels.detach())
        self._val_index.append(batch["index"].detach())

    def on_validation_epoch_start(self) -> None:
        self._val_logits, self._val_labels, self._val_index, self._val_targets = [], [], [], []

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        gathered = [torch.cat(self._val_logits), torch.cat(self._val_labels), torch.cat(self._val_index)]
        if self.multilabel:
            gathered.append(torch.cat(self._val_targets))
        self._val_logits, self._val_labels, self._val_index, self._val_targets = [], [], [], []
        if self.trainer.world_size > 1:  # equal shard sizes: the distributed sampler pads with repeated samples
            gathered = [self.all_gather(t).flatten(0, 1) for t in gathered]
        _, first = np.unique(gathered[2].cpu().numpy(), return_index=True)
        if self.trainer.sanity_checking:
            return
        logits_np, labels_np = gathered[0].cpu().numpy()[first], gathered[1].cpu().numpy()[first]
        f1, acc = score_logits(logits_np, labels_np, self.label_names, self.n_cell_classes)
        # Every rank holds the same gathered numbers, so averaging them across ranks changes nothing.
        self.log(MONITOR, f1, prog_bar=True, sync_dist=True)
        self.log("val/accuracy", acc, sync_dist=True)
        if self.multilabel:
            self.log(MEAN_AP, mean_average_precision(logits_np, gathered[3].cpu().numpy()[first]), sync_dist=True)

    # ---------------------------------------------------------------------------------------------- optimization
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(decay_groups(self.model, hp.weight_decay), lr=hp.lr)
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs))
        warmup = min(total, int(round(hp.warmup_epochs * per_epoch)))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}

    # ---------------------------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> ClassifierModule:
        """Rebuild a module from one of our checkpoints (random init, then the checkpoint's weights -- the original
        pretrained-weights file is not needed)."""
        path = Path(path)
        if not path.is_file():
            raise CytologiaInputError(f"{path}: no such checkpoint")
        ckpt = load_checkpoint(path, map_location)
        if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
            raise CytologiaInputError(f"{path}: not a cytologia classifier checkpoint (no hyper_parameters/state_dict)")
        hp = dict(ckpt["hyper_parameters"])
        hp["weights"] = None
        module = cls(**hp)
        module.load_state_dict(ckpt["state_dict"])
        return module


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint of ours as a dict, read without running pickled code (``weights_only``) and memory-mapped, so
    reading its hyper-parameters does not load gigabytes of optimizer state."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as err:  # zip / pickle errors of all kinds, or code a weights-only load refuses
        raise CytologiaInputError(f"{path}: not a readable checkpoint ({err})") from None


def score_logits(
    logits: np.ndarray, labels: np.ndarray, label_names: list[str] | tuple[str, ...], n_cell_classes: int = len(CLASSES)
) -> tuple[float, float]:
    """(macro-F1, accuracy) of the argmax over the first ``n_cell_classes`` logits, on rows with a known label
    (label >= 0). Macro-F1 is the challenge's (union of true and predicted labels); (0, 0) without known rows."""
    known = labels >= 0
    if not known.any():
        return 0.0, 0.0
    names = np.asarray(label_names, dtype=object)
    pred = logits[known, :n_cell_classes].argmax(axis=1)
    true = labels[known]
    f1 = macro_f1(names[true], names[pred])[0]
    return float(f1), float((pred == true).mean())


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of one label (scikit-learn's ``average_precision_score``): ``sum_n (R_n - R_{n-1}) P_n`` over
    the distinct score thresholds, highest first (tied scores form one threshold); NaN without a positive."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores for {len(positive)} targets")
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last row of every tie group
    tp = np.cumsum(y)[last].astype(np.float64)
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Macro mean of :func:`average_precision` over the label columns of ``targets`` (n, K; positive where > 0.5)
    that hold at least one positive; 0 when none does. ``scores`` (n, K) are logits or probabilities (any monotone
    transform gives the same value)."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape}: need the same (n, K) shape")
    values = [average_precision(scores[:, k], targets[:, k] > 0.5) for k in range(scores.shape[1])]
    present = [v for v in values if not np.isnan(v)]
    return float(np.mean(present)) if present else 0.0


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    *,
    hflip: bool = False,
    precision: str = "32-true",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of every batch: ``(logits (n, K) float32, hflip logits (n, K) or empty, dataset index (n,))``.

    ``hflip`` also runs the horizontally flipped images. ``precision`` "bf16-mixed"/"16-mixed" autocasts on CUDA.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    plain, flipped, index = [], [], []
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda"):
            plain.append(model(images).float().cpu())
            if hflip:
                flipped.append(model(torch.flip(images, dims=(3,))).float().cpu())
        index.append(batch["index"].cpu())
    if not plain:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    out = torch.cat(plain).numpy()
    flip = torch.cat(flipped).numpy() if hflip else np.zeros((0, out.shape[1]), np.float32)
    return out, flip, torch.cat(index).numpy().astype(np.int64)
