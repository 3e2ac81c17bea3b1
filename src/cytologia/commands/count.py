"""`cytologia count --cells submission_calibrated.csv --smears smears.csv --ensemble ensemble.json --out counts/`:
the differential count per smear (:func:`cytologia.counts.count_cells`).

Per smear: count and % of each class with 95 % intervals that include the classifier's uncertainty, cells referred
to an expert, and a flag when a group of classes crosses a threshold (``--flag NAME=CLASS+CLASS:PERCENT``, repeat;
default blasts B+MBL+LyB+MoB and lymphoma cells LF+LLC+LM+LZMG+SS above 5 %). The smear of a cell comes from a
table (``--smears FILE``, column ``--column``) or a regular expression on NAME (``--smear-regex``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cells", type=Path, required=True, help="per-box output of cytologia predict (*_calibrated.csv)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write (counts.csv, smears.csv, PNGs, html)")
    key = parser.add_mutually_exclusive_group(required=True)
    key.add_argument("--smears", type=Path, help="table with NAME and the smear key column")
    key.add_argument("--smear-regex", default=None, help="regex on NAME: its first group (else the match) is the key")
    parser.add_argument("--column", default="smear", help="smear key column of --smears (smear)")
    parser.add_argument("--ensemble", type=Path, default=None, help="ensemble file: class shares of its calibration")
    parser.add_argument("--flag", action="append", default=None, help="NAME=CLASS+CLASS:PERCENT (repeat)")
    parser.add_argument("--flag-probability", type=float, default=0.5, help="flag at P(share > threshold) >= this")
    parser.add_argument("--draws", type=int, default=2000, help="posterior draws per smear (2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truth", type=Path, default=None, help="NAME,class per cell: true shares beside the counts")
    parser.add_argument("--lenient", action="store_true", help="leave out (and count) cells without a smear key")


def run(args: argparse.Namespace) -> int:
    from cytologia.counts import DEFAULT_RULES, count_cells, parse_rule
    from cytologia.errors import CytologiaInputError

    if args.draws < 100:
        raise CytologiaInputError(f"--draws {args.draws}: at least 100 (the interval rests on its tail draws)")
    rules = [parse_rule(r) for r in args.flag] if args.flag else list(DEFAULT_RULES)
    done = count_cells(
        args.cells,
        args.out,
        smears=args.smears,
        column=args.column,
        regex=args.smear_regex,
        ensemble=args.ensemble,
        rules=rules,
        flag_probability=args.flag_probability,
        draws=args.draws,
        seed=args.seed,
        lenient=args.lenient,
        truth=args.truth,
    )
    print("\n".join(done.lines))
    return 0
