"""Classification losses: cross-entropy and focal loss for single-label crops (hard or soft targets), BCE and
sigmoid focal loss for the multi-label full-image model (23 classes + background).

Soft targets (MixUp/CutMix, see :func:`cytologia.classification.augment.mixup_cutmix`) are probabilities per
class; label smoothing is applied on top of them, ``q' = (1 - eps) * q + eps / K``, as
:func:`torch.nn.functional.cross_entropy` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cytologia.errors import CytologiaInputError

LOSS_NAMES: tuple[str, ...] = ("cross_entropy", "focal", "bce", "focal_multilabel")


def _check(label_smoothing: float, reduction: str) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise CytologiaInputError(f"label_smoothing={label_smoothing}: must be in [0, 1)")
    if reduction not in ("mean", "sum", "none"):
        raise CytologiaInputError(f"reduction={reduction!r}: must be mean, sum or none")


def _as_alpha(alpha: torch.Tensor | Sequence[float] | float | None, num_classes: int | None) -> torch.Tensor | None:
    if alpha is None:
        return None
    tensor = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1)
    if num_classes is not None and tensor.numel() not in (1, num_classes):
        raise CytologiaInputError(f"alpha has {tensor.numel()} values; expected 1 or {num_classes} (one per class)")
    if (tensor < 0).any():
        raise CytologiaInputError("alpha values must be >= 0")
    return tensor


def soft_targets(
    targets: torch.Tensor, num_classes: int, label_smoothing: float = 0.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B, K) probabilities from class indices (B,) or probabilities (B, K), with label smoothing applied."""
    if not 0.0 <= label_smoothing < 1.0:
        raise CytologiaInputError(f"label_smoothing={label_smoothing}: must be in [0, 1)")
    if targets.dim() == 1:
        if targets.is_floating_point():
            raise CytologiaInputError("1-D targets must be integer class indices")
        if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
            raise CytologiaInputError(f"class indices must lie in 0..{num_classes - 1}")
        q = F.one_hot(targets.long(), num_classes).to(dtype)
    elif targets.dim() == 2 and targets.shape[1] == num_classes:
        q = targets.to(dtype)
    else:
        raise CytologiaInputError(f"targets of shape {tuple(targets.shape)}: expected (B,) or (B, {num_classes})")
    if label_smoothing:
        q = q * (1.0 - label_smoothing) + label_smoothing / num_classes
    return q


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017) for single-label classification, with hard or soft targets.

    ``loss_i = -sum_k alpha_k * q_ik * (1 - p_ik) ** gamma * log p_ik`` with ``p = softmax(logits)`` and ``q`` the
    (smoothed) target distribution; for a hard target without smoothing this is the usual
    ``-alpha_y (1 - p_y) ** gamma log p_y``. ``gamma=0`` and no ``alpha`` give cross-entropy. ``alpha`` is one
    weight per class (or None). The batch mean is returned (``reduction='mean'``), or the sum / per-sample values.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: torch.Tensor | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise CytologiaInputError(f"focal gamma={gamma}: must be >= 0")
        _check(label_smoothing, reduction)
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        alpha_t = _as_alpha(alpha, None)
        self.register_buffer("alpha", alpha_t if alpha_t is not None else torch.ones(0), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[-1]
        log_p = F.log_softmax(logits.float(), dim=-1)
        q = soft_targets(targets, num_classes, self.label_smoothing, log_p.dtype).to(log_p.device)
        weight = (1.0 - log_p.exp()).clamp_min(0.0).pow(self.gamma) if self.gamma else torch.ones_like(log_p)
        if self.alpha.numel():
            if self.alpha.numel() not in (1, num_classes):
                raise CytologiaInputError(f"alpha has {self.alpha.numel()} values for {num_classes} classes")
            weight = weight * self.alpha.to(log_p.device)
        loss = -(q * weight * log_p).sum(dim=-1)
        return _reduce(loss, self.reduction)


class SoftCrossEntropyLoss(nn.Module):
    """Cross-entropy with label smoothing and optional per-class weights, for hard (B,) or soft (B, K) targets:
    ``loss_i = -sum_k w_k q_ik log p_ik``, averaged over the batch.

    Without weights this is :func:`torch.nn.functional.cross_entropy`. With weights, torch divides by the summed
    weights of the targets for class indices but by B for probabilities, so a batch would change scale when MixUp
    turns on; here both divide by B.
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        weight: torch.Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        _check(label_smoothing, reduction)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        w = _as_alpha(weight, None)
        self.register_buffer("weight", w if w is not None else torch.ones(0), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.weight.numel() and targets.dim() == 1:  # the common case: torch's fused kernel
            return F.cross_entropy(
                logits.float(), targets, label_smoothing=self.label_smoothing, reduction=self.reduction
            )
        log_p = F.log_softmax(logits.float(), dim=-1)
        q = soft_targets(targets, logits.shape[-1], self.label_smoothing, log_p.dtype).to(log_p.device)
        if self.weight.numel():
            if self.weight.numel() not in (1, logits.shape[-1]):
                raise CytologiaInputError(f"weight has {self.weight.numel()} values for {logits.shape[-1]} classes")
            q = q * self.weight.to(log_p.device)
        return _reduce(-(q * log_p).sum(dim=-1), self.reduction)


def multilabel_targets(
    targets: torch.Tensor, num_classes: int, label_smoothing: float = 0.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B, K) 0/1 (or soft) targets from a multi-hot (B, K) tensor or class indices (B,), smoothed towards 1/2:
    ``y' = y * (1 - eps) + eps / 2``."""
    if not 0.0 <= label_smoothing < 1.0:
        raise CytologiaInputError(f"label_smoothing={label_smoothing}: must be in [0, 1)")
    if targets.dim() == 1 and not targets.is_floating_point():
        if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
            raise CytologiaInputError(f"class indices must lie in 0..{num_classes - 1}")
        y = F.one_hot(targets.long(), num_classes).to(dtype)
    elif targets.dim() == 2 and targets.shape[1] == num_classes:
        y = targets.to(dtype)
    else:
        raise CytologiaInputError(f"targets of shape {tuple(targets.shape)}: expected (B, {num_classes}) or (B,)")
    return y * (1.0 - label_smoothing) + label_smoothing / 2.0 if label_smoothing else y


class MultiLabelBCELoss(nn.Module):
    """Binary cross-entropy over K independent labels (the full-image model: 23 classes + background), mean over
    all B x K terms; optional per-label ``pos_weight`` and label smoothing towards 1/2."""

    def __init__(
        self,
        label_smoothing: float = 0.0,
        pos_weight: torch.Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        _check(label_smoothing, reduction)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        pw = _as_alpha(pos_weight, None)
        self.register_buffer("pos_weight", pw if pw is not None else torch.ones(0), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = multilabel_targets(targets, logits.shape[-1], self.label_smoothing, torch.float32).to(logits.device)
        pos_weight = self.pos_weight if self.pos_weight.numel() else None
        return F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pos_weight, reduction=self.reduction)


class MultiLabelFocalLoss(nn.Module):
    """Sigmoid focal loss over K independent labels (RetinaNet form), mean over all B x K terms.

    ``loss = -[a_k y (1-s)^gamma log s + (1 - a_k)(1 - y) s^gamma log(1 - s)]`` with ``s = sigmoid(logit)``;
    ``alpha`` (a scalar or one per label) weights positives against negatives -- None weights both by 1.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: torch.Tensor | Sequence[float] | float | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise CytologiaInputError(f"focal gamma={gamma}: must be >= 0")
        _check(label_smoothing, reduction)
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        a = _as_alpha(alpha, None)
        if a is not None and (a > 1).any():
            raise CytologiaInputError("multi-label focal alpha must lie in [0, 1]")
        self.register_buffer("alpha", a if a is not None else torch.ones(0), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        y = multilabel_targets(targets, x.shape[-1], self.label_smoothing, x.dtype).to(x.device)
        s = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        # 1 - p_t where p_t is the probability given to the (soft) truth: works for smoothed targets too.
        p_t = s * y + (1.0 - s) * (1.0 - y)
        loss = ce * (1.0 - p_t).clamp_min(0.0).pow(self.gamma)
        if self.alpha.numel():
            a = self.alpha.to(x.device)
            loss = loss * (a * y + (1.0 - a) * (1.0 - y))
        return _reduce(loss, self.reduction)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def create_loss(
    name: str,
    num_classes: int,
    *,
    label_smoothing: float = 0.0,
    gamma: float = 2.0,
    alpha: torch.Tensor | Sequence[float] | float | None = None,
) -> nn.Module:
    """The loss called ``name``: ``cross_entropy`` (``alpha`` = per-class weights), ``focal``, ``bce``
    (``alpha`` = per-label positive weights) or ``focal_multilabel``. ``num_classes`` checks ``alpha``'s length."""
    if name not in LOSS_NAMES:
        raise CytologiaInputError(f"unknown loss {name!r}; valid: {', '.join(LOSS_NAMES)}")
    if num_classes < 1:
        raise CytologiaInputError(f"num_classes={num_classes}: must be >= 1")
    _as_alpha(alpha, num_classes)  # length check
    if name == "cross_entropy":
        return SoftCrossEntropyLoss(label_smoothing=label_smoothing, weight=alpha)  # type: ignore[arg-type]
    if name == "focal":
        return FocalLoss(gamma=gamma, alpha=alpha, label_smoothing=label_smoothing)  # type: ignore[arg-type]
    if name == "bce":
        return MultiLabelBCELoss(label_smoothing=label_smoothing, pos_weight=alpha)  # type: ignore[arg-type]
    return MultiLabelFocalLoss(gamma=gamma, alpha=alpha, label_smoothing=label_smoothing)


class DistillationLoss(nn.Module):
    """Knowledge distillation (Hinton et al. 2015) of a teacher's class distribution into a student, mixed with the
    usual loss on the hard label: ``kd_weight * T^2 * KL(p_T || softmax(z / T)) + (1 - kd_weight) * hard(z, y)``.

    ``p_T`` is the teacher's distribution softened at temperature ``T`` (:meth:`targets`: ``softmax(log p / T)``
    from the teacher's log-probabilities); ``T^2`` keeps the gradient of the soft term on the scale of the hard one
    as ``T`` grows. ``hard`` is the classifier's configured loss (cross-entropy or focal, with its smoothing and class
    weights). The targets are one ``(B, 2K)`` tensor -- the hard label one-hot (all zeros for an item without a
    label: an unlabelled crop contributes only the soft term) next to ``p_T`` -- so MixUp/CutMix mixes both halves
    with the same weights as the images. The hard term is summed over the labelled rows and divided by the batch
    size, so a batch with fewer labels gets proportionally less of it.
    """

    def __init__(self, hard: nn.Module, temperature: float = 2.0, kd_weight: float = 0.7) -> None:
        super().__init__()
        if not temperature > 0:
            raise CytologiaInputError(f"distillation temperature={temperature}: must be > 0")
        if not 0.0 <= kd_weight <= 1.0:
            raise CytologiaInputError(f"distillation kd_weight={kd_weight}: must be in [0, 1]")
        self.hard = hard
        self.temperature = float(temperature)
        self.kd_weight = float(kd_weight)

    def targets(self, labels: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
        """``(B, 2K)``: one-hot ``labels`` (B,) (-1: none, a zero row) and the teacher's softened distribution from
        its log-probabilities ``(B, K)``; a teacher row that is not finite is an error (every item needs one)."""
        if teacher_log_probs.dim() != 2 or len(teacher_log_probs) != len(labels):
            raise CytologiaInputError(f"teacher targets {tuple(teacher_log_probs.shape)} for {len(labels)} labels")
        if not torch.isfinite(teacher_log_probs).all():
            raise CytologiaInputError("a training item has no finite teacher target (distillation needs one per item)")
        k = teacher_log_probs.shape[1]
        known = labels >= 0
        hard = F.one_hot(labels.clamp_min(0).long(), k).float() * known.unsqueeze(1).float()
        soft = F.softmax(teacher_log_probs.float() / self.temperature, dim=-1)
        return torch.cat([hard, soft], dim=1)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        k = logits.shape[-1]
        if targets.dim() != 2 or targets.shape[1] != 2 * k:
            raise CytologiaInputError(f"distillation targets of shape {tuple(targets.shape)}: expected (B, {2 * k})")
        x = logits.float()
        hard, soft = targets[:, :k].float(), targets[:, k:].float()
        log_student = F.log_softmax(x / self.temperature, dim=-1)
        kd = (soft * (torch.log(soft.clamp_min(1e-12)) - log_student)).sum(dim=-1).mean() * self.temperature**2
        labelled = hard.sum(dim=-1) > 0
        hard_term = x.new_zeros(())
        if labelled.any():
            hard_term = self.hard(x[labelled], hard[labelled]) * labelled.float().mean()
        return self.kd_weight * kd + (1.0 - self.kd_weight) * hard_term
