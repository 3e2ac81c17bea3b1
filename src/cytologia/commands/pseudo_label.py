"""`cytologia pseudo-label --ensemble ENS --detections OOF_BOXES --out DIR [key=value ...]`: leak-aware
pseudo-labelling rounds (:func:`cytologia.classification.pseudo.pseudo_label`).

Each round labels the test images of the training data folder (its ``test.csv``) with per-fold teachers -- fold
``k``'s pseudo-labels come from the fold-``k`` models only -- keeps the boxes whose detector score x blended
probability reaches the threshold chosen on the out-of-fold predictions (``--detections``: the detector run's
``oof_boxes.csv``), retrains every member of the ensemble with them and re-tunes the ensemble. Settings: the
``pseudo_label`` group (``configs/pseudo_label/default.yaml``), overridden by ``key=value`` arguments, e.g.
``pseudo_label.rounds=2 pseudo_label.stage2=true``. Prints per round the threshold, the pseudo-labels added per
teacher fold and each member's CV before and after; writes ``DIR/round_<r>/`` and ``DIR/pseudo_label_report.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ensemble", type=Path, required=True, help="the tuned teacher (cytologia tune)")
    parser.add_argument("--detections", type=Path, required=True, help="the detector's oof_boxes.csv")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--config", type=Path, default=None, help="a run's config.yaml (default: first member's)")
    parser.add_argument("--runtime", choices=("onnx", "torch"), default="onnx", help="teacher predictions (onnx)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (pseudo_label.*)")


def run(args: argparse.Namespace) -> int:
    from cytologia.classification.distill import config_from_run, member_runs
    from cytologia.classification.pseudo import pseudo_label, settings_from_config
    from cytologia.ensemble import read_ensemble

    ensemble = read_ensemble(args.ensemble)
    cfg = config_from_run(args.config or member_runs(ensemble)[0] / "config.yaml", args.overrides)
    settings = settings_from_config(cfg, runtime=args.runtime)
    result = pseudo_label(ensemble, cfg.data.root, args.out, settings, detections=args.detections)
    print("\n".join(result.lines))
    return 0
