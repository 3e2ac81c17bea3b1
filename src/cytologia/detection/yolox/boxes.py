"""Centre-size boxes (cx, cy, w, h) for the assignment and the losses: their IoU and GIoU by :mod:`cytologia.boxes`."""

from __future__ import annotations

import torch

from cytologia import boxes

EPS = 1e-16  # guards the IoU / GIoU divisions against empty boxes


def _corners(b: torch.Tensor) -> torch.Tensor:
    """Centre-size (..., 4) -> corners x1, y1, x2, y2 (..., 4)."""
    return torch.cat([b[..., :2] - b[..., 2:4] / 2, b[..., :2] + b[..., 2:4] / 2], dim=-1)


def iou_giou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise IoU and GIoU of centre-size boxes (..., 4) -> (...,) each; the areas are ``w * h``."""
    return boxes.iou_giou(
        _corners(pred),
        _corners(target),
        eps=EPS,
        area_a=pred[..., 2] * pred[..., 3],
        area_b=target[..., 2] * target[..., 3],
    )


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of centre-size boxes: (n, 4) x (m, 4) -> (n, m)."""
    return iou_giou(a[:, None, :], b[None, :, :])[0]
