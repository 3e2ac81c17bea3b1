"""`cytologia report --truth T.csv --pred P.csv --data DIR --out DIR`: the report folder of a submission (see
:mod:`cytologia.report`): per-class F1, confusion matrix, F1 per acquisition source, the worst errors as a gallery,
and an ``index.html`` linking them.

From ``--data`` it takes what is there: ``images/`` (the gallery), ``sources.csv`` (per-source scores),
``folds.csv`` with ``train.csv`` (fold table). ``--compare NAME=PRED.csv`` scores other submissions on the same truth
and shows them side by side (e.g. ``--compare single-stage=ss/submission.csv --compare null=baseline.csv``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cytologia report`."""
    parser.add_argument("--truth", type=Path, required=True, help="truth CSV: trustii_id,NAME,x1,y1,x2,y2,class")
    parser.add_argument("--pred", type=Path, required=True, help="submission CSV to report on")
    parser.add_argument("--data", type=Path, default=None, help="data folder (images/, sources.csv, folds.csv)")
    parser.add_argument("--out", type=Path, required=True, help="report folder to write")
    parser.add_argument("--name", default="this run", help="name of --pred in the side-by-side table")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=PRED.csv",
        help="another submission on the same truth, shown side by side (repeatable)",
    )
    parser.add_argument("--config", type=Path, default=None, help="resolved config YAML to include")
    parser.add_argument(
        "--cleaning", type=Path, default=None, help="cleaning_report.csv or the output folder of `cytologia clean`"
    )
    parser.add_argument("--times", type=Path, default=None, help="JSON object: stage -> seconds")
    parser.add_argument("--gallery", type=int, default=24, help="errors shown in the gallery (default 24)")


def _compare(specs: list[str], truth_path: Path) -> dict[str, object]:
    from cytologia.metrics import read_predictions, read_truth, score

    truth = read_truth(truth_path)
    out: dict[str, object] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CytologiaInputError(f"--compare {spec!r}: expected NAME=PRED.csv")
        out[name] = score(truth, read_predictions(Path(path)))
    return out


def run(args: argparse.Namespace) -> int:
    from cytologia.metrics import read_predictions, read_truth
    from cytologia.report import write_report

    data = args.data
    if data is not None and not data.is_dir():
        raise CytologiaInputError(f"{data}: no such folder")

    def in_data(name: str) -> Path | None:
        path = data / name if data is not None else None
        return path if path is not None and path.exists() else None

    times = None
    if args.times is not None:
        if not args.times.is_file():
            raise CytologiaInputError(f"{args.times}: no such file")
        times = json.loads(args.times.read_text())
        if not isinstance(times, dict):
            raise CytologiaInputError(f"{args.times}: expected a JSON object stage -> seconds")
    folds = in_data("folds.csv")
    index = write_report(
        args.out,
        read_truth(args.truth),
        read_predictions(args.pred),
        sources=in_data("sources.csv"),
        image_dir=in_data("images"),
        folds=folds,
        train=in_data("train.csv") if folds is not None else None,
        cleaning_report=args.cleaning,
        stage_times=times,
        config=args.config,
        extra_scores=_compare(args.compare, args.truth) or None,
        name=args.name,
        n_gallery=args.gallery,
    )
    print(f"wrote {index}")
    return 0
