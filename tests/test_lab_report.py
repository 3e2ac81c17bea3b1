"""The report's calibration and count sections: pictures written, the test-set figures measured on the truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia.calibration import CAL_PROB_COLUMNS, fit_calibration
from cytologia.classification.oof import make_oof_table
from cytologia.counts import count_cells
from cytologia.data.schema import CLASSES
from cytologia.data.synthetic.generate import SynthConfig, generate
from cytologia.ensemble.tune import prepare_tuning, tune
from cytologia.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _calibration_report() -> dict:
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(len(CLASSES), size=n)
    names = np.array([f"img_{i:04d}.jpg" for i in range(n)])
    logits = 3.0 * (rng.normal(0, 1, (n, len(CLASSES))) + 2.0 * np.eye(len(CLASSES))[y])
    fold = rng.integers(2, size=n)
    oof = pd.concat(
        [make_oof_table(names[fold == k], np.arange(n)[fold == k], k, "A", logits[fold == k]) for k in (0, 1)]
    )
    truth = pd.DataFrame({"NAME": names, "box_id": np.arange(n), "class": [CLASSES[c] for c in y]})
    truth[["x1", "y1", "x2", "y2"]] = [1.0, 1.0, 9.0, 9.0]
    data = prepare_tuning(oof, truth, ["A"])
    return fit_calibration(data, tune(data, heldout=False).params)[1]


def test_report_shows_reliability_risk_coverage_and_counts(tmp_path: Path) -> None:
    generate(tmp_path / "data", 40, seed=2, config=SynthConfig(size=96, test_fraction=0.9))
    truth = pd.read_csv(tmp_path / "data" / "test_labels.csv", dtype={"NAME": str}, keep_default_na=False)
    rng = np.random.default_rng(1)
    pred = truth.copy()
    wrong = (rng.random(len(pred)) < 0.3) & (pred["class"] != "PNN").to_numpy()
    pred.loc[wrong, "class"] = "PNN"
    cal = pred[["trustii_id", "NAME", "class"]].copy()
    top = np.where(wrong, 0.55, 0.95)  # the wrong cells are the unsure ones
    probs = np.tile(((1 - top) / (len(CLASSES) - 1))[:, None], (1, len(CLASSES)))
    probs[np.arange(len(pred)), pred["class"].map(CLASSES.index).to_numpy()] = top
    cal[list(CAL_PROB_COLUMNS)] = probs
    cal["refer"] = top < 0.9
    counts = count_cells(cal, tmp_path / "counts", smears=tmp_path / "data" / "smears.csv", draws=200).result
    assert counts.smears["n_cells"].sum() == len(cal)

    report = _calibration_report()
    out = tmp_path / "report"
    index = write_report(out, truth, pred, calibration=report, calibrated=cal, counts=tmp_path / "counts")
    page = index.read_text()
    for name in ("reliability.png", "risk_coverage.png", "counts/index.html", "counts/counts.csv"):
        assert (out / name).is_file(), name
    assert (out / "reliability.png").read_bytes()[:8] == PNG_MAGIC
    assert "Calibration and referral" in page and "Differential counts per smear" in page
    test = json.loads((out / "calibration_test.json").read_text())
    assert test["n_boxes"] == len(truth) and test["accuracy"] == pytest.approx(1 - wrong.mean())
    # referring the unsure cells keeps only correct ones: the rule's error on the kept cells is 0
    assert test["refer_rule"]["coverage"] == pytest.approx(1 - wrong.mean()) and test["refer_rule"]["error"] == 0.0
