"""`cytologia validate`: check DATA/train.csv (and test.csv, a submission, the images) against the data contract.

Prints a summary; with ``--out`` writes the validated annotations table (``annotations.csv``), the test list
(``test.csv``, when there is one) and ``validation_report.json``, plus ``jpeg_check.csv`` / ``duplicates.csv`` when
those checks run. A strict failure raises :class:`~cytologia.errors.ValidationError`, which the CLI turns into
exit code 2 with a message naming the file and rows.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd

from cytologia.errors import CytologiaInputError, ValidationError

log = logging.getLogger(__name__)

ANNOTATIONS_NAME = "annotations.csv"
TEST_NAME = "test.csv"
REPORT_NAME = "validation_report.json"
JPEG_NAME = "jpeg_check.csv"
DUPLICATES_NAME = "duplicates.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="data folder holding train.csv (and test.csv)")
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: DATA/images when present)")
    parser.add_argument("--no-images", action="store_true", help="ignore images even when present")
    parser.add_argument(
        "--lenient", action="store_true", help="skip/drop (and count) rows that break the contract instead of failing"
    )
    parser.add_argument("--submission", type=Path, default=None, help="also validate this submission CSV")
    parser.add_argument("--out", type=Path, default=None, help="folder for the validated tables and the JSON report")
    parser.add_argument(
        "--check-jpeg", action="store_true", help="decode every image and report corrupt/truncated JPEGs"
    )
    parser.add_argument(
        "--repair-cache", type=Path, default=None, help="with --check-jpeg: re-encode damaged images into this folder"
    )
    parser.add_argument("--duplicates", action="store_true", help="find exact and near-duplicate images")
    parser.add_argument(
        "--near-threshold", type=int, default=4, help="perceptual-hash distance of near duplicates (default 4)"
    )
    parser.add_argument("--workers", type=int, default=None, help="threads reading images (default: CPU count)")


def _image_dir(args: argparse.Namespace) -> Path | None:
    if args.no_images:
        return None
    if args.images is not None:
        if not args.images.is_dir():
            raise CytologiaInputError(f"image folder {args.images} does not exist")
        return args.images
    default = args.data / "images"
    return default if default.is_dir() else None  # read_annotations logs that image checks are skipped


def _check_jpegs(
    args: argparse.Namespace, image_dir: Path, names: list[str], report: dict[str, object]
) -> pd.DataFrame:
    from cytologia.data.images import OK, UNREADABLE, repair_images, scan_images

    scan = scan_images(image_dir, names, workers=args.workers)
    counts = {str(k): int(v) for k, v in scan["status"].value_counts().items()}
    jpeg: dict[str, object] = {"images": len(scan), "status": counts}
    report["jpeg"] = jpeg
    print(f"jpeg check: {len(scan)} images: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    unreadable = scan.loc[scan["status"] == UNREADABLE]
    if len(unreadable) and not args.lenient:
        problems = [(None, f"{n}: {m}") for n, m in zip(unreadable["NAME"], unreadable["message"])]
        raise ValidationError(image_dir, problems[:50], len(problems))
    if args.repair_cache is not None and (scan["status"] != OK).any():
        repaired = repair_images(image_dir, scan, args.repair_cache)
        jpeg["repaired"] = len(repaired)
        jpeg["repair_cache"] = str(args.repair_cache)
        print(f"repaired {len(repaired)} images into {args.repair_cache} (originals untouched)")
    return scan


def run(args: argparse.Namespace) -> int:
    from cytologia.data.io import (
        read_annotations,
        read_raw_csv,
        validate_submission,
        validate_test,
        write_csv,
    )
    from cytologia.data.schema import SUBMISSION_COLUMNS, TEST_COLUMNS

    data: Path = args.data
    if not data.is_dir():
        raise CytologiaInputError(f"data folder {data} does not exist")
    image_dir = _image_dir(args)
    report: dict[str, object] = {}

    train, train_report = read_annotations(data / "train.csv", image_dir, lenient=args.lenient, workers=args.workers)
    report["train"] = train_report.to_dict()
    print(train_report.summary())

    test = None
    if (data / TEST_NAME).is_file():
        test, test_report = validate_test(
            read_raw_csv(data / TEST_NAME, TEST_COLUMNS), data / TEST_NAME, image_dir, args.workers
        )
        report["test"] = test_report.to_dict()
        print(test_report.summary())
    else:
        log.info("%s has no test.csv: test list not checked", data)

    if args.submission is not None:
        sizes = None
        if image_dir is not None and test is not None:
            from cytologia.data.images import image_sizes

            names = list(pd.unique(test["NAME"]))
            wh, _ = image_sizes([image_dir / n for n in names], workers=args.workers)
            sizes = pd.DataFrame({"NAME": names, "img_w": wh[:, 0], "img_h": wh[:, 1]})
            sizes = sizes.loc[sizes["img_w"] > 0]
        _, sub_report = validate_submission(
            read_raw_csv(args.submission, SUBMISSION_COLUMNS), args.submission, test, sizes
        )
        report["submission"] = sub_report.to_dict()
        print(sub_report.summary() + ("" if test is not None else "  (no test.csv: coverage of the ids not checked)"))

    all_names = list(pd.unique(train["NAME"]))
    train_set = set(all_names)
    test_names = [] if test is None else [n for n in pd.unique(test["NAME"]) if n not in train_set]
    scan = dups = None
    if (args.check_jpeg or args.duplicates) and image_dir is None:
        raise CytologiaInputError("--check-jpeg/--duplicates need images: give --images or put them in DATA/images")
    if args.check_jpeg:
        scan = _check_jpegs(args, image_dir, all_names + test_names, report)
    if args.duplicates:
        from cytologia.data.hygiene import duplicate_summary, find_duplicates

        dups = find_duplicates(
            image_dir, all_names, near_threshold=args.near_threshold, test_names=test_names, workers=args.workers
        )
        summary = duplicate_summary(dups)
        report["duplicates"] = summary
        print(
            f"duplicates: {summary['groups']} groups ({summary['exact_groups']} exact, {summary['near_groups']} near)"
            f" over {summary['images_in_groups']} images: {summary['train_only_groups']} train-only, "
            f"{summary['train_test_groups']} train-test"
        )

    if args.out is not None:
        out: Path = args.out
        written = [write_csv(train, out / ANNOTATIONS_NAME)]
        if test is not None:
            written.append(write_csv(test, out / TEST_NAME))
        if scan is not None:
            written.append(write_csv(scan, out / JPEG_NAME))
        if dups is not None:
            written.append(write_csv(dups, out / DUPLICATES_NAME))
        (out / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
        written.append(out / REPORT_NAME)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0
