"""The numpy decoding of a detector graph's output (what ONNX Runtime prediction runs, without torch) keeps the boxes
each backend's own torch decoding keeps."""

from __future__ import annotations

import numpy as np
import pytest

from cytologia.detection.decode import MAX_CANDIDATES, decode_raw
from cytologia.detection.registry import get_backend


def _raw(seed: int, batch: int = 3, anchors: int = 2100) -> np.ndarray:
    """Random (B, 5, anchors) outputs: clustered centre-size boxes (NMS has work) and scores, some near 0."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(20, 300, (batch, 2, 12))
    pick = rng.integers(0, 12, (batch, anchors))
    cxcy = np.take_along_axis(centres, pick[:, None, :].repeat(2, 1), axis=2) + rng.normal(0, 6, (batch, 2, anchors))
    wh = rng.uniform(20, 90, (batch, 2, anchors))
    score = rng.beta(0.3, 3.0, (batch, 1, anchors))
    return np.concatenate([cxcy, wh, score], axis=1).astype(np.float32)


@pytest.mark.parametrize("backend", ["yolox", pytest.param("ultralytics", marks=pytest.mark.ultralytics)])
def test_numpy_decoding_keeps_the_backends_boxes(backend: str) -> None:
    cls = get_backend(backend)
    for seed, (conf, iou, max_det) in enumerate([(0.001, 0.6, 50), (0.05, 0.45, 300), (0.3, 0.7, 5)]):
        raw = _raw(seed)
        ours = decode_raw(raw, conf=conf, iou=iou, max_det=max_det)
        theirs = cls.decode(raw, conf=conf, iou=iou, max_det=max_det)
        assert len(ours) == len(theirs) == len(raw)
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape and len(a) > 0
            assert np.array_equal(a, b)  # the same boxes, bit for bit
    assert (_raw(0)[:, 4] > 0.001).sum(axis=1).min() > MAX_CANDIDATES  # the candidate cut is exercised
