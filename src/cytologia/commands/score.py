"""`cytologia score --truth TRUTH.csv --pred PRED.csv`: the challenge score of a submission.

TRUTH is ``trustii_id,NAME,x1,y1,x2,y2,class`` and must be valid (unique integer ids, numeric boxes, non-empty NAME
and class; errors name the file and row). PRED is a submission, scored as the challenge's reference scores it (see
:mod:`cytologia.metrics`): rows with an unknown id or another image's NAME are ignored and counted, the first row
per id wins, a class string that is not a class is one more label with F1 0, and a box with a missing or
non-numeric coordinate scores the worst rescaled GIoU, 0 (like the reference's NaN, the first such box of an image
takes every truth box of that image, with its class).
A truth class that is not one of the 23 is scored the same way (one more label in the macro average) and named on
stderr as a warning (file, class, count, first rows); ``--strict`` makes it an error (exit 2).
With ``--json`` the last line of stdout is one JSON object (``score``, ``giou``, ``f1``, counts, ``per_class_f1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from cytologia import metrics
from cytologia.data.schema import CLASSES, NO_PREDICTION

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cytologia score`."""
    parser.add_argument("--truth", type=Path, required=True, help="truth CSV: trustii_id,NAME,x1,y1,x2,y2,class")
    parser.add_argument("--pred", type=Path, required=True, help="submission CSV: trustii_id,NAME,x1,y1,x2,y2,class")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    parser.add_argument("--per-class", action="store_true", help="print a per-label table (support, F1)")
    parser.add_argument(
        "--strict", action="store_true", help="a truth class not among the 23 is an error (exit 2), not a warning"
    )


def _shown(label: str) -> str:
    """A label as printed: class names as they are, any other string quoted (so "" and " B" are visible)."""
    return label if label in CLASSES else repr(label)


def summary_lines(result: metrics.ScoreResult) -> list[str]:
    """A readable summary of a score: the score and its parts, what was kept of the predictions, and why."""
    r = result
    ignored = [
        (r.n_pred_unknown_id, "unknown trustii_id"),
        (r.n_pred_wrong_name, "NAME not the id's image"),
        (r.n_pred_repeated_id, "repeated trustii_id (its first row counts)"),
        (r.n_pred_duplicate, "same box and class as another kept row of the image"),
    ]
    extra = [_shown(label) for label in r.labels if label not in CLASSES]
    lines = [
        f"score  {r.score:.6f}  = {metrics.GIOU_WEIGHT} * giou {r.giou:.6f} + {metrics.F1_WEIGHT} * f1 {r.f1:.6f}",
        f"truth: {r.n_truth} boxes over {r.n_images} images",
        f"predictions: {r.n_pred_rows} rows, {r.n_pred_kept} kept",
        *(f"  ignored: {n} {why}" for n, why in ignored if n),
        f"images without a kept prediction: {r.n_images_without_prediction}"
        + (f" (their boxes score GIoU 0 and class {NO_PREDICTION!r})" if r.n_images_without_prediction else ""),
        f"labels in the macro-F1: {len(r.labels)}" + (f" (not classes: {', '.join(extra)})" if extra else ""),
    ]
    if r.n_pred_bad_box:
        lines.append(
            f"kept predictions with a missing or non-numeric coordinate: {r.n_pred_bad_box} "
            "(rescaled GIoU 0; as in the reference, the first such box of an image takes all its truth boxes)"
        )
    return lines


def per_class_lines(result: metrics.ScoreResult) -> list[str]:
    """One line per label: truth rows (support), predicted rows, correct rows and F1."""
    predicted = result.confusion.sum(axis=0)
    shown = {label: _shown(label) for label in result.labels}
    width = max([5, *(len(text) for text in shown.values())])
    lines = [f"{'label':<{width}}  {'truth':>6}  {'pred':>6}  {'right':>6}  {'f1':>7}"]
    for label in result.labels:
        right = int(result.confusion.loc[label, label])
        lines.append(
            f"{shown[label]:<{width}}  {result.support[label]:>6}  {int(predicted[label]):>6}  {right:>6}  "
            f"{result.per_class_f1[label]:>7.4f}"
        )
    return lines


def _json_safe(value: object) -> object:
    """NaN/inf (only from infinite coordinates) become null so the line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def run(args: argparse.Namespace) -> int:
    """Read both tables, score, print the summary (and the JSON line)."""
    truth = metrics.read_truth(args.truth, strict=args.strict)
    pred = metrics.read_predictions(args.pred)
    result = metrics.score(truth, pred)
    print("\n".join(summary_lines(result)))
    if args.per_class:
        print("\n".join(per_class_lines(result)))
    if args.json:
        payload = {"truth": str(args.truth), "pred": str(args.pred), **result.as_dict()}
        print(json.dumps(_json_safe(payload), allow_nan=False))
    return 0
