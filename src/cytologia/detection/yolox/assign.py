"""SimOTA label assignment (YOLOX paper, section 2.2 "SimOTA"), for one image at a time.

Optimal-transport assignment simplified to a dynamic top-k: each ground-truth box ``g`` takes the ``k_g`` anchors of
lowest cost, where ``k_g`` is the integer part of the sum of the 10 highest IoUs between ``g`` and the predicted
boxes of the candidates (at least 1) -- a box that the network already covers well gets more positives. The cost of
pairing ``g`` with anchor ``a`` is::

    cost = BCE(sqrt(p_cls * p_obj), one_hot(class of g))  +  3 * (-log IoU(g, box_a))  +  1e6 * [a not in g's prior]

An anchor is in the *centre region* of ``g`` when its cell centre lies within ``radius`` strides of the centre of
``g`` on both axes. Two variants of the prior (``mode``):

- ``"center"`` (default): candidates are the anchors in the centre region (radius 1.5) of some box; the penalty
  applies outside ``g``'s centre region. The later YOLOX code uses this form.
- ``"box_and_center"``: candidates are the anchors whose cell centre is inside some box *or* its centre region
  (radius 2.5); the penalty applies unless the anchor is inside ``g`` *and* its centre region. The 0.3.0 release
  (PyPI ``yolox``) behaves this way: ``scripts/yolox_parity.py`` matches its losses in this mode.

An anchor matched to several boxes keeps the box of lowest cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cytologia.detection.yolox.boxes import pairwise_iou

ASSIGN_MODES: tuple[str, ...] = ("center", "box_and_center")
# strides around a box centre in which anchors are candidates, per mode (see the module docstring)
CENTER_RADIUS: dict[str, float] = {"center": 1.5, "box_and_center": 2.5}
TOPK_IOU = 10  # highest IoUs summed to give a box's number of positives
IOU_COST_WEIGHT = 3.0
OUTSIDE_COST = 1e6  # added to the cost of an anchor outside the box's centre region: chosen only when nothing else is


@dataclass
class Assignment:
    """Which anchors are positives (``fg_mask``, (anchors,)), the box each positive is assigned to (``matched_gt``,
    (n_fg,), index into the image's boxes) and the IoU of its predicted box with that box (``matched_iou``)."""

    fg_mask: torch.Tensor
    matched_gt: torch.Tensor
    matched_iou: torch.Tensor

    @property
    def num_fg(self) -> int:
        return int(self.matched_gt.numel())


def center_prior(gt_boxes: torch.Tensor, grid: torch.Tensor, strides: torch.Tensor, radius: float) -> torch.Tensor:
    """(n_gt, anchors) bool: the anchor's cell centre lies within ``radius`` strides of the box centre on both axes.

    ``gt_boxes``: (n, 4) centre-size in input pixels; ``grid``: (anchors, 2) cell indices (x, y); ``strides``:
    (anchors, 1).
    """
    centers = (grid + 0.5) * strides  # (A, 2) cell centres in pixels
    reach = radius * strides[:, 0]  # (A,)
    dx = (centers[None, :, 0] - gt_boxes[:, None, 0]).abs()
    dy = (centers[None, :, 1] - gt_boxes[:, None, 1]).abs()
    return (dx < reach[None]) & (dy < reach[None])


def in_boxes(gt_boxes: torch.Tensor, grid: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """(n_gt, anchors) bool: the anchor's cell centre lies strictly inside the box."""
    centers = (grid + 0.5) * strides
    dx = (centers[None, :, 0] - gt_boxes[:, None, 0]).abs()
    dy = (centers[None, :, 1] - gt_boxes[:, None, 1]).abs()
    return (dx < gt_boxes[:, None, 2] / 2) & (dy < gt_boxes[:, None, 3] / 2)


def prior(
    gt_boxes: torch.Tensor, grid: torch.Tensor, strides: torch.Tensor, mode: str = "center", radius: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate anchors (anchors,) bool and the (n_gt, anchors) pairs free of the outside-prior penalty."""
    if mode not in ASSIGN_MODES:
        raise ValueError(f"unknown SimOTA mode {mode!r}; choose one of {', '.join(ASSIGN_MODES)}")
    centre = center_prior(gt_boxes, grid, strides, CENTER_RADIUS[mode] if radius is None else radius)
    if mode == "center":
        return centre.any(dim=0), centre
    box = in_boxes(gt_boxes, grid, strides)
    return (centre | box).any(dim=0), centre & box


@torch.no_grad()
def simota(
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    pred_boxes: torch.Tensor,
    cls_logits: torch.Tensor,
    obj_logits: torch.Tensor,
    grid: torch.Tensor,
    strides: torch.Tensor,
    *,
    mode: str = "center",
    center_radius: float | None = None,
) -> Assignment:
    """Assign anchors of one image to its ``n`` ground-truth boxes (see the module docstring).

    ``gt_boxes`` (n, 4) and ``pred_boxes`` (anchors, 4): centre-size, input pixels; ``gt_classes`` (n,) long;
    ``cls_logits`` (anchors, C); ``obj_logits`` (anchors,) or (anchors, 1); ``grid``, ``strides`` as from
    :func:`cytologia.detection.yolox.model.make_grid`; ``mode`` and ``center_radius`` (None: the mode's default)
    choose the prior.
    """
    device = pred_boxes.device
    n_anchors, n_gt = pred_boxes.shape[0], gt_boxes.shape[0]
    fg_mask = torch.zeros(n_anchors, dtype=torch.bool, device=device)
    empty = Assignment(fg_mask, torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device))
    if n_gt == 0:
        return empty
    candidates, inside = prior(gt_boxes.float(), grid, strides, mode, center_radius)  # (A,), (n, A)
    cand = candidates.nonzero(as_tuple=True)[0]
    if cand.numel() == 0:
        return empty
    inside = inside[:, cand]
    ious = pairwise_iou(gt_boxes.float(), pred_boxes[cand].float())  # (n, m)
    num_classes = cls_logits.shape[-1]
    prob = (cls_logits[cand].float().sigmoid() * obj_logits.reshape(-1, 1)[cand].float().sigmoid()).sqrt()
    onehot = F.one_hot(gt_classes.long(), num_classes).float()  # (n, C)
    cls_cost = F.binary_cross_entropy(
        prob[None].expand(n_gt, -1, -1), onehot[:, None].expand(-1, cand.numel(), -1), reduction="none"
    ).sum(dim=-1)
    cost = cls_cost + IOU_COST_WEIGHT * -torch.log(ious + 1e-8) + OUTSIDE_COST * (~inside).float()

    # dynamic k: the integer part of the sum of each box's highest IoUs, at least 1
    top = ious.topk(min(TOPK_IOU, cand.numel()), dim=1).values
    k = top.sum(dim=1).int().clamp(min=1)  # (n,)
    rank = torch.empty_like(cost, dtype=torch.long)
    order = cost.argsort(dim=1, stable=True)
    rank.scatter_(1, order, torch.arange(cand.numel(), device=device).expand(n_gt, -1).contiguous())
    matching = rank < k[:, None]  # (n, m): box g takes its k_g cheapest anchors
    shared = matching.sum(dim=0) > 1
    if shared.any():  # an anchor taken by several boxes goes to the box of lowest cost
        best = cost[:, shared].argmin(dim=0)
        matching[:, shared] = False
        matching[best, shared.nonzero(as_tuple=True)[0]] = True
    positive = matching.any(dim=0)
    matched_gt = matching[:, positive].float().argmax(dim=0)
    matched_iou = ious[matched_gt, positive.nonzero(as_tuple=True)[0]]
    fg_mask[cand[positive]] = True
    return Assignment(fg_mask, matched_gt, matched_iou)
