"""Calibration, refer-to-expert and differential counts measured against known truth (issue 17's four figures).

    python scripts/eval_calibration.py [--out outputs/eval_calibration] [--seeds 0,1] [--smears 600] [--cells 200]

A benchmark (minutes of CPU), not a test. Two parts, written to ``<out>/eval_calibration.json`` and ``.md``:

**A. Trained classifiers on a generated set** (images): the small classifiers of ``scripts/oof_optimism.py``
(resnet10t + mobilenetv3_small_100 at 64 px, 2 folds, ``trainer.select=last``; its run folders under
``--optimism-out`` are reused, trained when absent), tuned with ``cytologia tune`` on their out-of-fold logits -- which
now fits the temperatures and the refer threshold -- then the test set's truth boxes classified by the fold models
the ensemble file names, blended as prediction blends: ECE before / after temperature scaling on the **test** boxes,
the error rate at 90 % coverage, and the refer rule's coverage and error on the test boxes against its target.

**B. Simulated smears** (no images, :mod:`cytologia.counts_sim`): a classifier whose logits are 2.5x too sharp
(overconfident) on a Gaussian cell model; its temperature fitted on a simulated out-of-fold set with the training
mix (real Cytologia class shares), ECE measured on a fresh set; then ``--smears`` smears of ``--cells`` cells in four
profiles (normal, blast-rich, lymphoma-rich, borderline blasts around 5 %): the coverage of the 95 % intervals of
``cytologia count`` (calibrated probabilities + the OOF class shares as prior) over the true class shares, with and
without the prior shift, and the blast flag's (blasts > 5 %) sensitivity and specificity against the true share.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
log = logging.getLogger("eval_calibration")
OVERCONFIDENCE = 2.5  # part B: the simulated classifier's logits are this many times too sharp
SCREENING = 0.2  # part B: flag also at P(blasts > 5 %) >= 0.2, a screening setting (more sensitive)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "eval_calibration")
    p.add_argument("--optimism-out", type=Path, default=ROOT / "outputs" / "oof_optimism", help="trained runs")
    p.add_argument("--seeds", default="0,1", help="training seeds of part A (comma-separated; '' skips part A)")
    p.add_argument("--target-error", type=float, default=0.02)
    p.add_argument("--smears", type=int, default=600, help="simulated smears (part B)")
    p.add_argument("--cells", type=int, default=200, help="cells per simulated smear")
    p.add_argument("--separation", type=float, default=3.0, help="class separation of the simulated classifier")
    p.add_argument("--draws", type=int, default=1000, help="posterior draws per smear")
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


# ------------------------------------------------------------------------------------------------------ part A
def part_a(args: argparse.Namespace) -> dict[str, Any]:
    import oof_optimism as oo
    from cytologia.calibration import (
        apply_temperature,
        error_at_coverage,
        expected_calibration_error,
        kept_error,
        reject_scores,
    )
    from cytologia.data.schema import CLASSES
    from cytologia.ensemble import blend_probabilities
    from cytologia.ensemble.runs import tune_ensemble

    oo_args = oo.parse_args(["--out", str(args.optimism_out), "--seeds", ",".join(map(str, args.seeds))])
    oo_args.out = oo_args.out.resolve()
    root = oo.make_data(oo_args)
    test = pd.read_csv(root / "test_labels.csv", dtype={"NAME": str}, keep_default_na=False)
    test = test.rename(columns={"trustii_id": "box_id"})[["NAME", "box_id", "x1", "y1", "x2", "y2", "class"]]
    labels = test["class"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(np.int64)
    out: dict[str, Any] = {"data": str(root), "n_test_boxes": len(test), "seeds": {}}
    for seed in args.seeds:
        runs = [oo.train_member(oo_args, root, name, "last", seed)[0] for name in oo_args.members]
        ens_path = args.out / f"ensemble_seed{seed}.json"
        tuned = tune_ensemble(runs, root / "train.csv", ens_path, target_error=args.target_error, heldout=False)
        ens = tuned.ensemble
        stack, weights = [], []
        for m in ens.cell_members:
            spec = {"checkpoints": m.checkpoints, "img_size": m.img_size, "margin": m.margin}
            stack.append(oo.predict_test(spec, ens_path.parent, root, test).mean(axis=0)[:, :23])
            weights.append(m.weight)
        bias = None if ens.blend.class_bias is None else np.asarray(ens.blend.class_bias)
        p = blend_probabilities(np.stack(stack), np.asarray(weights) / np.sum(weights), bias)
        cal = apply_temperature(p, ens.calibration.temperature)
        pred = p.argmax(axis=1)
        correct = pred == labels
        rule = ens.calibration.reject
        assert rule is not None
        scores = reject_scores(cal, pred=pred)
        coverage, error = kept_error(scores[rule.score], correct, rule.threshold)
        c = tuned.report["calibration"]
        out["seeds"][str(seed)] = {
            "temperature": ens.calibration.temperature,
            "test_accuracy": float(correct.mean()),
            "test_ece_before": expected_calibration_error(p, labels),
            "test_ece_after": expected_calibration_error(cal, labels),
            "oof_ece_before": c["ece_before"],
            "oof_ece_after_crossfitted": c["ece_after_heldout"],
            "test_error_at_90_coverage": {k: error_at_coverage(v, correct, 0.9) for k, v in scores.items()},
            "rule": {"score": rule.score, "threshold": rule.threshold, "target_error": rule.target_error},
            "rule_test_coverage": coverage,
            "rule_test_error": error,
            "oof_scores": c["reject"]["scores"],
            "oof_note": c["reject"]["note"],
        }
        log.info("part A seed %d: %s", seed, {k: v for k, v in out["seeds"][str(seed)].items() if "oof_s" not in k})
    return out


# ------------------------------------------------------------------------------------------------------ part B
def part_b(args: argparse.Namespace) -> dict[str, Any]:
    from cytologia.calibration import (
        error_at_coverage,
        expected_calibration_error,
        fit_temperature,
        fit_threshold,
        kept_error,
        log_probabilities,
        reject_scores,
        scaled_probabilities,
    )
    from cytologia.counts import smear_posterior
    from cytologia.counts_sim import BLASTS, IDX, K, class_means, draw_shares, posterior, simulate_training_set
    from cytologia.data.schema import CLASSES
    from cytologia.data.synthetic.stats import load_real_stats

    rng = np.random.default_rng(args.seed)
    train_prior = np.array([load_real_stats().class_freq[c] for c in CLASSES])

    def overconfident(probs: np.ndarray) -> np.ndarray:
        return scaled_probabilities(log_probabilities(probs), 1.0 / OVERCONFIDENCE)

    # calibration: temperature and threshold from a simulated OOF set, measured on a fresh set (same mix)
    oof_y, oof_p = simulate_training_set(rng, 5000, train_prior, args.separation)
    test_y, test_p = simulate_training_set(rng, 5000, train_prior, args.separation)
    oof_raw, test_raw = overconfident(oof_p), overconfident(test_p)
    t = fit_temperature(log_probabilities(oof_raw), oof_y)
    oof_cal = scaled_probabilities(log_probabilities(oof_raw), t)
    test_cal = scaled_probabilities(log_probabilities(test_raw), t)
    ok_oof, ok_test = oof_cal.argmax(1) == oof_y, test_cal.argmax(1) == test_y
    thr = fit_threshold(reject_scores(oof_cal)["confidence"], ok_oof, args.target_error)
    cov, err = kept_error(reject_scores(test_cal)["confidence"], ok_test, thr)
    calibration = {
        "overconfidence": OVERCONFIDENCE,
        "fitted_temperature": t,
        "accuracy": float(ok_test.mean()),
        "ece_before": expected_calibration_error(test_raw, test_y),
        "ece_after": expected_calibration_error(test_cal, test_y),
        "error_at_90_coverage": error_at_coverage(reject_scores(test_cal)["confidence"], ok_test, 0.9),
        "rule_threshold": thr,
        "rule_test_coverage": cov,
        "rule_test_error": err,
        "target_error": args.target_error,
    }
    log.info("part B calibration: %s", calibration)
    oof_prior = (np.bincount(oof_y, minlength=K) + 0.5) / (len(oof_y) + 0.5 * K)  # what cytologia tune stores

    # smears
    mu = class_means(args.separation)
    blasts = [IDX[c] for c in BLASTS]
    profiles = ("normal", "blasts", "lymphoma", "borderline")
    rows = []
    start = time.perf_counter()
    for s in range(args.smears):
        profile = profiles[s % len(profiles)]
        shares = draw_shares(rng, profile)
        y = rng.choice(K, size=args.cells, p=shares)
        x = mu[y] + rng.normal(size=(args.cells, K))
        probs = scaled_probabilities(log_probabilities(overconfident(posterior(x, mu, train_prior))), t)
        realised = np.bincount(y, minlength=K) / args.cells
        for shift in (True, False):
            if not shift and (s // len(profiles)) % 2:  # the naive method on every other round of the profiles
                continue
            draws, _ = smear_posterior(probs, oof_prior if shift else None, draws=args.draws, seed=s)
            lo, hi = np.quantile(draws, [0.025, 0.975], axis=0)
            group = draws[:, blasts].sum(axis=1)
            true_group = shares[blasts].sum()
            rows.append(
                {
                    "smear": s,
                    "profile": profile,
                    "prior_shift": shift,
                    "covered_classes": float(((shares >= lo) & (shares <= hi)).mean()),
                    # the counted cells' own share, over the classes present (an absent class's share is 0, below
                    # any quantile of a continuous posterior)
                    "covered_realised": float(((realised >= lo) & (realised <= hi))[realised > 0].mean()),
                    "covered_blast_group": bool(np.quantile(group, 0.025) <= true_group <= np.quantile(group, 0.975)),
                    "true_blast": float(true_group),
                    "flag_prob": float((group > 0.05).mean()),
                }
            )
        if s % 100 == 99:
            log.info("%d smears, %.0f s", s + 1, time.perf_counter() - start)
    t_rows = pd.DataFrame(rows)
    smears: dict[str, Any] = {"n_smears": args.smears, "cells_per_smear": args.cells, "draws": args.draws}
    for shift, part in t_rows.groupby("prior_shift"):
        key = "with_prior_shift" if shift else "without_prior_shift"
        positive = part["true_blast"] > 0.05
        flagged = part["flag_prob"] >= 0.5
        border = part["profile"] == "borderline"
        screen = part["flag_prob"] >= SCREENING  # a screening setting of --flag-probability
        smears[key] = {
            "screening_flag_probability": SCREENING,
            "screening_sensitivity": float((screen & positive).sum() / max(positive.sum(), 1)),
            "screening_specificity": float((~screen & ~positive).sum() / max((~positive).sum(), 1)),
            "n_smears": int(len(part)),
            "coverage_per_class": float(part["covered_classes"].mean()),
            "coverage_per_class_by_profile": part.groupby("profile")["covered_classes"].mean().round(4).to_dict(),
            "coverage_realised_fraction": float(part["covered_realised"].mean()),
            "coverage_blast_group": float(part["covered_blast_group"].mean()),
            "blast_flag_sensitivity": float((flagged & positive).sum() / max(positive.sum(), 1)),
            "blast_flag_specificity": float((~flagged & ~positive).sum() / max((~positive).sum(), 1)),
            "borderline_sensitivity": float((flagged & positive & border).sum() / max((positive & border).sum(), 1)),
            "borderline_specificity": float((~flagged & ~positive & border).sum() / max((~positive & border).sum(), 1)),
            "n_positive": int(positive.sum()),
            "n_negative": int((~positive).sum()),
        }
    return {"calibration": calibration, "smears": smears, "seconds": round(time.perf_counter() - start, 1)}


# ------------------------------------------------------------------------------------------------------ output
def markdown(res: dict[str, Any]) -> str:
    lines = ["## Calibration, refer-to-expert, differential counts (`scripts/eval_calibration.py`)", ""]
    a = res.get("part_a")
    if a:
        lines += [
            f"A. Trained classifiers (resnet10t + mobilenetv3_small_100, 64 px, 2 folds), generated set {a['data']}, "
            f"{a['n_test_boxes']} test truth boxes; temperature and threshold fitted on OOF by `cytologia tune`.",
            "",
            "| seed | T | test accuracy | ECE test before -> after | ECE OOF before -> after (cross-fitted) | "
            "error at 90 % coverage (confidence) | rule | rule on test: kept, error |",
            "| ---: | ---: | ---: | --- | --- | ---: | --- | --- |",
        ]
        for seed, r in a["seeds"].items():
            lines.append(
                f"| {seed} | {r['temperature']:.2f} | {r['test_accuracy']:.3f} | {r['test_ece_before']:.3f} -> "
                f"{r['test_ece_after']:.3f} | {r['oof_ece_before']:.3f} -> {r['oof_ece_after_crossfitted']:.3f} | "
                f"{r['test_error_at_90_coverage']['confidence']:.3f} | {r['rule']['score']} < "
                f"{r['rule']['threshold']:.3f} (target {r['rule']['target_error']:.0%}) | "
                f"{r['rule_test_coverage']:.1%}, {r['rule_test_error']:.1%} |"
            )
        lines.append("")
        for seed, r in a["seeds"].items():
            aurc = ", ".join(f"{k} {v['aurc']:.3f}" for k, v in r["oof_scores"].items())
            lines.append(f"- seed {seed}, OOF AURC (cross-fitted): {aurc}; {r['oof_note']}")
        lines.append("")
    b = res["part_b"]
    c = b["calibration"]
    lines += [
        f"B. Simulated classifier ({c['overconfidence']}x overconfident logits, accuracy {c['accuracy']:.3f}): "
        f"T fitted {c['fitted_temperature']:.2f}; ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f} on a fresh "
        f"5,000-cell set; error at 90 % coverage {c['error_at_90_coverage']:.3f}; rule for <= "
        f"{c['target_error']:.0%}: keeps {c['rule_test_coverage']:.1%} with {c['rule_test_error']:.2%} errors.",
        "",
        f"Smears: {b['smears']['n_smears']} x {b['smears']['cells_per_smear']} cells, {b['smears']['draws']} draws.",
        "",
        "| method | coverage per class | by profile | coverage of the counted cells' share (classes present) | "
        "blast-group coverage | "
        "blast flag sens / spec | borderline sens / spec | screening flag (P >= 0.2) sens / spec |",
        "| --- | ---: | --- | ---: | ---: | --- | --- | --- |",
    ]
    for key in ("with_prior_shift", "without_prior_shift"):
        s = b["smears"][key]
        prof = ", ".join(f"{k} {v:.3f}" for k, v in s["coverage_per_class_by_profile"].items())
        lines.append(
            f"| {key.replace('_', ' ')} ({s['n_smears']} smears) | {s['coverage_per_class']:.3f} | {prof} | "
            f"{s['coverage_realised_fraction']:.3f} | {s['coverage_blast_group']:.3f} | "
            f"{s['blast_flag_sensitivity']:.3f} / {s['blast_flag_specificity']:.3f} | "
            f"{s['borderline_sensitivity']:.3f} / {s['borderline_specificity']:.3f} | "
            f"{s['screening_sensitivity']:.3f} / {s['screening_specificity']:.3f} |"
        )
    lines += ["", f"Machine: {res['machine']}; wall {res['wall_seconds']} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("lightning", "lightning.pytorch", "cytologia"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    res: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.seeds:
        res["part_a"] = part_a(args)
    res["part_b"] = part_b(args)
    res["wall_seconds"] = round(time.perf_counter() - start, 1)
    res["machine"] = f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"
    (args.out / "eval_calibration.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    text = markdown(res)
    (args.out / "eval_calibration.md").write_text(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
