"""`cytologia single-stage --data DIR --out DIR`: the single-stage baseline (one 23-class YOLO, the 3rd place's
approach) trained on the data folder's folds within an epoch or wall-clock budget, its known-count submission written
and validated, and scored against ``test_labels.csv`` when the folder has it (see :mod:`cytologia.single_stage`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cytologia single-stage`."""
    from cytologia.single_stage import SingleStageSettings

    d = SingleStageSettings()
    parser.add_argument("--data", type=Path, required=True, help="folder with train.csv, test.csv and images/")
    parser.add_argument("--out", type=Path, required=True, help="run folder (weights, submission.csv, score.json)")
    parser.add_argument("--model", default=d.model, help=f"ultralytics YOLO architecture (default {d.model})")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    parser.add_argument(
        "--time-min",
        type=float,
        default=None,
        help="training budget in minutes (of --clock), validation included; replaces --epochs as the limit",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default=d.clock,
        help="what --time-min counts: wall time, or this process's CPU time (the same on a busy machine; "
        f"default {d.clock})",
    )
    parser.add_argument("--img-size", type=int, default=d.img_size, help=f"input side, px (default {d.img_size})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"default {d.lr}")
    parser.add_argument("--device", default=d.device, help="auto (first CUDA device, else cpu), cpu, 0, ...")
    parser.add_argument("--workers", type=int, default=d.workers, help=f"data-loading processes (default {d.workers})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    parser.add_argument(
        "--weights",
        default=None,
        help="initial weights: a catalog name (yolo11m: `cytologia weights pull yolo11m`) or a file in models/ checked "
        "against its manifest; default random",
    )
    parser.add_argument("--fold", type=int, default=0, help="held-out fold that selects the checkpoint (default 0)")
    parser.add_argument("--folds-k", type=int, default=4, help="folds to make when DATA/folds.csv is absent")
    parser.add_argument("--cache", type=Path, default=None, help="dataset cache folder (default OUT/cache)")
    parser.add_argument("--strict", action="store_true", help="refuse train.csv rows that need a fix (lenient default)")
    parser.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra ultralytics train argument (YAML value), repeatable; e.g. on a few-minute CPU budget "
        "nbs=BATCH (one optimizer step per batch instead of accumulating to 64) and warmup_epochs=1",
    )


def _train_args(specs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> ultralytics arguments (values parsed as YAML: 8 -> int, 0.5 -> float, true -> bool)."""
    import yaml

    from cytologia.errors import CytologiaInputError
    from cytologia.single_stage import SingleStageSettings

    out: dict[str, Any] = dict(SingleStageSettings().extra)  # the defaults stay unless overridden
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise CytologiaInputError(f"--train-arg {spec!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _weights(value: str | None) -> str | None:
    """``--weights`` as a verified file (a catalog name resolved in models/); None: random init."""
    from cytologia.weights_catalog import resolve_weights

    path = resolve_weights(value, key="--weights") if value is not None else None
    return str(path) if path is not None else None


def run(args: argparse.Namespace) -> int:
    from cytologia.single_stage import SingleStageSettings, run_single_stage, summary_lines

    settings = SingleStageSettings(
        model=args.model,
        img_size=args.img_size,
        epochs=args.epochs,
        time_min=args.time_min,
        clock=args.clock,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
        weights=_weights(args.weights),
        extra=_train_args(args.train_arg),
    )
    metrics = run_single_stage(
        args.data,
        args.out,
        settings,
        fold=args.fold,
        folds_k=args.folds_k,
        cache_dir=args.cache,
        lenient=not args.strict,
    )
    print("\n".join(summary_lines(metrics, args.out)))
    return 0
