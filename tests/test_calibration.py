"""Temperature scaling, ECE, the refer-to-expert threshold, the calibration in the ensemble file and at prediction."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia.calibration import (
    CAL_PROB_COLUMNS,
    apply_temperature,
    area_under_risk_coverage,
    calibrated_boxes,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    fit_threshold,
    kept_error,
    reliability_table,
    risk_coverage,
    scaled_probabilities,
)
from cytologia.classification.oof import make_oof_table
from cytologia.data.schema import CLASSES
from cytologia.ensemble import (
    N_CLASSES,
    BlendSpec,
    CalibrationSpec,
    Ensemble,
    MemberSpec,
    RejectSpec,
    read_ensemble,
    softmax,
    write_ensemble,
)
from cytologia.ensemble.tune import prepare_tuning, tune
from cytologia.errors import CytologiaInputError


def _overconfident(n: int = 4000, scale: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``scale * z`` whose labels are drawn from ``softmax(z)``: calibrated at temperature ``scale``."""
    rng = np.random.default_rng(seed)
    y_mean = rng.integers(N_CLASSES, size=n)
    z = rng.normal(0, 1.0, (n, N_CLASSES)) + 2.5 * np.eye(N_CLASSES)[y_mean]
    p = softmax(z)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return scale * z, labels


def test_temperature_scaling_lowers_ece_on_an_overconfident_model() -> None:
    logits, labels = _overconfident()
    before = expected_calibration_error(softmax(logits), labels)
    t = fit_temperature(logits, labels)
    after = expected_calibration_error(scaled_probabilities(logits, t), labels)
    assert t == pytest.approx(3.0, rel=0.1)  # the scale the logits were inflated by
    assert before > 0.1 and after < 0.03, (before, after)
    # the same map on probabilities (what prediction applies), and the top class never changes
    p = softmax(logits)
    np.testing.assert_allclose(apply_temperature(p, t), scaled_probabilities(logits, t), atol=1e-9)
    assert (apply_temperature(p, t).argmax(axis=1) == p.argmax(axis=1)).all()
    # an underconfident model gets a temperature below 1
    assert fit_temperature(logits / 9.0, labels) < 0.5


def test_reliability_table_and_ece_by_hand() -> None:
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 0])
    t = reliability_table(probs, labels, n_bins=2)  # bins (0, 0.5], (0.5, 1]
    assert t["n"].tolist() == [0, 4]
    conf, acc = (0.95 + 0.95 + 0.55 + 0.55) / 4, 2 / 4
    assert t["confidence"].iat[1] == pytest.approx(conf) and t["accuracy"].iat[1] == pytest.approx(acc)
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(abs(conf - acc))


def test_threshold_meets_the_target_at_the_largest_coverage() -> None:
    rng = np.random.default_rng(1)
    score = rng.random(2000)
    correct = rng.random(2000) < 0.5 + 0.5 * score  # errors concentrate at low scores
    thr = fit_threshold(score, correct, 0.1)
    coverage, error = kept_error(score, correct, thr)
    assert error <= 0.1 and 0.1 < coverage < 0.9
    lower = np.max(score[score < thr])  # one more box kept breaks the target
    assert kept_error(score, correct, lower)[1] > 0.1
    assert fit_threshold(score, np.zeros(2000, bool), 0.02) > score.max()  # nothing meets it: refer everything
    curve = risk_coverage(score, correct)
    assert curve["coverage"].iat[-1] == 1.0 and curve["risk"].iat[-1] == pytest.approx(1 - correct.mean())
    # a useful score has a lower area under the risk-coverage curve than a random one
    assert area_under_risk_coverage(score, correct) < area_under_risk_coverage(rng.random(2000), correct) - 0.05


def _oof(n_images: int = 800, folds: int = 2, seed: int = 0) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    """Two members: ``A`` calibrated-ish, ``B`` the same signal at 4x the scale (overconfident)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(N_CLASSES, size=n_images)
    names = np.array([f"img_{i:05d}.jpg" for i in range(n_images)])
    fold = rng.integers(folds, size=n_images)
    base = rng.normal(0, 1.0, (n_images, N_CLASSES)) + 2.0 * np.eye(N_CLASSES)[y]
    parts = []
    for model, lg in (("A", base + rng.normal(0, 0.5, base.shape)), ("B", 4.0 * base)):
        for k in range(folds):
            sel = fold == k
            parts.append(make_oof_table(names[sel], np.arange(n_images)[sel], k, model, lg[sel]))
    truth = pd.DataFrame({"NAME": names, "box_id": np.arange(n_images), "class": [CLASSES[c] for c in y]})
    truth[["x1", "y1", "x2", "y2"]] = [10.0, 10.0, 50.0, 50.0]
    return [pd.concat(parts, ignore_index=True)], truth


def test_fit_calibration_on_oof_and_the_ensemble_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    oof, truth = _oof()
    data = prepare_tuning(oof, truth, ["A", "B"])
    result = tune(data, heldout=False)
    spec, report = fit_calibration(data, result.params, target_error=0.05)
    assert spec.fitted and set(spec.member_temperatures) == {"A", "B"}
    assert spec.member_temperatures["B"] > 2.0 * spec.member_temperatures["A"]  # B's 4x scale is undone
    assert report["ece_after_heldout"] < report["ece_before"]
    assert report["ece_bins"] == 15 and len(report["reliability_after"]) == 15
    assert spec.reject is not None and spec.reject.score in ("confidence", "margin")
    assert set(report["reject"]["scores"]) == {"confidence", "margin", "agreement"}
    assert report["reject"]["in_sample_error"] <= 0.05
    assert sum(spec.class_prior) == pytest.approx(1.0)

    ens = Ensemble([MemberSpec("A"), MemberSpec("B")], BlendSpec(), calibration=spec)
    path = write_ensemble(ens, tmp_path / "ensemble.json")
    back = read_ensemble(path)
    assert back.calibration == spec
    # a file from before calibration: temperature 1, no threshold, and the log says so
    data_old = json.loads(path.read_text())
    data_old.pop("calibration")
    (tmp_path / "old.json").write_text(json.dumps(data_old))
    with caplog.at_level(logging.INFO, logger="cytologia.ensemble.schema"):
        old = read_ensemble(tmp_path / "old.json")
    assert old.calibration == CalibrationSpec() and not old.calibration.fitted
    assert "no calibration" in caplog.text
    for bad, message in (
        ({"temperature": 0}, "must be > 0"),
        ({"member_temperatures": {"Z": 1.0}}, "names no member"),
        ({"reject": {"score": "agreement", "threshold": 0.5}}, "reject.score"),
        ({"class_prior": [1.0]}, "class_prior"),
        ({"colour": 1}, "unknown key"),
    ):
        broken = {**data_old, "calibration": bad}
        (tmp_path / "bad.json").write_text(json.dumps(broken))
        with pytest.raises(CytologiaInputError, match=message):
            read_ensemble(tmp_path / "bad.json")


def test_calibrated_boxes_keep_the_class_and_flag_with_a_reason() -> None:
    logits, _ = _overconfident(n=50)
    p = softmax(logits)
    boxes = pd.DataFrame({"NAME": [f"i{k}.jpg" for k in range(50)], "source": ["detector"] * 49 + ["pad:full"]})
    boxes["class"] = np.asarray(CLASSES, dtype=object)[p.argmax(axis=1)]
    for j, c in enumerate(CLASSES):
        boxes[f"p_{c}"] = p[:, j]
    spec = CalibrationSpec(temperature=3.0, reject=RejectSpec("confidence", 0.6, 0.02), fitted=True)
    out = calibrated_boxes(boxes, spec)
    assert len(out) == 50 and (out["class"] == boxes["class"]).all()
    cal = out[list(CAL_PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(cal.sum(axis=1), 1.0, atol=1e-9)
    assert (cal.argmax(axis=1) == p.argmax(axis=1)).all()
    low = out["confidence"] < 0.6
    assert 0 < low.sum() < 50
    assert (out["refer"] == (low | (boxes["source"] == "pad:full"))).all()
    assert out.loc[low, "refer_reason"].str.contains("confidence").all()
    assert "padded box" in out["refer_reason"].iat[-1]
    # no calibration: nothing referred but the pad
    plain = calibrated_boxes(boxes, CalibrationSpec())
    assert plain["refer"].sum() == 1
    np.testing.assert_allclose(plain[list(CAL_PROB_COLUMNS)].to_numpy(), p, atol=1e-9)


def test_prediction_side_calibration_imports_no_optimiser() -> None:
    code = (
        "import sys, cytologia.calibration\n"
        "print([m for m in ('cytologia.ensemble.tune', 'scipy.optimize') if m in sys.modules])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
