"""`cytologia distill --ensemble ENS --out DIR [key=value ...]`: distil a tuned ensemble into one compact student
(:func:`cytologia.classification.distill.distill`).

The teacher targets are the ensemble's blend of its members' out-of-fold logits (``--oof``: run folders or OOF
files; default the run folders of the ensemble's checkpoints). The training config (data folder, folds, trainer) is a
run's ``config.yaml`` (``--config``; default the first member run's), its ``distill`` group (the checkout's
``configs/distill/default.yaml`` for runs made before it) naming the student and the loss; ``key=value`` arguments
override it as on ``train.py``'s command line, e.g. ``distill.student.name=mobilenetv3_small_100
distill.kd_weight=0.5 trainer.max_epochs=10``. Writes ``DIR/student.json`` (the student + the teacher's detector, for
``cytologia predict`` and ``cytologia bench pipeline``), ``DIR/cv`` and ``DIR/final`` run folders, and
``DIR/distill_summary.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ensemble", type=Path, required=True, help="the tuned teacher (cytologia tune)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--oof", type=Path, action="append", default=None, help="member run folder or OOF file")
    parser.add_argument("--config", type=Path, default=None, help="a run's config.yaml (default: first member's)")
    parser.add_argument("--runtime", choices=("onnx", "torch"), default="onnx", help="for distill.unlabelled")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (distill.*, trainer.*)")


def run(args: argparse.Namespace) -> int:
    from cytologia.classification.distill import config_from_run, distill, member_runs
    from cytologia.ensemble import read_ensemble

    ensemble = read_ensemble(args.ensemble)
    config = args.config or member_runs(ensemble)[0] / "config.yaml"
    result = distill(config_from_run(config, args.overrides), ensemble, args.out, oof=args.oof, runtime=args.runtime)
    print("\n".join(result.lines))
    return 0
