"""`cytologia baseline --data DIR --out PRED.csv`: the null model every result should beat (a prior box and the most
frequent class for every expected box; :mod:`cytologia.baseline`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder with train.csv, test.csv and images/")
    parser.add_argument("--out", type=Path, required=True, help="submission CSV to write")


def run(args: argparse.Namespace) -> int:
    from cytologia.baseline import null_baseline, summary_line

    print(summary_line(null_baseline(args.data, args.out), args.out))
    return 0
