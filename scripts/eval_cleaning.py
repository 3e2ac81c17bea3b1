"""Measure noisy-box cleaning against the synthetic generator's noise.csv: precision and recall per flag and kind.

    python scripts/eval_cleaning.py --data DIR [--boxes OOF.csv] [--config configs/cleaning/default.yaml]
    python scripts/eval_cleaning.py --data /tmp/synth_clean --generate 1500   # make the set first (raised rates)

``DIR`` is a generated set (``cytologia synth`` or ``--generate``): train.csv, images/, noise.csv.

- With ``--boxes`` the flags come from a real out-of-fold boxes table (``NAME,x1,y1,x2,y2,score,model[,fold]``,
  e.g. the detector stage's ``oof_boxes.csv``).
- Without it, a *simulated detector* stands in: it sees the clean truth (train.csv with the defects of noise.csv
  undone, :func:`cytologia.detection.cleaning.clean_truth`, so it also finds the unannotated border cells and not the
  boxed red cells) and adds what a trained detector does wrong -- localisation noise (Gaussian, ``--sim-sigma`` of
  the box size per corner), missed cells, weak detections on the boxed red cells, stray false positives, leftover
  duplicate boxes -- with ``--sim-models`` TTA variants (fused by the cleaning as the real OOF table would be).

Prints the table of :func:`cytologia.detection.cleaning.evaluate_cleaning` and the counts; ``--out DIR`` also
writes cleaning_eval.csv, cleaning_report.csv and cleaning_eval.json there. Goal (issue #4): precision >= 0.9 and
recall >= 0.8 per flag on its defect kinds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia.data.io import read_annotations
from cytologia.detection.cleaning import CleaningConfig, clean_annotations, clean_truth, evaluate_cleaning
from cytologia.detection.oof import read_boxes

log = logging.getLogger("eval_cleaning")


@dataclass(frozen=True)
class SimDetector:
    """What the simulated detector gets wrong. Defaults: a decent single-class detector (mean IoU ~0.9 with the
    truth, 3 % of cells missed, weak responses on a third of boxed red cells, ~0.1 stray box per image)."""

    sigma: float = 0.03  # corner noise, share of the box width / height (one sd)
    miss: float = 0.03  # probability a cell is not detected at all
    miss_border: float = 0.10  # ... for a cell cut by the image border
    red_cell: float = 0.3  # probability of a (weak) detection on a boxed red cell
    stray: float = 0.1  # stray false positives per image (Poisson mean)
    duplicate: float = 0.02  # probability of a leftover second box on a found cell
    models: int = 2  # TTA variants (independent localisation noise, same misses)


def simulate_detections(
    truth: pd.DataFrame, red_cells: pd.DataFrame, sizes: pd.DataFrame, sim: SimDetector, seed: int
) -> pd.DataFrame:
    """A boxes table (``NAME,x1..y2,score,model,fold``) from the clean truth; see :class:`SimDetector`."""
    rng = np.random.default_rng(seed)
    size = sizes.set_index("NAME")[["img_w", "img_h"]].astype(float)
    rows: list[tuple] = []
    xyxy = truth[["x1", "y1", "x2", "y2"]].to_numpy(float)
    wh = size.reindex(truth["NAME"]).to_numpy()
    cut = (xyxy[:, 0] <= 0) | (xyxy[:, 1] <= 0) | (xyxy[:, 2] >= wh[:, 0]) | (xyxy[:, 3] >= wh[:, 1])
    found = rng.random(len(truth)) >= np.where(cut, sim.miss_border, sim.miss)
    score = np.where(cut, rng.beta(6, 3, len(truth)), rng.beta(8, 2, len(truth)))
    dup = rng.random(len(truth)) < sim.duplicate
    red_hit = rng.random(len(red_cells)) < sim.red_cell
    red_score = rng.beta(2, 8, len(red_cells))
    names = pd.unique(sizes["NAME"])
    n_stray = rng.poisson(sim.stray, len(names))
    for m in range(sim.models):
        model = f"sim+tta{m}"
        for i in np.flatnonzero(found):
            b = xyxy[i]
            w, h = b[2] - b[0], b[3] - b[1]
            noisy = b + rng.normal(0, sim.sigma, 4) * np.array([w, h, w, h])
            rows.append((truth["NAME"].iat[i], *noisy, score[i] * rng.uniform(0.95, 1.0), model))
            if dup[i]:
                rows.append(
                    (
                        truth["NAME"].iat[i],
                        *(b + rng.normal(0, 3 * sim.sigma, 4) * np.array([w, h, w, h])),
                        0.5 * score[i],
                        model,
                    )
                )
        for j in np.flatnonzero(red_hit):
            b = red_cells[["x1", "y1", "x2", "y2"]].to_numpy(float)[j]
            rows.append((red_cells["NAME"].iat[j], *b, red_score[j], model))
        for name, k in zip(names, n_stray):
            w_img, h_img = size.loc[name]
            for _ in range(int(k)):
                side = rng.uniform(0.15, 0.35) * min(w_img, h_img)
                x, y = rng.uniform(0, w_img - side), rng.uniform(0, h_img - side)
                rows.append((name, x, y, x + side, y + side, rng.beta(1.5, 8), model))
    out = pd.DataFrame(rows, columns=["NAME", "x1", "y1", "x2", "y2", "score", "model"])
    lim = size.reindex(out["NAME"]).to_numpy()
    out[["x1", "x2"]] = np.clip(out[["x1", "x2"]].to_numpy(), 0, lim[:, [0]])
    out[["y1", "y2"]] = np.clip(out[["y1", "y2"]].to_numpy(), 0, lim[:, [1]])
    out["fold"] = 0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="generated data folder (train.csv, images/, noise.csv)")
    p.add_argument("--boxes", type=Path, default=None, help="real out-of-fold boxes table (default: simulated)")
    p.add_argument("--config", type=Path, default=None, help="cleaning config YAML (default: CleaningConfig())")
    p.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="first generate N images into --data with raised defect rates (overwrites)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for the evaluation tables")
    for f in SimDetector.__dataclass_fields__.values():
        p.add_argument(
            f"--sim-{f.name.replace('_', '-')}",
            type=type(f.default),
            default=f.default,
            help=f"simulated detector: {f.name} (default {f.default})",
        )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.generate:
        from cytologia.data.synthetic.defects import DefectRates
        from cytologia.data.synthetic.generate import SynthConfig, generate

        # Rates raised from the defaults (jitter 3 %, red cell 0.5 %, unannotated 1 %) so that a set of a thousand
        # images holds a few dozen of each defect.
        rates = DefectRates(box_jitter=0.05, past_border=0.02, red_cell=0.04, unannotated_border=0.04)
        generate(
            args.data,
            n_images=args.generate,
            seed=args.seed,
            config=SynthConfig(defects=rates),
            workers=2,
            overwrite=True,
        )
    for name in ("train.csv", "noise.csv"):
        if not (args.data / name).is_file():
            print(f"error: {args.data / name}: no such file", file=sys.stderr)
            return 2
    cfg = CleaningConfig.from_yaml(args.config) if args.config else CleaningConfig()
    ann, _ = read_annotations(args.data / "train.csv", args.data / "images", lenient=True)
    noise = pd.read_csv(args.data / "noise.csv", dtype={"NAME": str}, keep_default_na=False)
    sizes = ann[["NAME", "img_w", "img_h"]].drop_duplicates("NAME")
    if args.boxes is not None:
        boxes = read_boxes(args.boxes, require_fold=False)
        mode = f"real OOF boxes {args.boxes}"
    else:
        sim = SimDetector(**{f: getattr(args, f"sim_{f}") for f in SimDetector.__dataclass_fields__})
        truth, red = clean_truth(ann, noise)
        boxes = simulate_detections(truth, red, sizes, sim, args.seed)
        mode = f"simulated detector {sim}"
    t0 = time.perf_counter()
    result = clean_annotations(ann, boxes, cfg)
    seconds = time.perf_counter() - t0
    table = evaluate_cleaning(result.report, noise)
    print(f"{args.data}: {mode}")
    print(f"config: {cfg}")
    print(result.summary() + f" ({seconds:.2f} s)")
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "cleaning_eval.csv", index=False)
        result.report.to_csv(args.out / "cleaning_report.csv", index=False)
        summary = {
            "data": str(args.data),
            "mode": mode,
            "config": cfg.as_dict(),
            "counts": result.counts,
            "eval": table.to_dict(orient="records"),
        }
        (args.out / "cleaning_eval.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
