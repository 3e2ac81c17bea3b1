"""`cytologia folds`: write ``NAME,fold`` for every image of DATA/train.csv, plus folds_report.json beside it
(:func:`cytologia.data.folds.folds_for_folder`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cytologia.data.folds import MODES


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


def run(args: argparse.Namespace) -> int:
    from cytologia.data.folds import folds_for_folder
    from cytologia.data.prepare import FOLDS_REPORT

    folds, report = folds_for_folder(
        args.data,
        args.out,
        k=args.k,
        seed=args.seed,
        mode=args.mode,
        images=args.images,
        use_images=not args.no_images,
        n_sources=args.sources,
        dedup=not args.no_dedup,
        near_threshold=args.near_threshold,
        workers=args.workers,
        sources_out=args.sources_out,
    )
    print(report.summary())
    print(f"wrote {args.out} ({len(folds)} images) and {args.out.parent / FOLDS_REPORT}")
    return 0
