"""`cytologia clean --data DIR --boxes OOF.csv --out DIR`: flag and remove noisy training boxes with out-of-fold
detections.

Reads ``DIR/train.csv`` (validated leniently; boxes clipped to their image when ``DIR/images`` is there) and the
out-of-fold boxes table, applies :func:`cytologia.detection.cleaning.clean_annotations` and writes to ``--out``
(:func:`cytologia.detection.cleaning.clean_folder`, which the pipeline calls too):

- ``train_clean.csv`` -- the cleaned table in the train.csv format (``NAME,x1,y1,x2,y2,class``), a drop-in
  replacement for the training stages;
- ``cleaning_report.csv`` -- one row per flag (NAME, box_id, flag, action, iou, giou, score, boxes);
- ``cleaning_summary.json`` -- inputs, settings and counts;
- on a generated set (``DIR/noise.csv`` present) also ``cleaning_eval.csv``: precision and recall of the flags
  against the injected defects.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cytologia.errors import CytologiaInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="data folder with train.csv (and images/)")
    parser.add_argument("--boxes", type=Path, required=True, help="out-of-fold boxes table (NAME,x1..y2,score,model)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="settings YAML, e.g. configs/cleaning/default.yaml (default: built-in)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set misplaced_action=fix (repeatable)",
    )
    parser.add_argument("--images", type=Path, default=None, help="image folder (default DATA/images, if present)")


def _settings(args: argparse.Namespace):
    import yaml

    from cytologia.detection.cleaning import CleaningConfig

    values: dict[str, object] = {}
    source = "built-in defaults"
    if args.config is not None:
        values = CleaningConfig.from_yaml(args.config).as_dict()
        source = str(args.config)
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CytologiaInputError(f"--set {item!r}: expected KEY=VALUE")
        values[key.strip()] = yaml.safe_load(raw)
    return CleaningConfig.from_mapping(values, f"{source} + --set" if args.overrides else source)


def run(args: argparse.Namespace) -> int:
    from cytologia.detection.cleaning import clean_folder

    cleaned = clean_folder(args.data, args.boxes, args.out, settings=_settings(args), images=args.images)
    print("\n".join(cleaned.lines))
    return 0
