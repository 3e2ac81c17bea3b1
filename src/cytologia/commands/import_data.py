"""`cytologia import FORMAT SRC --out DIR`: another public leukocyte data set into our layout (train.csv, images/,
sources.csv), its classes mapped to the 23 Cytologia classes (see :mod:`cytologia.data.importers` and
``docs/datasets.md``). Prints what was read, kept and skipped; a bad file is an error naming the file and element
(exit 2) unless ``--lenient``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cytologia import`."""
    from cytologia.data.importers import FORMATS
    from cytologia.data.importers.cellbox import BOX_MODES
    from cytologia.data.importers.class_maps import CLASS_MAPS

    parser.add_argument("format", choices=list(FORMATS), help="source layout")
    parser.add_argument("src", type=Path, help="the source data set (a folder; a COCO JSON file also works)")
    parser.add_argument("--out", type=Path, required=True, help="new folder for train.csv, images/, sources.csv")
    parser.add_argument(
        "--map",
        default="cytologia",
        help=f"class map: {', '.join(CLASS_MAPS)} or a CSV source_class,cytologia_class (default: cytologia names)",
    )
    parser.add_argument("--name", default=None, help="data set name for grouping (default: the source folder name)")
    parser.add_argument("--lenient", action="store_true", help="skip (count, log) bad files and elements")
    parser.add_argument("--box", choices=BOX_MODES, default="whole", help="box of single-cell images (folder layout)")
    parser.add_argument("--detector", type=Path, default=None, help="with --box detector: a detector checkpoint")
    parser.add_argument("--detector-size", type=int, default=512, help="detector input size, px (default 512)")
    parser.add_argument("--image-labels", type=Path, default=None, help="CSV image,class: subtypes of unlabelled boxes")
    parser.add_argument("--annotations", type=Path, default=None, help="COCO: the JSON file (default: the one in SRC)")
    parser.add_argument("--images", type=Path, default=None, help="COCO: image folder (default: images/ beside it)")
    parser.add_argument("--classes", type=Path, default=None, help="YOLO: class names (classes.txt or data.yaml)")
    parser.add_argument("--link", action="store_true", help="hard-link images instead of copying them")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from cytologia.data.importers import ImportOptions, import_dataset

    options = ImportOptions(
        class_map=args.map,
        dataset=args.name,
        lenient=args.lenient,
        box=args.box,
        detector=args.detector,
        detector_size=args.detector_size,
        image_labels=args.image_labels,
        annotations=args.annotations,
        images=args.images,
        classes=args.classes,
        link=args.link,
    )
    report = import_dataset(args.format, args.src, args.out, options)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.summary())
    return 0
