"""`cytologia combine NAME=DIR [NAME=DIR ...] --out DIR`: several data folders (Cytologia, imported sets) as one, the
data set kept in ``sources.csv`` for folds (``folds.mode=group-dataset``) and sampling weights
(:func:`cytologia.data.combine.combine_folders`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cytologia.errors import CytologiaInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cytologia combine`."""
    parser.add_argument("parts", nargs="+", metavar="NAME=DIR", help="data set name and its folder, repeatable")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the combined set")
    parser.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")
    parser.add_argument("--lenient", action="store_true", help="validate each folder leniently (clip, skip, count)")


def run(args: argparse.Namespace) -> int:
    from cytologia.data.combine import combine_folders

    parts: dict[str, Path] = {}
    for spec in args.parts:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise CytologiaInputError(f"{spec!r} is not NAME=DIR")
        if name in parts:
            raise CytologiaInputError(f"data set name {name!r} given twice")
        parts[name] = Path(folder)
    summary = combine_folders(parts, args.out, link=not args.copy, lenient=args.lenient)
    print(json.dumps({k: {kk: v[kk] for kk in ("boxes", "images", "classes")} for k, v in summary.items()}, indent=1))
    print(f"wrote {args.out}")
    return 0
