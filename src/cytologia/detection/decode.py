"""A single-class detector graph's raw output decoded with numpy only: what the inference pipeline runs on ONNX
Runtime's output, so that predicting from exported graphs needs no torch (an ``cytologia[infer]`` install).

Every backend's graph has the same output (B, 5, anchors): centre-size boxes in input pixels and a score
(:meth:`cytologia.detection.base.Detector.write_onnx`), and both backends decode it by the same rule, in torch:
score above ``conf``, the :data:`MAX_CANDIDATES` best, greedy class-agnostic NMS at ``iou``, at most ``max_det``
kept (YOLOX: :func:`cytologia.detection.yolox.infer.nms_boxes`; ultralytics: its ``non_max_suppression`` with
``max_nms`` = ``MAX_NMS``, agnostic). :func:`decode_raw` is that rule in numpy, with the project's NMS
(:func:`cytologia.detection.fusion.nms`); a test checks it keeps the boxes the backends' own decoders keep.
"""

from __future__ import annotations

import numpy as np

from cytologia.errors import CytologiaInputError

# Candidates (highest scores) that enter NMS: both backends' MAX_NMS (1000). Greedy NMS decides a box by the
# higher-scoring ones only, so the kept boxes are those of a run over every candidate that ranks <= 1000.
MAX_CANDIDATES = 1000


def decode_raw(raw: np.ndarray, *, conf: float, iou: float, max_det: int) -> list[np.ndarray]:
    """Raw output (B, 5, anchors) -> per image an (n, 5) float64 array ``x1, y1, x2, y2, score`` in input pixels,
    highest score first (ties: the earlier anchor first)."""
    from cytologia.detection.fusion import nms

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
        keep = nms(xyxy, pred[:, 4], iou)[:max_det]
        out.append(np.concatenate([xyxy[keep], pred[keep, 4:5]], axis=1).astype(np.float64))
    return out
