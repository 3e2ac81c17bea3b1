"""`cytologia bench score`: seconds of the vectorised score vs the plain per-image loop, on the same inputs.

By default the truth is the whole real ``train.csv`` (52,748 boxes; ``trustii_id`` 0..n-1 in file order) and the
prediction a perturbed copy of it (:func:`perturb`: box jitter, class swaps, odd class strings, a few non-numeric
coordinates, dropped rows, repeated ids, duplicate boxes, unknown ids, wrong names, shuffled), written to a
temporary CSV and read back as ``cytologia score`` reads it (reading is not timed). Runs of the two
implementations are interleaved so that both see the same machine load; seconds are medians. Both must agree
(|difference| < ``--tolerance``, default 1e-9, on score, giou and f1; exit status 1 otherwise). Targets: the
vectorised score under 1 s and at least 20x faster than the loop (reported; ``--strict`` makes a missed target exit
1). The last line of stdout is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia import metrics, metrics_reference
from cytologia.data.schema import BOX_COLUMNS, CLASSES
from cytologia.errors import CytologiaInputError
from cytologia.paths import real_data_dir

TOLERANCE = 1e-9  # the two implementations differ only by float summation order (~1e-15)
TARGET_SECONDS = 1.0
TARGET_SPEEDUP = 20.0
ODD_CLASSES = ("None", "NA", "", "unknown")  # strings that are not classes: each is one more F1-0 label


def default_truth() -> Path:
    """The real train.csv: $CYTOLOGIA_REAL_DATA/train.csv, else ../shared/data/cytologia/train.csv beside the
    checkout (:func:`cytologia.paths.real_data_dir`). An installed package without the variable has no default."""
    folder = real_data_dir()
    if folder is None:
        raise CytologiaInputError(
            "no default truth table: cytologia is installed, not run from a source checkout; pass --truth or set "
            "CYTOLOGIA_REAL_DATA"
        )
    return folder / "train.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the score benchmark."""
    parser.add_argument(
        "--truth", type=Path, default=None, help="truth CSV (trustii_id optional; default: the real train.csv)"
    )
    parser.add_argument("--pred", type=Path, default=None, help="submission CSV (default: a perturbed truth copy)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of the vectorised score (median; default 5)")
    parser.add_argument("--loop-repeats", type=int, default=3, help="runs of the per-image loop (median; default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbation (default 0)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a speed target is missed")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help=f"exit 1 unless |vectorised - loop| < this on score, giou and f1 (default {TOLERANCE:g})",
    )


def perturb(truth: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """A submission-like copy of ``truth`` that exercises every scoring rule, in shuffled row order.

    Per truth row (probabilities): box jitter (all; sd 4 % of the box side), class swap (10 %), odd class string
    (0.2 %), a missing coordinate (0.05 %), row dropped (2 %), exact duplicate row (2 %), the id repeated with
    another box (1 %), box and class copied from the first box of its image (20 % of the other boxes of
    multi-box images: exact duplicates under two ids), unknown id (1 % extra rows) and the NAME of another image
    (1 % extra rows).
    """
    rng = np.random.default_rng(seed)
    n = len(truth)
    pred = truth.loc[:, ["trustii_id", "NAME", *BOX_COLUMNS, "class"]].reset_index(drop=True).copy()
    boxes = pred.loc[:, list(BOX_COLUMNS)].to_numpy(dtype=np.float64)
    size = np.abs(np.column_stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2)) + 1.0
    boxes = np.round(boxes + rng.normal(0.0, 0.04, boxes.shape) * size, 2)
    cls = pred["class"].to_numpy(dtype=object).copy()
    swap = np.flatnonzero(rng.random(n) < 0.10)
    known = np.array([CLASSES.index(c) if c in CLASSES else 0 for c in cls[swap]], dtype=np.int64)
    cls[swap] = np.array(CLASSES, dtype=object)[(known + rng.integers(1, len(CLASSES), len(swap))) % len(CLASSES)]
    odd = np.flatnonzero(rng.random(n) < 0.002)
    cls[odd] = rng.choice(np.array(ODD_CLASSES, dtype=object), len(odd))
    boxes[rng.random(n) < 0.0005, 0] = np.nan
    # Copy box and class from the first box of an image onto 20 % of its other boxes.
    names = pred["NAME"].to_numpy(dtype=object)
    first = pd.Series(np.arange(n)).groupby(names).transform("min").to_numpy()
    copied = np.flatnonzero((first != np.arange(n)) & (rng.random(n) < 0.2))
    boxes[copied], cls[copied] = boxes[first[copied]], cls[first[copied]]
    for j, col in enumerate(BOX_COLUMNS):
        pred[col] = boxes[:, j]
    pred["class"] = cls

    parts = [pred[rng.random(n) >= 0.02]]  # 2 % of rows dropped
    parts.append(pred[rng.random(n) < 0.02])  # exact duplicate rows
    moved = pred[rng.random(n) < 0.01].copy()  # the id again, with another box: the first row must win
    moved[list(BOX_COLUMNS)] = moved[list(BOX_COLUMNS)].to_numpy() + 20.0
    parts.append(moved)
    unknown = pred[rng.random(n) < 0.01].copy()
    unknown["trustii_id"] = int(pred["trustii_id"].max()) + 1 + np.arange(len(unknown))
    parts.append(unknown)
    wrong = pred[rng.random(n) < 0.01].copy()
    wrong["NAME"] = names[rng.integers(0, n, len(wrong))]
    wrong.loc[wrong["NAME"].to_numpy() == pred.loc[wrong.index, "NAME"].to_numpy(), "NAME"] = "not_an_image.jpg"
    parts.append(wrong)
    out = pd.concat(parts, ignore_index=True)
    return out.iloc[rng.permutation(len(out))].reset_index(drop=True)


def _time_both(
    vectorised: Callable[[], metrics.ScoreResult], loop: Callable[[], dict[str, object]], repeats: int, loops: int
) -> tuple[list[float], list[float], metrics.ScoreResult, dict[str, object]]:
    """Seconds of each run of both implementations, interleaved (vectorised, loop, vectorised, loop, ..., then the
    remaining vectorised runs) so that both see the same machine load; and the last result of each."""
    vec_runs: list[float] = []
    loop_runs: list[float] = []
    for i in range(max(repeats, loops, 1)):
        if i < max(repeats, 1):
            start = time.perf_counter()
            result = vectorised()
            vec_runs.append(time.perf_counter() - start)
        if i < max(loops, 1):
            start = time.perf_counter()
            oracle = loop()
            loop_runs.append(time.perf_counter() - start)
    return vec_runs, loop_runs, result, oracle


def run(args: argparse.Namespace) -> int:
    """Load or build the inputs, time both implementations, check they agree, print a table and a JSON line."""
    truth_path = args.truth if args.truth is not None else default_truth()
    if not truth_path.is_file():
        where = "" if args.truth is not None else " (the real table; pass --truth or set CYTOLOGIA_REAL_DATA)"
        raise CytologiaInputError(f"{truth_path}: no such file{where}")
    start = time.perf_counter()
    truth = metrics.read_truth(truth_path, assign_ids=True)
    with tempfile.TemporaryDirectory() as tmp:
        pred_path = args.pred
        if pred_path is None:
            pred_path = Path(tmp) / "perturbed.csv"
            perturb(truth, args.seed).to_csv(pred_path, index=False)
        read_start = time.perf_counter()
        pred = metrics.read_predictions(pred_path)
    read_s = time.perf_counter() - read_start
    prep_s = time.perf_counter() - start

    vec_runs, loop_runs, result, loop = _time_both(
        lambda: metrics.score(truth, pred),
        lambda: metrics_reference.score_loop(truth, pred),
        args.repeats,
        args.loop_repeats,
    )
    vec_s, loop_s = statistics.median(vec_runs), statistics.median(loop_runs)
    diff = max(abs(getattr(result, k) - float(loop[k])) for k in ("score", "giou", "f1"))
    agree = bool(diff < args.tolerance)  # False for NaN
    speedup = loop_s / vec_s if vec_s > 0 else float("inf")
    met = {"seconds": vec_s < TARGET_SECONDS, "speedup": speedup >= TARGET_SPEEDUP}

    source = str(args.pred) if args.pred is not None else f"perturbed copy of the truth (seed {args.seed})"
    print(f"truth: {truth_path} ({result.n_truth} boxes, {result.n_images} images)")
    print(f"predictions: {source}: {result.n_pred_rows} rows, {result.n_pred_kept} kept")
    print(f"inputs prepared in {prep_s:.2f} s (prediction CSV read in {read_s:.3f} s; not timed below)")
    print(f"{'implementation':<32}{'seconds':>10}{'(best)':>10}{'score':>12}{'giou':>12}{'f1':>12}")
    rows = [
        (f"vectorised (median of {len(vec_runs)})", vec_s, min(vec_runs), result.score, result.giou, result.f1),
        (
            f"per-image loop (median of {len(loop_runs)})",
            loop_s,
            min(loop_runs),
            loop["score"],
            loop["giou"],
            loop["f1"],
        ),
    ]
    for label, seconds, best, *values in rows:
        print(f"{label:<32}{seconds:>10.4f}{best:>10.4f}" + "".join(f"{float(v):>12.6f}" for v in values))
    verdict = "agree" if agree else "DISAGREE"
    best_ratio = min(loop_runs) / min(vec_runs) if min(vec_runs) > 0 else float("inf")
    print(
        f"speed-up {speedup:.1f}x (best runs: {best_ratio:.1f}x); "
        f"max |difference| {diff:.1e} (must be < {args.tolerance:g}): {verdict}"
    )
    print(
        f"targets: vectorised < {TARGET_SECONDS:g} s: {'met' if met['seconds'] else 'MISSED'}; "
        f"speed-up >= {TARGET_SPEEDUP:g}x: {'met' if met['speedup'] else 'MISSED'}"
    )
    payload = {
        "bench": "score",
        "truth": str(truth_path),
        "pred": str(args.pred) if args.pred is not None else None,
        "seed": args.seed,
        "n_truth": result.n_truth,
        "n_images": result.n_images,
        "n_pred_rows": result.n_pred_rows,
        "n_pred_kept": result.n_pred_kept,
        "read_pred_s": read_s,
        "vectorised_s": vec_s,
        "vectorised_runs_s": vec_runs,
        "loop_s": loop_s,
        "loop_runs_s": loop_runs,
        "speedup": speedup,
        "speedup_best": best_ratio,
        "max_abs_diff": diff,
        "tolerance": args.tolerance,
        "agree": agree,
        "score": result.score,
        "giou": result.giou,
        "f1": result.f1,
        "target_seconds": TARGET_SECONDS,
        "target_speedup": TARGET_SPEEDUP,
        "targets_met": all(met.values()),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
    }
    print(json.dumps(payload))
    if not agree:
        return 1
    return 1 if args.strict and not all(met.values()) else 0
