"""`cytologia plan +exp=NAME [key=value ...] [--json] [--run DIR] [--gpu NAME]`: stages, model sizes, GPU-hours,
weights and disk of an experiment before it runs (:func:`cytologia.plan.plan_experiment`); nothing is trained."""

from __future__ import annotations

import argparse
from pathlib import Path

from cytologia.plan import DEFAULT_GPU, DEFAULT_UTILISATION, GPUS, plan_experiment, table_lines, to_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", help="as train.py takes them: +exp=NAME and key=value overrides")
    parser.add_argument("--json", action="store_true", help="the plan as one JSON object")
    parser.add_argument("--run", type=Path, default=None, help="a run folder: mark the stages it already holds")
    parser.add_argument("--gpu", default=DEFAULT_GPU, choices=sorted(GPUS), help="GPU the hours are estimated for")
    parser.add_argument(
        "--utilisation", type=float, default=DEFAULT_UTILISATION, help="share of the GPU's peak the estimate assumes"
    )


def run(args: argparse.Namespace) -> int:
    plan = plan_experiment(args.args, args.run, args.gpu, args.utilisation)
    print(to_json(plan) if args.json else "\n".join(table_lines(plan)))
    return 0
