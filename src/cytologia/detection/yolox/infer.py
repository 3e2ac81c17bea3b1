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

from cytologia.data.errors import CytologiaInputError
from cytologia.data.images import decode, thread_map
from cytologia.data.schema import BOX_COLUMNS
from cytologia.detection.registry import PREDICT_COLUMNS
from cytologia.detection.yolox.augment import Frame, letterbox

# Candidates (highest scores) that enter NMS. Greedy NMS decides a box by the higher-scoring ones only, so the kept
# boxes are exactly those of a run over all candidates that rank <= MAX_NMS; at conf 0.001 an untrained network
# passes thousands of candidates and NMS over all of them only costs time.
MAX_NMS = 1000


def to_input(batch: Sequence[np.ndarray], flip: bool = False) -> np.ndarray:
    """BGR uint8 squares -> the network input: float32 (B, 3, S, S) RGB in [0, 1], mirrored left-right if ``flip``."""
    x = np.stack(batch)[..., ::-1]  # BGR -> RGB
    if flip:
        x = x[:, :, ::-1]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


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
        d = det.cpu().numpy().astype(np.float64)
        if flipped:
            d[:, [0, 2]] = size - d[:, [2, 0]]
        d[:, [0, 2]] = np.clip((d[:, [0, 2]] - f.pad_x) / f.gain_x, 0, f.width)
        d[:, [1, 3]] = np.clip((d[:, [1, 3]] - f.pad_y) / f.gain_y, 0, f.height)
        out.append(d)
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
    paths = [Path(p) for p in images]
    names = [p.name for p in paths] if names is None else [str(n) for n in names]
    if len(names) != len(paths):
        raise CytologiaInputError(f"{len(names)} names for {len(paths)} images")
    if batch_size < 1:
        raise CytologiaInputError(f"batch_size={batch_size} must be >= 1")
    rows: list[tuple] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        boxed = thread_map(lambda p: letterbox(decode(p), img_size), chunk, workers)
        squares, frames = [b[0] for b in boxed], [b[1] for b in boxed]
        for flip in (False, True) if tta_flip else (False,):
            raw = forward(to_input(squares, flip))
            dets = boxes_from_output(raw, frames, img_size, conf=conf, iou=iou, max_det=max_det, flipped=flip)
            tag = "hflip" if flip else "none"
            for name, d in zip(names[start : start + batch_size], dets):
                rows += [(name, *r, tag) for r in d.tolist()]
    table = pd.DataFrame(rows, columns=list(PREDICT_COLUMNS))
    return table.astype({c: np.float64 for c in (*BOX_COLUMNS, "score")})
