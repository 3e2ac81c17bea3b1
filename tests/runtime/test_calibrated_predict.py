"""`cytologia predict` writes the per-box calibrated output next to the submission, which it leaves unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia.calibration import CAL_PROB_COLUMNS, calibrated_path, read_calibrated, with_trustii_ids
from cytologia.ensemble import CalibrationSpec, RejectSpec
from cytologia.errors import CytologiaInputError
from cytologia.predict import predict_folder
from cytologia.runtime.inference import submission_table


def test_predict_writes_calibrated_boxes_beside_an_unchanged_submission(yolox_tiny, tmp_path: Path) -> None:
    ens = yolox_tiny.ensemble()
    plain = predict_folder(yolox_tiny.data, ens, tmp_path / "plain.csv")
    assert "no calibration" in "\n".join(plain.lines)
    ens.calibration = CalibrationSpec(temperature=2.5, reject=RejectSpec("margin", 0.05, 0.02), fitted=True)
    pred = predict_folder(yolox_tiny.data, ens, tmp_path / "sub.csv")
    sub = pd.read_csv(tmp_path / "sub.csv")
    pd.testing.assert_frame_equal(sub, pd.read_csv(tmp_path / "plain.csv"))  # calibration never changes it
    cal = read_calibrated(calibrated_path(tmp_path / "sub.csv"))
    assert calibrated_path(tmp_path / "sub.csv").name == "sub_calibrated.csv"
    assert sorted(cal["trustii_id"]) == sorted(sub["trustii_id"])  # every box once
    joined = sub.merge(cal, on="trustii_id", suffixes=("", "_cal"))
    assert (joined["class"] == joined["class_cal"]).all() and (joined["NAME"] == joined["NAME_cal"]).all()
    for c in ("x1", "y1", "x2", "y2"):
        np.testing.assert_allclose(joined[c], joined[f"{c}_cal"], atol=0.01)
    p = cal[list(CAL_PROB_COLUMNS)].to_numpy()
    assert (np.asarray(CAL_PROB_COLUMNS)[p.argmax(axis=1)] == "pcal_" + cal["class"]).all()
    assert (cal["refer"] == (cal["refer_reason"] != "")).all()
    assert any("calibrated: temperature 2.500" in line for line in pred.lines)


def test_trustii_ids_follow_the_submission_rule() -> None:
    rng = np.random.default_rng(0)
    names = np.repeat([f"im{i}.jpg" for i in range(30)], rng.integers(1, 4, 30))
    boxes = pd.DataFrame({"NAME": names, "score": rng.random(len(names)).round(1)})  # ties included
    boxes[["x1", "y1", "x2", "y2"]] = rng.random((len(names), 4)) * 100
    boxes["class"] = rng.choice(["B", "LY", "PNN"], len(names))
    boxes["known_count"] = True
    test = pd.DataFrame({"trustii_id": rng.permutation(len(names)) + 1, "NAME": rng.permutation(names)})
    ours = with_trustii_ids(boxes, test).set_index("trustii_id")
    theirs = submission_table(boxes, test).set_index("trustii_id")
    assert len(ours) == len(boxes) and ours.index.is_unique
    pd.testing.assert_frame_equal(ours.loc[theirs.index, ["NAME", "x1", "class"]], theirs[["NAME", "x1", "class"]])
    with pytest.raises(CytologiaInputError, match="not as many boxes as trustii_ids"):
        with_trustii_ids(boxes.iloc[1:], test)
    stray = pd.concat([boxes, boxes.iloc[:1].assign(NAME="not_in_test.jpg")], ignore_index=True)
    with pytest.raises(CytologiaInputError, match="not_in_test.jpg"):  # a box on an image without ids is no id's
        with_trustii_ids(stray, test)
