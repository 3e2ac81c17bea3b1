"""`cytologia clean --data DIR --boxes OOF.csv --out DIR`: flag and remove noisy training boxes with out-of-fold
detections.

Reads ``DIR/train.csv`` (validated leniently; boxes clipped to their image when ``DIR/images`` is there) and the
out-of-fold boxes table, applies :func:`cytologia.detection.cleaning.clean_annotations` and writes to ``--out``:

- ``train_clean.csv`` -- the cleaned table in the train.csv format (``NAME,x1,y1,x2,y2,class``), a drop-in
  replacement for the training stages;
- ``cleaning_report.csv`` -- one row per flag (NAME, box_id, flag, action, iou, giou, score, boxes);
- ``cleaning_summary.json`` -- inputs, settings and counts;
- on a generated set (``DIR/noise.csv`` present) also ``cleaning_eval.csv``: precision and recall of the flags
  against the injected defects.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cytologia.data.errors import CytologiaInputError

log = logging.getLogger(__name__)

OUTPUTS: tuple[str, ...] = ("train_clean.csv", "cleaning_report.csv", "cleaning_summary.json", "cleaning_eval.csv")


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
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set misplaced_action=fix (repeatable)")  # fmt: skip
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
    import pandas as pd

    from cytologia.data.io import read_annotations, write_csv
    from cytologia.data.schema import TRAIN_COLUMNS
    from cytologia.detection.cleaning import clean_annotations, evaluate_cleaning
    from cytologia.detection.oof import read_boxes

    cfg = _settings(args)
    train_path = args.data / "train.csv"
    if not train_path.is_file():
        raise CytologiaInputError(f"{train_path}: no such file")
    image_dir = args.images or args.data / "images"
    if not image_dir.is_dir():
        if args.images is not None:
            raise CytologiaInputError(f"image folder {image_dir} does not exist")
        log.warning("%s: no images/ folder: boxes are not clipped to their image", args.data)
        image_dir = None
    ann, validation = read_annotations(train_path, image_dir, lenient=True)
    boxes = read_boxes(args.boxes, require_fold=False)
    result = clean_annotations(ann, boxes, cfg, source=str(args.boxes))

    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(result.cleaned[list(TRAIN_COLUMNS)], args.out / "train_clean.csv")
    write_csv(result.report, args.out / "cleaning_report.csv")
    summary: dict[str, object] = {
        "data": str(args.data),
        "boxes": str(args.boxes),
        "settings": cfg.as_dict(),
        "counts": result.counts,
        "validation": {"rows": validation.rows, "kept": validation.kept, "clipped": validation.clipped},
    }
    print(result.summary())
    noise_path = args.data / "noise.csv"
    if noise_path.is_file():
        noise = pd.read_csv(noise_path, dtype={"NAME": str}, keep_default_na=False)
        table = evaluate_cleaning(result.report, noise)
        write_csv(table, args.out / "cleaning_eval.csv")
        summary["eval"] = table.to_dict(orient="records")
        with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
            print(table.to_string(index=False))
    (args.out / "cleaning_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"wrote {args.out / 'train_clean.csv'} ({len(result.cleaned)} rows) and the report to {args.out}")
    return 0
