"""The detector stage end to end (train(cfg) on det_smoke), the OOF boxes table and the known-count box term."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from cytologia.config import check_config
from cytologia.detection.oof import (
    OOF_COLUMNS,
    known_count_giou,
    known_count_matches,
    read_boxes,
    write_boxes,
)
from cytologia.detection.stage import check_detector_config, run
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.metrics import score

from .conftest import compose_config


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.ultralytics
def test_stage_writes_weights_oof_boxes_and_metrics(smoke_run) -> None:
    run_dir = smoke_run.run_dir
    assert smoke_run.result["trained"] is True and smoke_run.result["folds"] == [0]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "provenance.json").is_file()
    assert OmegaConf.load(run_dir / "config.yaml").stage == "detector"
    assert smoke_run.checkpoint.is_file()

    folds = pd.read_csv(run_dir / "folds.csv")
    held = set(folds.loc[folds["fold"] == 0, "NAME"])
    oof = read_boxes(run_dir / "oof_boxes.csv")
    assert tuple(oof.columns) == OOF_COLUMNS
    assert set(oof["NAME"]) <= held and (oof["fold"] == 0).all()
    assert set(oof["model"]) == {"yolo11n_128", "yolo11n_128+hflip"}  # plain and mirrored pass (tta_flip default)
    per_fold = read_boxes(run_dir / "fold_0" / "oof_boxes.csv")
    pd.testing.assert_frame_equal(per_fold, oof)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    fold0 = metrics["per_fold"]["0"]
    assert fold0["best_epoch"] == 1 and fold0["epochs_run"] == 1
    assert fold0["n_val_images"] == len(held)
    # the box term written is the one recomputed from the written boxes and the training labels
    from cytologia.data.io import read_annotations

    table, _ = read_annotations(smoke_run.data_dir / "train.csv", smoke_run.data_dir / "images", lenient=True)
    truth = table[table["NAME"].isin(held)]
    for model, value in metrics["oof_known_count_giou"].items():
        assert value == pytest.approx(known_count_giou(oof[oof["model"] == model], truth), abs=1e-5)
        assert 0.0 <= value <= 1.0
    # the selection metric of the validator and the stage's own prediction agree closely (same weights; letterbox
    # differs: the validator batches rectangles, prediction uses squares)
    selected = fold0["selection_metric_per_epoch"][fold0["best_epoch"] - 1]
    assert selected == pytest.approx(metrics["oof_known_count_giou"]["yolo11n_128"], abs=0.05)
    assert fold0["train_seconds_per_epoch_per_100_images"] > 0


@pytest.mark.ultralytics
def test_misspelt_model_fails_before_any_work(tmp_path) -> None:
    cfg = check_config(compose_config("+exp=det_smoke", "detector.model=yolo11q", f"paths.data_dir={tmp_path}"))
    with pytest.raises(CytologiaInputError, match="yolo11n"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "synthetic").exists()  # no data generated


@pytest.mark.parametrize(
    ("override", "key"),
    [("detector.img_size=100", "img_size"), ("detector.conf=1.5", "conf"), ("detector.epochs=0", "epochs")],
)
def test_detector_ranges_are_checked(override: str, key: str) -> None:
    cfg = check_config(compose_config("+exp=det_smoke", override))
    with pytest.raises(CytologiaInputError, match=f"detector.{key}"):
        check_detector_config(cfg.detector)


@pytest.mark.ultralytics
def test_real_data_config_without_data_is_a_clear_error(tmp_path) -> None:
    cfg = check_config(compose_config("+exp=det_yolo11s_512", f"paths.data_dir={tmp_path}"))
    with pytest.raises(CytologiaInputError, match="train.csv"):
        run(cfg, tmp_path / "run")


# ------------------------------------------------------------------------------------------------- boxes table
def _boxes(**cols) -> pd.DataFrame:
    base = {"NAME": ["a.jpg"], "x1": [1.0], "y1": [2.0], "x2": [3.0], "y2": [4.0], "score": [0.5], "model": ["m"]}
    base.update(cols)
    return pd.DataFrame({**base, "fold": base.get("fold", [0])})


def test_boxes_table_round_trip(tmp_path) -> None:
    table = pd.concat([_boxes(), _boxes(NAME=["b.jpg"], x1=[0.12345678], fold=[3])], ignore_index=True)
    path = write_boxes(table, tmp_path / "oof_boxes.csv")
    back = read_boxes(path)
    assert back["fold"].tolist() == [0, 3] and back["x1"].iloc[1] == pytest.approx(0.123, abs=1e-9)
    assert back["NAME"].tolist() == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"x2": [0.5]}, "inverted box"),
        ({"score": ["high"]}, "non-numeric"),
        ({"NAME": [""]}, "NAME is empty"),
        ({"fold": [1.5]}, "fold is not an integer"),
    ],
)
def test_bad_boxes_name_the_file_and_row(tmp_path, bad: dict, message: str) -> None:
    path = tmp_path / "boxes.csv"
    pd.concat([_boxes(), _boxes(**bad)], ignore_index=True).to_csv(path, index=False)
    with pytest.raises(ValidationError, match=message) as err:
        read_boxes(path)
    assert str(path) in str(err.value) and "row 2" in str(err.value)


def test_missing_column_is_named(tmp_path) -> None:
    path = tmp_path / "boxes.csv"
    _boxes().drop(columns="score").to_csv(path, index=False)
    with pytest.raises(ValidationError, match="missing column"):
        read_boxes(path)


# --------------------------------------------------------------------------------------------- known-count rule
def test_known_count_keeps_top_n_by_score() -> None:
    truth = pd.DataFrame({"NAME": ["a"], "x1": [10.0], "y1": [10.0], "x2": [50.0], "y2": [50.0]})
    perfect_but_low = {"x1": 10.0, "y1": 10.0, "x2": 50.0, "y2": 50.0, "score": 0.2}
    off_but_high = {"x1": 30.0, "y1": 10.0, "x2": 70.0, "y2": 50.0, "score": 0.9}
    boxes = pd.DataFrame([{"NAME": "a", **perfect_but_low}, {"NAME": "a", **off_but_high}])
    # N = 1: only the highest score counts; IoU 20*40/(2*1600-800) = 1/3, enclosing box = union -> GIoU 1/3
    assert known_count_giou(boxes, truth) == pytest.approx((1 / 3 + 1) / 2)
    assert known_count_giou(boxes.iloc[[0]], truth) == pytest.approx(1.0)


def test_known_count_pads_with_the_full_image() -> None:
    truth = pd.DataFrame(
        {
            "NAME": ["a", "a"],
            "x1": [0.0, 60.0],
            "y1": [0.0, 60.0],
            "x2": [40.0, 100.0],
            "y2": [40.0, 100.0],
            "img_w": [100, 100],
            "img_h": [100, 100],
        }
    )
    boxes = pd.DataFrame({"NAME": ["a"], "x1": [0.0], "y1": [0.0], "x2": [40.0], "y2": [40.0], "score": [0.9]})
    m = known_count_matches(boxes, truth)
    assert m["padded"].all()
    # the first truth box matches its prediction; the second takes the full image (IoU 0.16 > GIoU with the first)
    assert m["giou"].tolist() == pytest.approx([1.0, 0.16])
    with pytest.raises(CytologiaInputError, match="image size"):
        known_count_matches(boxes, truth.drop(columns=["img_w", "img_h"]))


def test_known_count_equals_the_challenge_score_of_the_submission_it_implies() -> None:
    rng = np.random.default_rng(0)
    rows, preds = [], []
    for i in range(40):
        name, n = f"img{i}.jpg", int(rng.integers(1, 4))
        for _ in range(n):
            x, y = rng.uniform(0, 200, 2)
            rows.append((name, x, y, x + rng.uniform(20, 80), y + rng.uniform(20, 80), 300, 300))
        for _ in range(int(rng.integers(0, 6))):  # 0..5 raw boxes: some images need padding
            x, y = rng.uniform(0, 200, 2)
            preds.append((name, x, y, x + rng.uniform(20, 80), y + rng.uniform(20, 80), rng.uniform()))
    truth = pd.DataFrame(rows, columns=["NAME", "x1", "y1", "x2", "y2", "img_w", "img_h"])
    boxes = pd.DataFrame(preds, columns=["NAME", "x1", "y1", "x2", "y2", "score"])
    ours = known_count_giou(boxes, truth)

    # the submission the rule implies: per image its top-N boxes, then full-image pads, one per trustii_id
    truth = truth.assign(trustii_id=np.arange(len(truth)), **{"class": "LY"})
    sub = []
    for name, t in truth.groupby("NAME", sort=False):
        b = boxes[boxes["NAME"] == name].sort_values("score", ascending=False, kind="mergesort").head(len(t))
        kept = b[["x1", "y1", "x2", "y2"]].values.tolist() + [[0, 0, 300, 300]] * (len(t) - len(b))
        sub += [(tid, name, *box, "LY") for tid, box in zip(t["trustii_id"], kept)]
    sub = pd.DataFrame(sub, columns=["trustii_id", "NAME", "x1", "y1", "x2", "y2", "class"])
    reference = score(truth[["trustii_id", "NAME", "x1", "y1", "x2", "y2", "class"]], sub).giou
    assert ours == pytest.approx(reference, abs=1e-12)


@pytest.mark.ultralytics
def test_missing_init_weights_fail_before_any_work(tmp_path) -> None:
    cfg = check_config(
        compose_config(
            "+exp=det_smoke",
            "detector.weights=absent.pt",
            f"paths.data_dir={tmp_path}",
            f"paths.models_dir={tmp_path / 'models'}",
        )
    )
    with pytest.raises(CytologiaInputError, match="absent.pt"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "synthetic").exists()
