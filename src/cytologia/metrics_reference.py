"""A plain per-image loop of the challenge score's rules: the oracle for :func:`cytologia.metrics.score`.

Written for obviousness, not speed: Python scalars, one loop over images, the rules in the order of
:mod:`cytologia.metrics`'s docstring (which lists the reference evaluation's conventions this loop repeats:
unclipped areas and ``max(., 1e-7)`` guards in GIoU, numpy ``argmax``'s first-NaN choice, ``fillna(0)`` on the
rescaled GIoU, ids compared by value, missing text as ""). It is what the vectorised score is tested against and
timed against (``cytologia bench score``). Do not use it for real work.
"""

from __future__ import annotations

import math
from collections import Counter

import pandas as pd

from cytologia.data.schema import NO_PREDICTION

EPS = 1e-7  # the reference's floor on the union and enclosing areas


def _maximum(a: float, b: float) -> float:
    """numpy's ``maximum``: NaN if either is NaN (Python's ``max`` depends on the argument order)."""
    return a if (a != a or a >= b) else b  # a != a is true only for NaN


def _minimum(a: float, b: float) -> float:
    """numpy's ``minimum``: NaN if either is NaN."""
    if b != b:
        return b
    return a if (a != a or a <= b) else b


def _giou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """The reference's GIoU of two boxes (same operation order as :func:`cytologia.metrics.giou_pairs`)."""
    if b[0] != b[0] or b[1] != b[1] or b[2] != b[2] or b[3] != b[3]:
        return math.nan
    iw = _maximum(_minimum(a[2], b[2]) - _maximum(a[0], b[0]), 0.0)
    ih = _maximum(_minimum(a[3], b[3]) - _maximum(a[1], b[1]), 0.0)
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    union = area_a + area_b - inter
    iou = inter / _maximum(union, EPS)
    enclose = (_maximum(a[2], b[2]) - _minimum(a[0], b[0])) * (_maximum(a[3], b[3]) - _minimum(a[1], b[1]))
    return iou - (enclose - union) / _maximum(enclose, EPS)


def _text(value: object) -> str:
    """A cell as a string; missing values are ""."""
    if isinstance(value, str):
        return value
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _number(value: object) -> float:
    """A coordinate as a float; missing or non-numeric is NaN. ("1_000" is text here, as for pandas' parser.)"""
    if isinstance(value, str) and "_" in value:
        return math.nan
    if value is None or value is pd.NA:
        return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _id(value: object) -> int | None:
    """A trustii_id as an int; None when it is not a finite integer value."""
    x = _number(value)
    if math.isfinite(x) and x == math.floor(x):
        return int(x)
    return None


def score_loop(truth: pd.DataFrame, pred: pd.DataFrame) -> dict[str, object]:
    """Score with one Python loop over images.

    Returns ``score``, ``giou``, ``f1``, ``per_class_f1`` (label -> F1), ``n_pred_kept`` and
    ``n_images_without_prediction``. The truth is assumed valid (unique integer ids, finite boxes).
    """
    t_ids = [int(v) for v in truth["trustii_id"]]
    t_names = [_text(v) for v in truth["NAME"]]
    t_classes = [_text(v) for v in truth["class"]]
    t_boxes = list(zip(*(truth[c].astype(float) for c in ("x1", "y1", "x2", "y2"))))
    image_of_id = dict(zip(t_ids, t_names))

    # Rule 1: kept predictions per image, in file order.
    kept: dict[str, list[tuple[tuple[float, ...], str]]] = {}
    kept_keys: dict[str, set[tuple[object, ...]]] = {}
    seen_ids: set[int] = set()
    columns = [pred[c].tolist() for c in ("trustii_id", "NAME", "x1", "y1", "x2", "y2", "class")]
    for raw_id, raw_name, x1, y1, x2, y2, raw_cls in zip(*columns):
        tid = _id(raw_id)
        name = _text(raw_name)
        if tid is None or image_of_id.get(tid) != name:
            continue  # unknown id, or an id of the truth under another image's name
        if tid in seen_ids:
            continue  # the first row of an id wins
        seen_ids.add(tid)
        box = (_number(x1), _number(y1), _number(x2), _number(y2))
        cls = _text(raw_cls)
        key = (*(None if v != v else v for v in box), cls)  # NaN equals NaN here, as in pandas' drop_duplicates
        if key in kept_keys.setdefault(name, set()):
            continue  # same box and class as an earlier row of this image
        kept_keys[name].add(key)
        kept.setdefault(name, []).append((box, cls))

    # Rules 2-3: one pass per image over its truth boxes.
    rows_of_image: dict[str, list[int]] = {}
    for i, name in enumerate(t_names):
        rows_of_image.setdefault(name, []).append(i)
    y_true: list[str] = []
    y_pred: list[str] = []
    rescaled: list[float] = []
    images_without = 0
    for name, rows in rows_of_image.items():
        preds = kept.get(name, [])
        if not preds:
            images_without += 1
        for i in rows:
            y_true.append(t_classes[i])
            if not preds:
                y_pred.append(NO_PREDICTION)
                rescaled.append(0.0)
                continue
            best_g, best_cls = _giou(t_boxes[i], preds[0][0]), preds[0][1]
            for p_box, p_cls in preds[1:]:
                if best_g != best_g:
                    break  # argmax takes the first NaN
                g = _giou(t_boxes[i], p_box)
                if g != g or g > best_g:  # strict: ties keep the earlier prediction
                    best_g, best_cls = g, p_cls
            r = (best_g + 1.0) / 2.0
            rescaled.append(0.0 if r != r else r)
            y_pred.append(best_cls)

    # Rule 4: macro F1 over the union of labels, F1 = 2TP / (2TP + FP + FN).
    true_count = Counter(y_true)
    pred_count = Counter(y_pred)
    hits = Counter(t for t, p in zip(y_true, y_pred) if t == p)
    per_class: dict[str, float] = {}
    for label in sorted(set(y_true) | set(y_pred)):
        tp = hits[label]
        fp = pred_count[label] - tp
        fn = true_count[label] - tp
        per_class[label] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    f1 = sum(per_class.values()) / len(per_class) if per_class else 0.0
    giou = sum(rescaled) / len(rescaled) if rescaled else 0.0
    return {
        "score": 0.2 * giou + 0.8 * f1,
        "giou": giou,
        "f1": f1,
        "per_class_f1": per_class,
        "n_pred_kept": sum(len(v) for v in kept.values()),
        "n_images_without_prediction": images_without,
    }
