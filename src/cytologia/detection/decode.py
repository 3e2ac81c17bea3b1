"""A single-class detector graph's raw output decoded with numpy only: what the inference pipeline runs on ONNX
Runtime's output, so that predicting from exported graphs needs no torch (an ``cytologia[infer]`` install).

Every backend's graph has the same output (B, 5, anchors): centre-size boxes in input pixels and a score
(:meth:`cytologia.detection.base.Detector.write_onnx`), and both backends decode it by the same rule, in torch:
score above ``conf``, the :data:`MAX_CANDIDATES` best, greedy class-agnostic NMS at ``iou``, at most ``max_det``
kept (YOLOX: :func:`cytologia.detection.yolox.infer.nms_boxes`; ultralytics: its ``non_max_suppression`` with
``max_nms`` = ``MAX_NMS``, agnostic; both end in ``torchvision.ops.nms``). :func:`decode_raw` is that rule in numpy,
and :func:`greedy_nms` does torchvision's NMS arithmetic (float32, ``inter / (area_i + area_j - inter) > iou``, no
epsilon) rather than the project's float64 :func:`cytologia.detection.fusion.nms`, so that the kept boxes are the
backends' own, bit for bit (tested); it stops at ``max_det`` kept boxes.
"""

from __future__ import annotations

import numpy as np

from cytologia.errors import CytologiaInputError

# Candidates (highest scores) that enter NMS: both backends' MAX_NMS (1000). Greedy NMS decides a box by the
# higher-scoring ones only, so the kept boxes are those of a run over every candidate that ranks <= 1000.
MAX_CANDIDATES = 1000


def greedy_nms(xyxy: np.ndarray, scores: np.ndarray, iou: float, max_keep: int) -> np.ndarray:
    """Indices of the boxes greedy NMS keeps, highest score first (ties: the earlier row first), at most
    ``max_keep``: torchvision's CPU kernel in float32 (a box is dropped when its IoU with a kept, higher-scored box
    is ``> iou``), computed only against the boxes it keeps."""
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
    b = np.asarray(xyxy, np.float32)[order]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(b), dtype=bool)
    keep: list[int] = []
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 for two empty boxes: NaN, not > iou (as in torch)
        for i in range(len(b)):
            if suppressed[i]:
                continue
            keep.append(i)
            if len(keep) >= max_keep:
                break
            w = np.maximum(np.float32(0), np.minimum(x2[i], x2[i + 1 :]) - np.maximum(x1[i], x1[i + 1 :]))
            h = np.maximum(np.float32(0), np.minimum(y2[i], y2[i + 1 :]) - np.maximum(y1[i], y1[i + 1 :]))
            inter = w * h
            ratio = inter / (area[i] + area[i + 1 :] - inter)  # float32, then compared as a double (as in C++)
            suppressed[i + 1 :] |= ratio.astype(np.float64) > float(iou)
    return order[np.asarray(keep, dtype=np.int64)]


def decode_raw(raw: np.ndarray, *, conf: float, iou: float, max_det: int) -> list[np.ndarray]:
    """Raw output (B, 5, anchors) -> per image an (n, 5) float64 array ``x1, y1, x2, y2, score`` in input pixels,
    highest score first (ties: the earlier anchor first)."""
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 3 or raw.shape[1] != 5:
        raise CytologiaInputError(f"detector output of shape {raw.shape}: expected (batch, 5, anchors)")
    out = []
    for pred in raw.transpose(0, 2, 1):  # (anchors, 5)
        pred = pred[pred[:, 4] > conf]
        if len(pred) > MAX_CANDIDATES:
            pred = pred[np.argsort(-pred[:, 4], kind="stable")[:MAX_CANDIDATES]]
        half = pred[:, 2:4] / 2
        xyxy = np.concatenate([pred[:, :2] - half, pred[:, :2] + half], axis=1)  # float32, as the graphs' consumers
        keep = greedy_nms(xyxy, pred[:, 4], iou, max_det)
        out.append(np.concatenate([xyxy[keep], pred[keep, 4:5]], axis=1).astype(np.float64))
    return out
