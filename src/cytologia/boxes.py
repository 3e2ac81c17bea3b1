"""Box geometry for every layer: area, clipping, IoU and GIoU of ``x1, y1, x2, y2`` corner boxes.

The score (:mod:`cytologia.metrics`), box fusion, noisy-box cleaning, the synthetic generator and the YOLOX loss all
compute overlaps here. This module imports nothing else from cytologia, and torch only where it is given tensors.

Conventions (the challenge reference's; every caller relies on them):

- corners are continuous pixel coordinates: ``area = (x2 - x1) * (y2 - y1)``, no "+1 pixel";
- box areas are not clipped (an inverted box has a negative area, or a positive one when inverted on both axes);
  the sides of the intersection are (``max(side, 0)``);
- ``IoU = inter / max(union, eps)`` and ``GIoU = IoU - (enclose - union) / max(enclose, eps)`` with
  ``union = area_a + area_b - inter``, in that operation order (the reference's, so results round as its do);
  ``eps`` is :data:`EPS`, the reference's floor, unless the caller passes its own;
- a NaN coordinate gives NaN (without a numpy RuntimeWarning), as in the reference;
- numpy input (anything that is not a torch tensor: arrays, lists, tuples, DataFrames) is computed in float64 and
  gives numpy arrays; torch tensors (both arguments) keep their dtype, device and autograd graph.

Shapes: :func:`iou`, :func:`giou` and :func:`iou_giou` pair ``a`` and ``b`` elementwise ("aligned") over the leading
dimensions, with broadcasting -- ``(n, 4)`` and ``(n, 4)`` -> ``(n,)``, ``(4,)`` and ``(k, 4)`` -> ``(k,)``;
:func:`pairwise_iou` and :func:`pairwise_giou` take every pair, ``(n, 4)`` x ``(m, 4)`` -> ``(n, m)``.
:func:`giou_columns` takes the eight coordinate columns (the score's path: no ``(n, 4)`` array is built);
:func:`iou_scalar` and :func:`best_overlap` plain Python numbers, for loops over a handful of boxes where numpy's
per-call overhead costs more than the arithmetic.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

EPS = 1e-7  # the reference's floor on the union and enclosing areas before dividing

Boxes = Any  # an array-like of (..., 4) corner boxes, or a torch tensor


def _is_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _as_float64(boxes: Boxes, name: str) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != 4:
        raise ValueError(f"{name}: boxes must have a last dimension of 4 (x1, y1, x2, y2), got shape {arr.shape}")
    return arr


def _check_tensor(boxes: Any, name: str) -> Any:
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(
            f"{name}: boxes must have a last dimension of 4 (x1, y1, x2, y2), got shape {tuple(boxes.shape)}"
        )
    return boxes


def _kind(a: Boxes, b: Boxes) -> bool:
    """True for two torch tensors, False for two numpy inputs; a mix is an error."""
    ta, tb = _is_tensor(a), _is_tensor(b)
    if ta != tb:
        raise TypeError("boxes: give two torch tensors or two numpy arrays, not one of each")
    return ta


def _numpy_overlap(
    cols_a: Sequence[np.ndarray],
    cols_b: Sequence[np.ndarray],
    eps: float,
    kind: str,
    area_a: np.ndarray | None = None,
    area_b: np.ndarray | None = None,
) -> Any:
    """IoU (``kind="iou"``), GIoU (``"giou"``) or both (``"both"``) of broadcastable float64 coordinate columns.

    Computed in place in five buffers of the broadcast shape: fresh temporaries for every step cost more than the
    arithmetic (the score runs this on every (truth box, prediction) pair of a data set)."""
    ax1, ay1, ax2, ay2 = cols_a
    bx1, by1, bx2, by2 = cols_b
    shapes = [np.shape(v) for v in (*cols_a, *cols_b)]
    if area_a is not None:
        shapes.append(np.shape(area_a))
    if area_b is not None:
        shapes.append(np.shape(area_b))
    shape = np.broadcast_shapes(*shapes)
    inter, union, a, c = (np.empty(shape) for _ in range(4))
    with np.errstate(invalid="ignore"):  # inf - inf or 0 * inf from infinite coordinates: NaN, as in the reference
        # inter = max(min(ax2, bx2) - max(ax1, bx1), 0) * max(min(ay2, by2) - max(ay1, by1), 0)
        np.minimum(ax2, bx2, out=inter)
        inter -= np.maximum(ax1, bx1, out=c)
        np.maximum(inter, 0, out=inter)
        np.minimum(ay2, by2, out=a)
        a -= np.maximum(ay1, by1, out=c)
        inter *= np.maximum(a, 0, out=a)
        # union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
        if area_a is None:
            np.subtract(ax2, ax1, out=union)
            union *= np.subtract(ay2, ay1, out=c)
        else:
            union[...] = area_a
        if area_b is None:
            np.subtract(bx2, bx1, out=a)
            a *= np.subtract(by2, by1, out=c)
            union += a
        else:
            union += area_b
        union -= inter
        inter /= np.maximum(union, eps, out=c)  # inter is now the IoU
        if kind == "iou":
            return inter
        iou_copy = inter.copy() if kind == "both" else None
        # enclose = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
        b = np.empty(shape)
        np.maximum(ax2, bx2, out=a)
        a -= np.minimum(ax1, bx1, out=c)
        np.maximum(ay2, by2, out=b)
        b -= np.minimum(ay1, by1, out=c)
        a *= b  # the enclosing area
        # giou = iou - (enclose - union) / max(enclose, eps)
        np.subtract(a, union, out=union)
        union /= np.maximum(a, eps, out=a)
        inter -= union
    return (iou_copy, inter) if kind == "both" else inter


def _torch_overlap(a: Any, b: Any, eps: float, kind: str, area_a: Any = None, area_b: Any = None) -> Any:
    """:func:`_numpy_overlap` on torch tensors (out of place: autograd needs the intermediate values)."""
    import torch

    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    inter = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0) * (
        torch.minimum(ay2, by2) - torch.maximum(ay1, by1)
    ).clamp(min=0)
    if area_a is None:
        area_a = (ax2 - ax1) * (ay2 - ay1)
    if area_b is None:
        area_b = (bx2 - bx1) * (by2 - by1)
    union = area_a + area_b - inter
    iou_ = inter / union.clamp(min=eps)
    if kind == "iou":
        return iou_
    enclose = (torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)) * (torch.maximum(ay2, by2) - torch.minimum(ay1, by1))
    giou_ = iou_ - (enclose - union) / enclose.clamp(min=eps)
    return (iou_, giou_) if kind == "both" else giou_


def _columns(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


def _aligned(a: Boxes, b: Boxes, eps: float, kind: str, area_a: Any = None, area_b: Any = None) -> Any:
    if _kind(a, b):
        return _torch_overlap(_check_tensor(a, "a"), _check_tensor(b, "b"), eps, kind, area_a, area_b)
    a, b = _as_float64(a, "a"), _as_float64(b, "b")
    if area_a is not None:
        area_a = np.asarray(area_a, dtype=np.float64)
    if area_b is not None:
        area_b = np.asarray(area_b, dtype=np.float64)
    return _numpy_overlap(_columns(a), _columns(b), eps, kind, area_a, area_b)


def _pairwise(a: Boxes, b: Boxes, eps: float, kind: str) -> Any:
    if _kind(a, b):
        a, b = _check_tensor(a, "a").reshape(-1, 4), _check_tensor(b, "b").reshape(-1, 4)
        return _torch_overlap(a[:, None, :], b[None, :, :], eps, kind)
    a, b = _as_float64(a, "a").reshape(-1, 4), _as_float64(b, "b").reshape(-1, 4)
    return _numpy_overlap(_columns(a[:, None, :]), _columns(b[None, :, :]), eps, kind)


def area(boxes: Boxes) -> Any:
    """``(x2 - x1) * (y2 - y1)`` of ``(..., 4)`` boxes -> ``(...)`` (not clipped: an inverted box has a negative
    area)."""
    if _is_tensor(boxes):
        b = _check_tensor(boxes, "boxes")
    else:
        b = _as_float64(boxes, "boxes")
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def clip(boxes: Boxes, width: Any, height: Any) -> Any:
    """``(..., 4)`` boxes with x clipped to ``[0, width]`` and y to ``[0, height]``; ``width`` / ``height`` are
    numbers or arrays that broadcast against the leading dimensions (one size per box)."""
    if _is_tensor(boxes):
        import torch

        b = _check_tensor(boxes, "boxes")
        w = torch.as_tensor(width, dtype=b.dtype, device=b.device)
        h = torch.as_tensor(height, dtype=b.dtype, device=b.device)
        w, h = torch.broadcast_tensors(w, h)
        return torch.minimum(b.clamp(min=0), torch.stack([w, h, w, h], dim=-1))
    b = _as_float64(boxes, "boxes")
    return np.clip(b, 0.0, np.stack(np.broadcast_arrays(width, height, width, height), axis=-1))


def iou(a: Boxes, b: Boxes, *, eps: float = EPS) -> Any:
    """IoU of aligned boxes ``a[..., :]`` vs ``b[..., :]`` (broadcasting); see the module docstring."""
    return _aligned(a, b, eps, "iou")


def giou(a: Boxes, b: Boxes, *, eps: float = EPS) -> Any:
    """Generalised IoU of aligned boxes (broadcasting), the reference's formula; see the module docstring."""
    return _aligned(a, b, eps, "giou")


def iou_giou(a: Boxes, b: Boxes, *, eps: float = EPS, area_a: Any = None, area_b: Any = None) -> tuple[Any, Any]:
    """``(IoU, GIoU)`` of aligned boxes (broadcasting). ``area_a`` / ``area_b``: the boxes' areas when the caller
    has them more exactly than the corners give them (centre-size boxes: ``w * h``); default ``area(a)``,
    ``area(b)``."""
    return _aligned(a, b, eps, "both", area_a, area_b)


def pairwise_iou(a: Boxes, b: Boxes, *, eps: float = EPS) -> Any:
    """IoU of every pair: ``(n, 4)`` x ``(m, 4)`` -> ``(n, m)``."""
    return _pairwise(a, b, eps, "iou")


def pairwise_giou(a: Boxes, b: Boxes, *, eps: float = EPS) -> Any:
    """Generalised IoU of every pair: ``(n, 4)`` x ``(m, 4)`` -> ``(n, m)``."""
    return _pairwise(a, b, eps, "giou")


def giou_columns(
    ax1: np.ndarray,
    ay1: np.ndarray,
    ax2: np.ndarray,
    ay2: np.ndarray,
    bx1: np.ndarray,
    by1: np.ndarray,
    bx2: np.ndarray,
    by2: np.ndarray,
    *,
    eps: float = EPS,
) -> np.ndarray:
    """GIoU of aligned boxes given as eight broadcastable float64 coordinate columns (numpy only)."""
    return _numpy_overlap((ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2), eps, "giou")


def iou_scalar(a: Sequence[float], b: Sequence[float], *, eps: float = EPS) -> float:
    """IoU of two single boxes as plain Python numbers (finite coordinates; the same value as :func:`iou`)."""
    return best_overlap(a, (b,), above=-1.0, eps=eps)[1]


def best_overlap(
    box: Sequence[float], others: Iterable[Sequence[float]], *, above: float = -1.0, eps: float = EPS
) -> tuple[int, float]:
    """``(index, IoU)`` of the box of ``others`` that ``box`` overlaps most (the first of equals) when that IoU is
    strictly above ``above``, else ``(-1, above)``. Plain Python numbers (finite coordinates; the values of
    :func:`iou`): for loops over a handful of boxes (weighted box fusion), where numpy's per-call overhead costs more
    than the arithmetic."""
    x1, y1, x2, y2 = box
    area_box = (x2 - x1) * (y2 - y1)
    best, best_iou = -1, above
    for j, (ox1, oy1, ox2, oy2) in enumerate(others):
        iw = min(x2, ox2) - max(x1, ox1)
        ih = min(y2, oy2) - max(y1, oy1)
        if iw <= 0 or ih <= 0:  # no intersection: IoU 0 / max(union, eps) = 0
            if best_iou < 0.0:
                best, best_iou = j, 0.0
            continue
        inter = iw * ih
        overlap = inter / max(area_box + (ox2 - ox1) * (oy2 - oy1) - inter, eps)
        if overlap > best_iou:
            best, best_iou = j, overlap
    return best, best_iou
