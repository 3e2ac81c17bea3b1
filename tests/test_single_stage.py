"""The single-stage baseline: the known-count submission with classes, the 23-class dataset and class-carrying
prediction of the ultralytics backend, and one short training run end to end through `cytologia single-stage`."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("ultralytics", reason="needs the ultralytics extra: pip install 'cytologia[ultralytics]'")

from cytologia.cli import main  # noqa: E402
from cytologia.data.io import read_submission, read_test, validate_submission  # noqa: E402
from cytologia.data.schema import CLASSES  # noqa: E402
from cytologia.data.synthetic.generate import SynthConfig, generate  # noqa: E402
from cytologia.detection.letterbox import letterbox, map_back  # noqa: E402
from cytologia.detection.registry import DetectionData  # noqa: E402
from cytologia.detection.ultralytics_backend import UltralyticsDetector, nms, write_yolo_dataset  # noqa: E402
from cytologia.errors import CytologiaInputError  # noqa: E402
from cytologia.single_stage import SingleStageSettings, known_count_submission, prior_class  # noqa: E402


def _boxes(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["NAME", "x1", "y1", "x2", "y2", "score", "cls"])


def test_known_count_keeps_top_n_with_their_classes_and_pads_with_the_prior_class() -> None:
    test = pd.DataFrame({"trustii_id": [7, 3, 9, 4, 5], "NAME": ["a.jpg", "b.jpg", "a.jpg", "c.jpg", "c.jpg"]})
    boxes = _boxes(
        [
            ("a.jpg", 0, 0, 10, 10, 0.2, 1),  # a: 3 boxes for 2 cells -> the 0.9 and 0.5 ones
            ("a.jpg", 20, 20, 40, 40, 0.9, 5),
            ("a.jpg", 50, 50, 60, 60, 0.5, 22),
            ("c.jpg", 5, 5, 15, 15, 0.3, 0),  # c: 1 box for 2 cells -> one pad; b: nothing -> one pad
            ("z.jpg", 5, 5, 15, 15, 0.3, 0),  # not in the test list: left out
        ]
    )
    sizes = {"a.jpg": (100, 100), "b.jpg": (80, 60), "c.jpg": (50, 50)}
    sub = known_count_submission(boxes, test, sizes, pad_class="PNN")
    assert sub["trustii_id"].tolist() == [7, 3, 9, 4, 5]  # the test list's order, every id once
    validate_submission(sub, test=test, image_sizes=sizes)
    a = sub[sub["NAME"] == "a.jpg"]
    assert a["class"].tolist() == [CLASSES[5], CLASSES[22]]  # highest score takes the first id of the image
    assert a[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[20, 20, 40, 40], [50, 50, 60, 60]]
    b = sub[sub["NAME"] == "b.jpg"].iloc[0]
    assert b["class"] == "PNN"
    side = 0.40 * 60  # single-cell image without a detection: the centred prior box (fusion.PRIOR_REL_SIDE)
    assert [b["x1"], b["y1"], b["x2"], b["y2"]] == pytest.approx(
        [40 - side / 2, 30 - side / 2, 40 + side / 2, 30 + side / 2]
    )
    c = sub[sub["NAME"] == "c.jpg"]
    assert c["class"].tolist() == [CLASSES[0], "PNN"]
    assert c.iloc[1][["x1", "y1", "x2", "y2"]].tolist() == [0, 0, 50, 50]  # partial image: the full-image pad


def test_known_count_refuses_bad_class_indices_and_pad_class() -> None:
    test = pd.DataFrame({"trustii_id": [1], "NAME": ["a.jpg"]})
    sizes = {"a.jpg": (10, 10)}
    with pytest.raises(CytologiaInputError, match="class index"):
        known_count_submission(_boxes([("a.jpg", 0, 0, 5, 5, 0.5, 23)]), test, sizes, "PNN")
    with pytest.raises(CytologiaInputError, match="pad class"):
        known_count_submission(_boxes([]), test, sizes, "leukocyte")


def test_settings_check_their_ranges_and_keys() -> None:
    with pytest.raises(CytologiaInputError, match="img_size"):
        SingleStageSettings(img_size=100)
    with pytest.raises(CytologiaInputError, match="time_min"):
        SingleStageSettings(time_min=0)
    settings = SingleStageSettings.from_mapping({"img_size": 320, "time_min": 6.0, "extra": {"mosaic": 0.5}})
    assert (settings.img_size, settings.time_min, settings.extra) == (320, 6.0, {"mosaic": 0.5})
    with pytest.raises(CytologiaInputError, match="unknown key.*imgsz"):
        SingleStageSettings.from_mapping({"imgsz": 320})


def test_train_args_are_parsed_as_yaml_values_over_the_defaults() -> None:
    from cytologia.commands.single_stage import _train_args

    assert _train_args(["nbs=8", "warmup_epochs=0.5", "flipud=0"]) == {"flipud": 0, "nbs": 8, "warmup_epochs": 0.5}
    with pytest.raises(CytologiaInputError, match="KEY=VALUE"):
        _train_args(["nbs"])


def test_prior_class_is_the_most_frequent_ties_in_class_order() -> None:
    assert prior_class(pd.DataFrame({"class": ["PNN", "LY", "PNN"]})) == "PNN"
    assert prior_class(pd.DataFrame({"class": ["PNN", "B"]})) == "B"  # a tie: B comes first in CLASSES
    with pytest.raises(CytologiaInputError, match="prior class"):
        prior_class(pd.DataFrame({"class": []}))


def _image(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 200, np.uint8))


def test_multiclass_dataset_labels_carry_the_class_index(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        _image(tmp_path / "images" / name, 100, 50)
    table = pd.DataFrame(
        {
            "NAME": ["a.jpg", "b.jpg"],
            "x1": [10.0, 0.0],
            "y1": [10.0, 0.0],
            "x2": [30.0, 50.0],
            "y2": [40.0, 50.0],
            "class": ["MBL", "B"],
        }
    )
    folds = pd.DataFrame({"NAME": ["a.jpg", "b.jpg"], "fold": [0, 1]})
    data = DetectionData(table, folds, tmp_path / "images", fold=1, cache_dir=tmp_path / "cache")
    data_yaml, counts = write_yolo_dataset(data, class_names=CLASSES)
    spec = yaml.safe_load(data_yaml.read_text())
    assert spec["names"] == dict(enumerate(CLASSES))
    label = (data_yaml.parent / "labels" / "train" / "a.txt").read_text().split()
    assert label == [str(CLASSES.index("MBL")), "0.200000", "0.500000", "0.200000", "0.600000"]
    assert (data_yaml.parent / "labels" / "val" / "b.txt").read_text().startswith("0 ")  # B is class 0
    single_yaml, _ = write_yolo_dataset(data)  # the single-class dataset of the same data is another folder
    assert single_yaml.parent != data_yaml.parent
    assert yaml.safe_load(single_yaml.read_text())["names"] == {0: "leukocyte"}
    assert (single_yaml.parent / "labels" / "train" / "a.txt").read_text().startswith("0 ")
    bad = DetectionData(table.assign(**{"class": ["MBL", "blast"]}), folds, tmp_path / "images", 1, tmp_path / "c2")
    with pytest.raises(CytologiaInputError, match=r"row 2 \(b.jpg: 'blast'\)"):
        write_yolo_dataset(bad, class_names=CLASSES)


def test_nms_with_class_keeps_the_best_class_of_each_box() -> None:
    _, frame = letterbox(np.zeros((64, 64, 3), np.uint8), 64)
    raw = torch.zeros(1, 4 + 3, 2)
    raw[0, :4, 0] = torch.tensor([20.0, 20.0, 10.0, 10.0])
    raw[0, 4:, 0] = torch.tensor([0.1, 0.8, 0.3])  # class 1 at 0.8
    raw[0, :4, 1] = torch.tensor([50.0, 50.0, 10.0, 10.0])
    raw[0, 4:, 1] = torch.tensor([0.6, 0.2, 0.1])  # class 0 at 0.6
    (out,) = map_back(nms(raw, conf=0.01, iou=0.5, max_det=10, with_class=True), [frame], 64)
    np.testing.assert_allclose(out, [[15, 15, 25, 25, 0.8, 1], [45, 45, 55, 55, 0.6, 0]], atol=1e-5)
    (plain,) = UltralyticsDetector.boxes_from_output(raw, [frame], 64, conf=0.01, iou=0.5, max_det=10)
    np.testing.assert_allclose(plain, out[:, :5], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ss_synth")
    generate(out, n_images=30, seed=11, config=SynthConfig(size=160))
    return out


def test_single_stage_command_trains_predicts_and_scores(
    tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    # a 0.1 CPU-minute budget with epochs=50: ultralytics' time limit, counted in process CPU seconds, ends training
    argv = [
        "single-stage",
        "--data",
        str(tiny_set),
        "--out",
        str(out),
        "--epochs",
        "50",
        "--time-min",
        "0.1",
        "--clock",
        "cpu",
        "--img-size",
        "128",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--folds-k",
        "2",
        "--train-arg",
        "nbs=8",
    ]
    assert main(argv) == 0
    assert (out / "single_stage.pt").is_file()
    test = read_test(tiny_set / "test.csv")
    sub = read_submission(out / "submission.csv", test=test)  # every trustii_id once, valid classes and boxes
    assert len(sub) == len(test) and set(sub["class"]) <= set(CLASSES)
    scored = json.loads((out / "score.json").read_text())
    assert 0.0 < scored["score"] <= 1.0 and scored["n_truth"] == len(test)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["budget"]["clock"] == "cpu" and metrics["train_cpu_seconds"] > 0
    assert metrics["budget"]["time_min"] == 0.1 and metrics["settings"]["extra"] == {"flipud": 0.5, "nbs": 8}
    assert 1 <= metrics["epochs_run"] < 50
    assert metrics["score"] == pytest.approx(scored["score"])
    assert "metrics/cytologia_score" in metrics["history"][0]  # the selection metric was computed each epoch
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["score"] == pytest.approx(scored["score"])
    folds = pd.read_csv(out / "folds.csv")
    assert sorted(folds["fold"].unique()) == [0, 1]
