"""`cytologia evaluate --train DIR --test DIR2 --out OUT`: train a classifier on one data folder and score it on
another, per class over the classes both share (:func:`cytologia.crossdata.evaluate_cross`). The classifier and its
training come from ``configs/`` (``--exp NAME`` adds ``+exp=NAME``; ``--set key=value`` overrides a key)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cytologia evaluate`."""
    parser.add_argument("--train", type=Path, required=True, help="data folder to train on (train.csv, images/)")
    parser.add_argument("--test", type=Path, required=True, help="data folder to score on (train.csv, images/)")
    parser.add_argument("--out", type=Path, required=True, help="new run folder (cross_eval.json, per_class.csv)")
    parser.add_argument("--exp", default=None, help="experiment of configs/exp/ (e.g. smoke, vitl224)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--strict", action="store_true", help="refuse rows that need a fix (lenient by default)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from cytologia.crossdata import evaluate_cross

    overrides = ([f"+exp={args.exp}"] if args.exp else []) + list(args.set)
    result = evaluate_cross(args.train, args.test, args.out, overrides, lenient=not args.strict)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.summary())
    return 0
