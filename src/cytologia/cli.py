"""`cytologia <command>`: one entry point, one module per command.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when
their command runs, so ``cytologia score`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Adding a command = adding a module and one line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("cytologia.commands.validate", "validate train/test/submission tables (and images)"),
    "import": ("cytologia.commands.import_data", "import another leukocyte data set (folder, VOC, COCO, YOLO)"),
    "combine": ("cytologia.commands.combine", "several data folders as one, the data set kept for folds/sampling"),
    "evaluate": ("cytologia.commands.evaluate", "cross-data-set: train on one folder, F1 on another's shared classes"),
    "score": ("cytologia.commands.score", "challenge score of a submission against the truth"),
    "synth": ("cytologia.commands.synth", "generate a synthetic Cytologia data set"),
    "folds": ("cytologia.commands.folds", "source-aware, multilabel-stratified folds"),
    "baseline": ("cytologia.commands.baseline", "null-model submission: prior box and most frequent class"),
    "weights": ("cytologia.commands.weights", "pull pretrained weights, list what recipes need, check models/"),
    "plan": ("cytologia.commands.plan", "an experiment's stages, model sizes, GPU-hours, weights and disk, untrained"),
    "export": ("cytologia.commands.export", "a detector to ONNX (verified against torch); an ensemble as a bundle"),
    "clean": ("cytologia.commands.clean", "flag and remove noisy training boxes with out-of-fold detections"),
    "tune": ("cytologia.commands.tune", "tune the classifier ensemble's weights on out-of-fold logits"),
    "distill": ("cytologia.commands.distill", "distil a tuned ensemble into one compact student (OOF targets)"),
    "pseudo-label": ("cytologia.commands.pseudo_label", "leak-aware pseudo-labels: per-fold teachers, CV before/after"),
    "predict": ("cytologia.commands.predict", "detect, classify and write a validated submission (+ per-image output)"),
    "single-stage": ("cytologia.commands.single_stage", "single-stage baseline: one 23-class YOLO, trained and scored"),
    "report": ("cytologia.commands.report", "report folder: per-class F1, confusion, per-source F1, error gallery"),
    "count": ("cytologia.commands.count", "differential count per smear: class shares, 95-percent intervals, flags"),
    "bench": ("cytologia.commands.bench", "benchmarks (score, synth, folds, ...)"),
}


def _requested(argv: list[str]) -> set[str]:
    """The command named by the first positional argument (options before it are global ones like -v), so that only
    that command's module is imported -- a file argument that happens to be called "score" imports nothing."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return {first} if first in COMMANDS else set()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="cytologia", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = _requested(argv)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name in wanted:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from cytologia.errors import CytologiaInputError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except CytologiaInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
