"""Box geometry shared by the assignment and the losses: centre-size boxes (cx, cy, w, h), IoU and GIoU."""

from __future__ import annotations

import torch

EPS = 1e-16  # guards the IoU / GIoU divisions against empty boxes


def _corners(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-size (..., 4) -> top-left and bottom-right corners (..., 2) each."""
    return b[..., :2] - b[..., 2:4] / 2, b[..., :2] + b[..., 2:4] / 2


def iou_giou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise IoU and GIoU of centre-size boxes (..., 4) -> (...,) each."""
    p_tl, p_br = _corners(pred)
    t_tl, t_br = _corners(target)
    inter_wh = (torch.minimum(p_br, t_br) - torch.maximum(p_tl, t_tl)).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = pred[..., 2] * pred[..., 3] + target[..., 2] * target[..., 3] - inter
    iou = inter / (union + EPS)
    hull_wh = (torch.maximum(p_br, t_br) - torch.minimum(p_tl, t_tl)).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou, iou - (hull - union) / hull.clamp(min=EPS)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of centre-size boxes: (n, 4) x (m, 4) -> (n, m)."""
    return iou_giou(a[:, None, :], b[None, :, :])[0]
