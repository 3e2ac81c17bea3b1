"""`cytologia folds`: write ``NAME,fold`` for every image of DATA/train.csv, plus folds_report.json beside it."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia.data.errors import CytologiaInputError, ValidationError
from cytologia.data.folds import MODES, _check_args, make_folds
from cytologia.data.schema import BOX_COLUMNS, TRAIN_COLUMNS

log = logging.getLogger(__name__)
REPORT_NAME = "folds_report.json"
_MAX_PROBLEMS = 20  # bad rows listed in an error message (the total is counted)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="data folder holding train.csv (and images/)")
    parser.add_argument("--out", type=Path, required=True, help="output CSV (NAME,fold)")
    parser.add_argument("--k", type=int, default=4, help="number of folds (default 4)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="stratified",
        help="stratified: multilabel-stratified incl. inferred source (default); "
        "group-source: each inferred source entirely in one fold",
    )
    parser.add_argument("--images", type=Path, default=None, help="image folder (default DATA/images)")
    parser.add_argument("--no-images", action="store_true", help="ignore images even when present")
    parser.add_argument("--sources", type=int, default=None, metavar="K", help="number of sources (default: auto)")
    parser.add_argument("--no-dedup", action="store_true", help="do not group duplicate images")
    parser.add_argument(
        "--near-threshold", type=int, default=4, help="perceptual-hash distance of near duplicates (default 4)"
    )
    parser.add_argument("--workers", type=int, default=None, help="threads decoding images (default: CPU count)")
    parser.add_argument("--sources-out", type=Path, default=None, help="also write the inferred NAME,source table")


def _read_train(path: Path) -> pd.DataFrame:
    """The annotation table (one row per box), checked for what the split needs: the columns, a non-empty NAME and
    class, and numeric corners. A bad row raises a :class:`ValidationError` naming the file and the (1-based) row."""
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CytologiaInputError(f"{path}: not a readable CSV table ({err})") from err
    missing = [c for c in TRAIN_COLUMNS if c not in table.columns]
    if missing:
        raise ValidationError(
            path, [(None, f"missing column(s) {', '.join(missing)}; expected {','.join(TRAIN_COLUMNS)}")]
        )
    problems: list[tuple[int | None, str]] = []
    for col in ("NAME", "class"):
        for row in np.flatnonzero(table[col].str.strip().to_numpy() == ""):
            problems.append((int(row) + 1, f"empty {col}"))
    for col in BOX_COLUMNS:
        raw = table[col].to_numpy()
        values = pd.to_numeric(table[col], errors="coerce")
        for row in np.flatnonzero(~np.isfinite(values.to_numpy(float))):
            problems.append((int(row) + 1, f"{col}={raw[row]!r} is not a number"))
        table[col] = values
    if problems:
        problems.sort(key=lambda p: p[0] or 0)
        raise ValidationError(path, problems[:_MAX_PROBLEMS], total=len(problems))
    return table


def _duplicate_groups(image_dir: Path, names: list[str], near_threshold: int) -> pd.Series | None:
    """NAME -> duplicate group id from cytologia.data.hygiene, or None (with a warning) when it is not available."""
    try:
        hygiene = importlib.import_module("cytologia.data.hygiene")
    except ModuleNotFoundError as err:
        if err.name != "cytologia.data.hygiene":
            raise
        log.warning("cytologia.data.hygiene is not available: duplicate images are not grouped")
        return None
    dups = hygiene.find_duplicates(image_dir, names, near_threshold=near_threshold)
    return dups.set_index("NAME")["dup_group"]


def run(args: argparse.Namespace) -> int:
    from cytologia.data.sources import image_features, infer_sources

    data: Path = args.data
    table = _read_train(data / "train.csv")
    _check_args(table, args.k, args.mode)  # before the (slow) image reading
    names = list(pd.unique(table["NAME"].astype(str)))
    image_dir: Path | None = None if args.no_images else (args.images or data / "images")
    if image_dir is not None and not image_dir.is_dir():
        if args.images is not None:
            raise CytologiaInputError(f"image folder {image_dir} does not exist")
        log.warning("%s has no images/ folder: image statistics skipped", data)
        image_dir = None

    features = image_features(image_dir, names, workers=args.workers) if image_dir is not None else None
    dup_groups = None
    if image_dir is not None and not args.no_dedup:
        dup_groups = _duplicate_groups(image_dir, names, args.near_threshold)
    sources = None
    if features is not None:
        sources = infer_sources(features, n_sources=args.sources)  # fixed clustering seed: see make_folds
        if args.sources_out is not None:
            args.sources_out.parent.mkdir(parents=True, exist_ok=True)
            sources.reset_index().to_csv(args.sources_out, index=False)

    folds, report = make_folds(
        table, k=args.k, seed=args.seed, mode=args.mode, dup_groups=dup_groups, features=features, sources=sources
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    folds.to_csv(args.out, index=False)
    report_path = args.out.parent / REPORT_NAME
    report_path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    print(report.summary())
    print(f"wrote {args.out} ({len(folds)} images) and {report_path}")
    return 0
