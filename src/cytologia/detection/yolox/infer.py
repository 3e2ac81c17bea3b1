"""YOLOX's decoding without ultralytics: score threshold, the best candidates, class-agnostic NMS (torchvision's).

The raw output (B, 5, anchors) holds centre-size boxes in input pixels and a score -- the layout
:class:`cytologia.detection.yolox.model.YoloxInference` and its ONNX export produce. The rest of prediction (letterbox,
batches, boxes back to each image's pixels) is the shared loop of :class:`cytologia.detection.base.Detector`, which
:meth:`cytologia.detection.yolox.backend.YoloxDetector.decode` plugs this into.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision

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
