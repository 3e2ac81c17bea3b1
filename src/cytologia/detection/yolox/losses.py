"""YOLOX losses: box (IoU or GIoU), objectness and class BCE, optional L1 on the raw box outputs.

For a batch, anchors are assigned with SimOTA (:mod:`cytologia.detection.yolox.assign`), then::

    total = 5 * box + obj + cls (+ l1)        each summed over the batch and divided by the number of positives

- box: over positives, between the decoded predicted box and its assigned truth box. ``"giou"``: ``1 - GIoU``
  (Rezatofighi et al. 2019) -- the challenge scores boxes by GIoU, and GIoU still has a gradient for boxes that do not
  overlap their target; ``"iou"``: ``1 - IoU**2``, the IoU loss of the YOLOX release.
- obj: BCE of every anchor's objectness, target 1 on positives, 0 elsewhere.
- cls: over positives, BCE with an IoU-aware target: ``one_hot(class) * IoU(predicted box, truth box)``.
- l1: over positives, L1 between the raw box outputs and the truth box in the same encoding (cell offset,
  log-size / stride); YOLOX switches it on for the last epochs, when strong augmentation is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cytologia.detection.yolox.assign import simota
from cytologia.detection.yolox.boxes import iou_giou
from cytologia.detection.yolox.model import decode_boxes

BOX_LOSSES: tuple[str, ...] = ("giou", "iou")
REG_WEIGHT = 5.0  # weight of the box loss in the total (YOLOX)


def box_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "giou") -> torch.Tensor:
    """Per-box loss of centre-size boxes (n, 4): ``"giou"`` -> ``1 - GIoU``; ``"iou"`` -> ``1 - IoU**2``."""
    iou, giou = iou_giou(pred, target)
    if kind == "giou":
        return 1.0 - giou.clamp(min=-1.0, max=1.0)
    if kind == "iou":
        return 1.0 - iou**2
    raise ValueError(f"unknown box loss {kind!r}; choose one of {', '.join(BOX_LOSSES)}")


@dataclass
class LossOutput:
    """The total loss (with graph) and its parts (detached floats for logging)."""

    total: torch.Tensor
    box: float
    obj: float
    cls: float
    l1: float
    num_fg: float

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "box_loss": self.box,
            "obj_loss": self.obj,
            "cls_loss": self.cls,
            "l1_loss": self.l1,
            "num_fg_per_image": self.num_fg,
        }


def l1_target(boxes: torch.Tensor, grid: torch.Tensor, strides: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Truth boxes (n, 4) centre-size in pixels, encoded like the raw outputs of their anchors (grid (n, 2), strides
    (n, 1)): cell offset and log of size/stride."""
    return torch.cat((boxes[:, :2] / strides - grid, torch.log(boxes[:, 2:4] / strides + eps)), dim=1)


def yolox_loss(
    raw: torch.Tensor,
    grid: torch.Tensor,
    strides: torch.Tensor,
    targets: list[torch.Tensor],
    *,
    kind: str = "giou",
    use_l1: bool = False,
    reg_weight: float = REG_WEIGHT,
    assign_mode: str = "center",
    center_radius: float | None = None,
) -> LossOutput:
    """Losses of a batch. ``raw``: (B, anchors, 5 + C) undecoded outputs; ``grid`` (anchors, 2), ``strides``
    (anchors, 1); ``targets``: per image an (n, 5) tensor ``class, cx, cy, w, h`` in input pixels (n may be 0).
    ``assign_mode`` / ``center_radius``: the SimOTA prior (:func:`cytologia.detection.yolox.assign.simota`)."""
    if kind not in BOX_LOSSES:
        raise ValueError(f"unknown box loss {kind!r}; choose one of {', '.join(BOX_LOSSES)}")
    raw = raw.float()
    batch, _, width = raw.shape
    num_classes = width - 5
    boxes = decode_boxes(raw, grid, strides)  # (B, A, 4), with gradient
    obj_logits, cls_logits = raw[..., 4], raw[..., 5:]
    fg_masks, cls_targets, box_targets, l1_targets = [], [], [], []
    for b in range(batch):
        t = targets[b].to(raw.device).float()
        a = simota(
            t[:, 1:5],
            t[:, 0].long(),
            boxes[b].detach(),
            cls_logits[b].detach(),
            obj_logits[b].detach(),
            grid,
            strides,
            mode=assign_mode,
            center_radius=center_radius,
        )
        fg_masks.append(a.fg_mask)
        matched = t[a.matched_gt]
        cls_targets.append(F.one_hot(matched[:, 0].long(), num_classes).float() * a.matched_iou[:, None])
        box_targets.append(matched[:, 1:5])
        if use_l1:
            l1_targets.append(l1_target(matched[:, 1:5], grid[a.fg_mask], strides[a.fg_mask]))
    fg = torch.cat(fg_masks)
    n_fg = int(fg.sum())
    norm = float(max(n_fg, 1))
    loss_box = box_loss(boxes.reshape(-1, 4)[fg], torch.cat(box_targets), kind).sum() / norm
    loss_obj = F.binary_cross_entropy_with_logits(obj_logits.reshape(-1), fg.float(), reduction="sum") / norm
    fg_cls = cls_logits.reshape(-1, num_classes)[fg]
    loss_cls = F.binary_cross_entropy_with_logits(fg_cls, torch.cat(cls_targets), reduction="sum") / norm
    total = reg_weight * loss_box + loss_obj + loss_cls
    loss_l1 = torch.zeros((), device=raw.device)
    if use_l1:
        loss_l1 = (raw[..., :4].reshape(-1, 4)[fg] - torch.cat(l1_targets)).abs().sum() / norm
        total = total + loss_l1
    return LossOutput(
        total=total,
        box=float(loss_box.detach()),
        obj=float(loss_obj.detach()),
        cls=float(loss_cls.detach()),
        l1=float(loss_l1.detach()),
        num_fg=n_fg / max(batch, 1),
    )
