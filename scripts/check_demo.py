"""Check a finished demo run (``python train.py +exp=demo``) against floors that a broken stage would miss.

    python scripts/check_demo.py [RUN_DIR]      # default: the newest outputs/demo/*/pipeline_summary.json

Reads the run's ``pipeline_summary.json`` and exits non-zero, naming every failed check, when:

- the two-stage score, its box term (GIoU: the detector) or its macro-F1 (the classifiers) is under its floor;
- the two-stage score is not clearly above the single-stage baseline's and the null model's (a margin, not just >);
- the single-stage baseline did not get the two-stage training's budget in process CPU seconds (``clock: cpu``).

The floors (``FLOORS``) come from measured demo runs (seeds and figures in the comments) and their spread: each is
the lowest value measured minus a margin of several times the spread, so a healthy run on another 2-core machine
passes and a broken stage (a detector that finds no cell, classifiers at chance, a blend that picks one class) does
not. CI (``.ci/run``) runs this right after the README's run command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUMMARY_FILE = "pipeline_summary.json"

# Measured on a 2-core CPU VM shared with other jobs (load 2-3.5), `python train.py +exp=demo seed=S` (data synth_seed
# 0, 400 images, 2 folds, trainer.select=last, single-stage budget in process CPU seconds):
#   seed        two-stage score / GIoU / macro-F1   single-stage score   null score   wall
#   1           0.618 / 0.908 / 0.546               0.349 (0.379 rerun)  0.161        19.9 min
#   2           0.588 / 0.898 / 0.511               0.390                0.161        18 min
#   42 (CI)     0.573 / 0.910 / 0.489               0.362                0.161        17.9 min (`bash .ci/run`)
# Spread between seeds: score 0.045, GIoU 0.012, macro-F1 0.057, margin over single-stage 0.07. Each floor is the
# lowest run minus about two spreads (1.5 for the single-stage margin): a healthy run passes, a broken stage (no cell
# found: GIoU ~0.78; classifiers at chance: F1 ~0.04; one class for every cell) does not.
FLOORS: dict[str, float] = {
    "two_stage_score": 0.48,  # lowest 0.573
    "two_stage_giou": 0.85,  # lowest 0.898; the null model's known-count boxes score 0.775
    "two_stage_f1": 0.38,  # lowest 0.489; chance is 1/23
    "margin_over_single_stage": 0.10,  # lowest 0.199 (two-stage minus single-stage at the same CPU budget)
    "margin_over_null": 0.25,  # lowest 0.412
}
BUDGET_TOLERANCE = 0.35  # single-stage CPU seconds within +-35 % of the two-stage training's (epoch granularity)


def newest_run(root: Path) -> Path:
    """The newest run folder under ``root`` that holds a pipeline summary."""
    runs = sorted(root.glob(f"*/{SUMMARY_FILE}"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no {SUMMARY_FILE} under {root}/*/ (run `python train.py +exp=demo` first)")
    return runs[-1].parent


def check(summary: dict, floors: dict[str, float] = FLOORS) -> list[str]:
    """The failed checks of a demo summary (empty when it passes), each a sentence with the measured figure."""
    failures: list[str] = []
    scores = summary.get("scores", {})
    for name in ("two-stage", "single-stage", "null"):
        if name not in scores:
            failures.append(f"no {name} score in the summary (the step did not run or wrote no submission)")
    if failures:
        return failures
    two, single, null = scores["two-stage"], scores["single-stage"], scores["null"]

    def need(value: float, floor: float, what: str) -> None:
        if not value >= floor:  # `not >=` also catches NaN
            failures.append(f"{what} {value:.4f} < floor {floor:.4f}")

    need(two["score"], floors["two_stage_score"], "two-stage score")
    need(two["giou"], floors["two_stage_giou"], "two-stage GIoU (detector box term)")
    need(two["f1"], floors["two_stage_f1"], "two-stage macro-F1 (classifiers)")
    need(two["score"] - single["score"], floors["margin_over_single_stage"], "two-stage minus single-stage score")
    need(two["score"] - null["score"], floors["margin_over_null"], "two-stage minus null score")

    ss = summary.get("single_stage") or {}
    budget = ss.get("budget") or {}
    if budget.get("clock") != "cpu":
        failures.append(f"single-stage budget clock is {budget.get('clock')!r}, not 'cpu' (a CPU run matches CPU time)")
    cpu = summary.get("stage_cpu_seconds", {})
    trained = sum(v for k, v in cpu.items() if k == "detector" or k.startswith("classifier "))
    got = ss.get("train_cpu_seconds")
    if not trained or got is None:
        failures.append("no CPU seconds recorded for the two-stage training or the single-stage baseline")
    elif abs(got / trained - 1.0) > BUDGET_TOLERANCE:
        failures.append(
            f"single-stage trained {got:.0f} CPU s against the two-stage's {trained:.0f} CPU s "
            f"(more than {BUDGET_TOLERANCE:.0%} apart: the budgets do not match)"
        )
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check_demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, default=None, help="demo run folder (default: the newest)")
    parser.add_argument("--root", type=Path, default=Path("outputs/demo"), help="where to look for the newest run")
    args = parser.parse_args(argv)
    run_dir = args.run_dir if args.run_dir is not None else newest_run(args.root)
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        print(f"check_demo: {path}: no such file (did the demo finish?)", file=sys.stderr)
        return 2
    summary = json.loads(path.read_text())
    scores = summary.get("scores", {})
    print(f"check_demo: {run_dir}")
    for name, s in scores.items():
        print(f"  {name:13s} score {s['score']:.4f}  giou {s['giou']:.4f}  macro-F1 {s['f1']:.4f}")
    failures = check(summary)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if failures:
        return 1
    print(f"check_demo: all {len(FLOORS) + 2} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
