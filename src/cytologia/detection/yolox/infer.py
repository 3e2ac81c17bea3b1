"""Prediction without ultralytics: letterbox, network, class-agnostic NMS, boxes back to each image's pixels.

The network function maps the input batch (float32 (B, 3, S, S), RGB in [0, 1]) to the raw output (B, 5, anchors):
centre-size boxes in input pixels and a score -- the layout :class:`cytologia.detection.yolox.model.YoloxInference`
and its ONNX export produce, and the one the ultralytics backend uses, so the same post-processing serves a torch
network and an ONNX Runtime session. NMS is torchvision's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision

from cytologia.data.schema import BOX_COLUMNS
from cytologia.detection.letterbox import Frame, detect_in_batches, to_image_pixels
from cytologia.detection.registry import PREDICT_COLUMNS

# Candidates (highest scores) that enter NMS. Greedy NMS decides a box by the higher-scoring ones only, so the kept
# boxes are exactly those of a run over all candidates that rank <= MAX_NMS; at conf 0.001 an untrained network
# passes thousands of candidates and NMS over all of them only costs time.
MAX_NMS = 1000


def nms_boxes(raw: torch.Tensor | np.ndarray, *, conf: float, iou: float, max_det: int) -> list[torch.Tensor]:
    """Raw output (B, 5, anchors) -> per image (n, 5) ``x1, y1, x2, y2, score`` in input pixels: score above ``conf``,
    the ``MAX_NMS`` best, class-agnostic NMS at ``iou``, at most ``max_det`` kept (highest score first)."""
    raw = torch.as_tensor(raw).float()
    out = []
    for pred in raw.permute(0, 2, 1):  # (anchors, 5)
        pred = pred[pred[:, 4] > conf]
        if len(pred) > MAX_NMS:
            pred = pred[pred[:, 4].topk(MAX_NMS).indices]
        xyxy = torch.cat((pred[:, :2] - pred[:, 2:4] / 2, pred[:, :2] + pred[:, 2:4] / 2), dim=1)
        keep = torchvision.ops.nms(xyxy, pred[:, 4], iou)[:max_det]
        out.append(torch.cat((xyxy[keep], pred[keep, 4:5]), dim=1))
    return out


def boxes_from_output(
    raw: torch.Tensor | np.ndarray, frames: Sequence[Frame], size: int, *, conf: float, iou: float, max_det: int,
    flipped: bool = False,
) -> list[np.ndarray]:  # fmt: skip
    """Raw output -> per image an (n, 5) array ``x1, y1, x2, y2, score`` in the image's own pixels (after NMS,
    un-mirrored when the input was ``flipped``, clipped to the image)."""
    out = []
    for det, f in zip(nms_boxes(raw, conf=conf, iou=iou, max_det=max_det), frames):
        out.append(to_image_pixels(det.cpu().numpy().astype(np.float64), f, size, flipped))
    return out


def detect_images(
    forward: Callable[[np.ndarray], torch.Tensor | np.ndarray],
    images: Sequence[str | Path],
    names: Sequence[str] | None = None,
    *,
    img_size: int,
    conf: float,
    iou: float,
    max_det: int,
    tta_flip: bool,
    batch_size: int,
    workers: int | None = None,
) -> pd.DataFrame:
    """Run ``forward`` over ``images`` in batches; a :data:`~cytologia.detection.registry.PREDICT_COLUMNS` table
    (``tta`` = ``"none"``, or ``"hflip"`` for the mirrored pass). An unreadable image is an error naming it."""
    return detect_in_batches(
        forward,
        lambda raw, frames, flipped: boxes_from_output(
            raw, frames, img_size, conf=conf, iou=iou, max_det=max_det, flipped=flipped
        ),
        images, names, img_size=img_size, tta_flip=tta_flip, batch_size=batch_size, workers=workers,
        columns=PREDICT_COLUMNS, types={c: np.float64 for c in (*BOX_COLUMNS, "score")},
    )  # fmt: skip
