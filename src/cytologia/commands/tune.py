"""`cytologia tune --oof RUN [--oof RUN2 ...] --truth train.csv --out ensemble.json`: tune the classifier ensemble
(:func:`cytologia.ensemble.runs.tune_ensemble`).

Each ``--oof`` is a classification run folder (its ``oof_logits.csv``, ``config.yaml``, ``summary.json`` and fold
checkpoints are read) or an OOF logits file. Every experiment becomes one member; with flip TTA logits in the table
(``<exp>+hflip``) those are used unless ``--tta none``. A multi-label full-image run among them (OOF models
``ml:<exp>``) becomes the multi-label member, blended in on single-cell images. Weights are tuned to maximise the
challenge's F1 part on the out-of-fold logits, with the held-out check printed (see :mod:`cytologia.ensemble.tune`).
``--detector`` adds the detector (a detection run folder or a ``detector.pt``) so that the file is ready for
``cytologia predict``.

The same OOF boxes fit the calibration (``--no-calibration``: skipped): one temperature per member and one for the
ensemble, and the refer-to-expert threshold for at most ``--target-error`` errors on the boxes kept
(:mod:`cytologia.calibration`, docs/calibration_and_counts.md).

The fold checkpoints put in the ensemble are those that wrote the OOF logits (``oof_checkpoint`` of the run's
``summary.json``; ``best_checkpoint`` for runs from before ``trainer.select``). Which choice that was -- ``last``, or
``best_val``, which peeked at the held-out fold and makes the OOF figures optimistic -- is kept in the ensemble
file's tuning report (``checkpoint_selection``; ``unknown`` for an OOF file without its run folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--oof", type=Path, action="append", required=True, help="run folder or OOF file (repeat)")
    parser.add_argument("--truth", type=Path, required=True, help="train.csv the OOF boxes come from")
    parser.add_argument("--out", type=Path, required=True, help="ensemble file to write (.json, .yaml)")
    parser.add_argument("--members", default=None, help="comma-separated OOF model names (default: every experiment)")
    parser.add_argument("--multilabel", default=None, help="OOF model name of the full-image multi-label member")
    parser.add_argument("--tta", choices=("auto", "none"), default="auto", help="auto: the +hflip logits if present")
    parser.add_argument("--boxes", type=Path, default=None, help="detected boxes table the crops were cut from")
    parser.add_argument("--folds", type=Path, default=None, help="folds.csv (with --boxes: images without boxes)")
    parser.add_argument("--class-bias", action="store_true", help="also tune one logit bias per class")
    parser.add_argument("--no-heldout", action="store_true", help="skip the held-out check (faster)")
    parser.add_argument("--detector", type=Path, default=None, help="detection run folder or detector.pt")
    parser.add_argument("--det-img-size", type=int, default=None, help="detector input (default: its run config)")
    parser.add_argument(
        "--target-error", type=float, default=0.02, help="refer-to-expert: error rate allowed on kept boxes (0.02)"
    )
    parser.add_argument("--no-calibration", action="store_true", help="skip temperatures and the refer threshold")


def run(args: argparse.Namespace) -> int:
    from cytologia.ensemble.runs import tune_ensemble

    members = [m.strip() for m in args.members.split(",") if m.strip()] if args.members else None
    tuned = tune_ensemble(
        args.oof,
        args.truth,
        args.out,
        members=members,
        multilabel=args.multilabel,
        tta=args.tta,
        boxes=args.boxes,
        folds=args.folds,
        class_bias=args.class_bias,
        heldout=not args.no_heldout,
        detector=args.detector,
        det_img_size=args.det_img_size,
        calibrate=not args.no_calibration,
        target_error=args.target_error,
    )
    print("\n".join(tuned.lines))
    return 0
