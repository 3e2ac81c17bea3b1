"""The report folder: every file written, pictures that are real PNGs, links that resolve, numbers that match the
score, and the gallery's crops placed on the right boxes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia.baseline import prior_submission
from cytologia.cli import main
from cytologia.data.synthetic.generate import SynthConfig, generate
from cytologia.errors import CytologiaInputError
from cytologia.metrics import read_truth, score
from cytologia.report import (
    GALLERY_MARGIN,
    _crop_window,
    confusion_table,
    per_source_table,
    worst_errors,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, n_images=40, seed=5, config=SynthConfig(size=160))
    return out


def _degraded(truth: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, object]]:
    """A prediction from the truth with known faults: two class swaps, one box moved off its cell, one image left
    without any prediction."""
    pred = truth.copy()
    names = list(pd.unique(truth["NAME"]))
    single = [n for n in names if (truth["NAME"] == n).sum() == 1]
    swap_rows = [truth.index[truth["NAME"] == single[0]][0], truth.index[truth["NAME"] == single[1]][0]]
    pred.loc[swap_rows[0], "class"] = "MBL" if truth.loc[swap_rows[0], "class"] != "MBL" else "B"
    pred.loc[swap_rows[1], "class"] = "PM" if truth.loc[swap_rows[1], "class"] != "PM" else "MM"
    moved = truth.index[truth["NAME"] == single[2]][0]
    w = truth.loc[moved, "x2"] - truth.loc[moved, "x1"]
    pred.loc[moved, ["x1", "x2"]] = [truth.loc[moved, "x1"] + 0.8 * w, truth.loc[moved, "x2"] + 0.8 * w]
    dropped = single[3]
    pred = pred[pred["NAME"] != dropped].reset_index(drop=True)
    return pred, {"swaps": swap_rows, "moved": moved, "dropped": dropped}


def _links(index: Path) -> list[str]:
    return re.findall(r"(?:href|src)='([^']+)'", index.read_text())


def test_report_writes_every_part_and_links_resolve(data: Path, tmp_path: Path) -> None:
    truth = read_truth(data / "test_labels.csv")
    pred, faults = _degraded(truth)
    train = pd.read_csv(data / "train.csv", keep_default_na=False)
    names = list(pd.unique(train["NAME"]))
    folds = pd.DataFrame({"NAME": names, "fold": np.arange(len(names)) % 2})
    cleaning = pd.DataFrame(
        {
            "NAME": [names[0], names[0], names[1]],
            "box_id": [0, 1, 2],
            "flag": ["unconfirmed", "misplaced", "misplaced"],
            "action": ["drop_image", "drop_image", "keep"],
        }
    )
    test = pd.read_csv(data / "test.csv", keep_default_na=False)
    null = score(truth, prior_submission(train, test, data / "images"))
    out = tmp_path / "report"
    index = write_report(
        out,
        truth,
        pred,
        sources=data / "sources.csv",
        image_dir=data / "images",
        folds=folds,
        train=train,
        cleaning_report=cleaning,
        stage_times={"detector": 61.0, "classifier": 120.0},
        config={"seed": 1, "k": 2},
        extra_scores={
            "null": null,
            "single-stage": {"score": 0.5, "giou": 0.7, "f1": 0.45},
            "two-stage": score(truth, pred),
        },  # the run itself among the others (as the pipeline passes it)
        name="two-stage",
    )
    assert index == out / "index.html"
    expected = {
        "index.html",
        "score.json",
        "comparison.csv",
        "comparison.png",
        "stage_times.csv",
        "per_class_f1.csv",
        "per_class_f1.png",
        "confusion.csv",
        "confusion.png",
        "per_source.csv",
        "per_source.png",
        "errors.csv",
        "errors.png",
        "folds.csv",
        "fold_counts.csv",
        "cleaning_summary.csv",
        "cleaning_report.csv",
        "config.yaml",
        "files.json",
    }
    assert expected <= {p.name for p in out.iterdir()}
    for png in out.glob("*.png"):
        head = png.read_bytes()[:8]
        assert head == PNG_MAGIC and png.stat().st_size > 5000, png.name
    links = _links(index)
    assert {"comparison.png", "per_class_f1.png", "confusion.png", "per_source.png", "errors.png"} <= set(links)
    assert {"score.json", "folds.csv", "fold_counts.csv", "config.yaml", "errors.csv"} <= set(links)
    assert all((out / link).is_file() for link in links)

    result = score(truth, pred)
    saved = json.loads((out / "score.json").read_text())
    assert saved["score"] == pytest.approx(result.score)
    comparison = pd.read_csv(out / "comparison.csv", keep_default_na=False)
    assert comparison["approach"].tolist() == ["two-stage", "null", "single-stage"]
    assert comparison["score"].tolist() == pytest.approx([result.score, null.score, 0.5])
    per_class = pd.read_csv(out / "per_class_f1.csv", keep_default_na=False)
    assert per_class["label"].tolist()[:23][0] == "B" and "None" in per_class["label"].tolist()
    in_macro = per_class[per_class["in_macro"]]
    assert pd.to_numeric(in_macro["f1"]).mean() == pytest.approx(result.f1)  # the macro average of the labels it counts
    # the confusion: swapped rows land off the diagonal, the dropped image's boxes in the "None" column
    cm = pd.read_csv(out / "confusion.csv", index_col=0, keep_default_na=False)
    row = faults["swaps"][0]
    assert cm.loc[truth.loc[row, "class"], pred.loc[row, "class"]] >= 1
    n_dropped = int((truth["NAME"] == faults["dropped"]).sum())
    assert cm["None"].sum() == n_dropped
    assert cm.to_numpy().sum() == len(truth)
    # the worst errors: the dropped image first (no prediction), the swaps and the moved box present
    errors = pd.read_csv(out / "errors.csv", keep_default_na=False)
    assert errors["NAME"].iloc[0] == faults["dropped"] and errors["pred_class"].iloc[0] == "None"
    ids = set(errors["trustii_id"])
    assert {int(truth.loc[r, "trustii_id"]) for r in faults["swaps"]} <= ids
    assert int(truth.loc[faults["moved"], "trustii_id"]) in ids
    assert errors["shown"].map(str).eq("True").all()
    fold_counts = pd.read_csv(out / "fold_counts.csv")
    assert fold_counts["images"].sum() == len(names) and fold_counts["boxes"].sum() == len(train)
    summary = pd.read_csv(out / "cleaning_summary.csv")
    assert "flag misplaced -> drop_image" in summary["what"].tolist()
    times = pd.read_csv(out / "stage_times.csv")
    assert times["seconds"].iloc[-1] == pytest.approx(181.0)


def test_confusion_table_orientation_rows_true_columns_pred() -> None:
    truth = pd.DataFrame(
        {
            "trustii_id": [1, 2, 3],
            "NAME": ["a", "b", "c"],
            "x1": 0,
            "y1": 0,
            "x2": 10,
            "y2": 10,
            "class": ["B", "B", "MBL"],
        }
    )
    pred = truth.assign(**{"class": ["MBL", "B", "MBL"]})
    cm = confusion_table(score(truth, pred))
    assert cm.loc["B", "MBL"] == 1 and cm.loc["MBL", "B"] == 0 and cm.loc["B", "B"] == 1
    assert list(cm.index[:23]) == list(cm.columns[:23]) and cm.shape == (23, 23)  # no "None": every image predicted


def test_per_source_scores_each_subset_by_the_rules() -> None:
    truth = pd.DataFrame(
        {
            "trustii_id": [1, 2, 3, 4],
            "NAME": ["a", "b", "c", "d"],
            "x1": 0,
            "y1": 0,
            "x2": 10,
            "y2": 10,
            "class": ["B", "MBL", "B", "MBL"],
        }
    )
    pred = truth.assign(**{"class": ["B", "MBL", "MBL", "MBL"]})
    table = per_source_table(score(truth, pred), pd.Series({"a": "S1", "b": "S1", "c": "S2"}))
    by = table.set_index("source")
    assert by.loc["S1", "f1"] == 1.0 and by.loc["S1", "giou"] == 1.0 and by.loc["S1", "score"] == pytest.approx(1.0)
    assert by.loc["S2", "f1"] == 0.0  # B predicted MBL: two labels, both F1 0
    assert by.loc["unknown", "n_boxes"] == 1  # "d" has no source


def test_crop_window_covers_both_boxes_with_margin_inside_the_image() -> None:
    box = np.array([10.0, 20.0, 50.0, 60.0])
    pbox = np.array([40.0, 30.0, 90.0, 70.0])
    assert _crop_window(box, pbox, 100, 100) == (0, 20 - GALLERY_MARGIN, 100, 70 + GALLERY_MARGIN)
    assert _crop_window(box, np.full(4, np.nan), 200, 200) == (0, 4, 66, 76)  # x1 = 10 - 16 clipped at 0


def test_gallery_skips_an_unreadable_image_and_says_so(data: Path, tmp_path: Path) -> None:
    import shutil

    images = tmp_path / "images"
    shutil.copytree(data / "images", images)
    truth = read_truth(data / "test_labels.csv")
    pred, faults = _degraded(truth)
    (images / faults["dropped"]).unlink()
    write_report(tmp_path / "r", truth, pred, image_dir=images, n_gallery=5)
    errors = pd.read_csv(tmp_path / "r" / "errors.csv", keep_default_na=False)
    assert errors.loc[errors["NAME"] == faults["dropped"], "shown"].map(str).eq("False").all()
    assert errors["shown"].map(str).eq("True").sum() == len(errors) - (errors["NAME"] == faults["dropped"]).sum()


def test_worst_errors_without_any_error_is_empty_and_report_still_written(tmp_path: Path) -> None:
    truth = pd.DataFrame({"trustii_id": [1], "NAME": ["a.jpg"], "x1": 0, "y1": 0, "x2": 10, "y2": 10, "class": ["B"]})
    result = score(truth, truth)
    assert worst_errors(result, truth, 10).empty
    index = write_report(tmp_path / "r", truth, truth)
    assert all((tmp_path / "r" / link).is_file() for link in _links(index))
    assert not (tmp_path / "r" / "errors.png").exists()  # no image folder: no gallery, said in the page
    assert "no gallery" in index.read_text()


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    truth = pd.DataFrame({"trustii_id": [1], "NAME": ["a"], "x1": 0, "y1": 0, "x2": 10, "y2": 10, "class": ["B"]})
    with pytest.raises(CytologiaInputError, match="sources table lacks column"):
        write_report(tmp_path / "r", truth, truth, sources=pd.DataFrame({"NAME": ["a"]}))
    with pytest.raises(CytologiaInputError, match="lacks f1"):
        write_report(tmp_path / "r", truth, truth, extra_scores={"x": {"score": 1.0, "giou": 1.0}})
    with pytest.raises(CytologiaInputError, match="own name but not its score"):
        write_report(
            tmp_path / "r", truth, truth, extra_scores={"run": {"score": 0.5, "giou": 1.0, "f1": 0.4}}, name="run"
        )
    with pytest.raises(CytologiaInputError, match="no such file"):
        write_report(tmp_path / "r", tmp_path / "missing.csv", truth)
    with pytest.raises(CytologiaInputError, match=r"row 2 \('x'\)"):
        write_report(tmp_path / "r", truth, truth, folds=pd.DataFrame({"NAME": ["a", "b"], "fold": ["0", "x"]}))
    assert not (tmp_path / "r").exists()  # inputs are checked before anything is written


def test_report_command_builds_the_folder_from_files(data: Path, tmp_path: Path) -> None:
    truth = read_truth(data / "test_labels.csv")
    pred, _ = _degraded(truth)
    pred_csv = tmp_path / "pred.csv"
    pred.to_csv(pred_csv, index=False)
    other = tmp_path / "other.csv"
    truth.to_csv(other, index=False)
    out = tmp_path / "rep"
    argv = [
        "report",
        "--truth",
        str(data / "test_labels.csv"),
        "--pred",
        str(pred_csv),
        "--data",
        str(data),
        "--out",
        str(out),
        "--compare",
        f"perfect={other}",
        "--gallery",
        "4",
    ]
    assert main(argv) == 0
    assert {"index.html", "errors.png", "per_source.png", "comparison.csv"} <= {p.name for p in out.iterdir()}
    assert pd.read_csv(out / "comparison.csv")["score"].iloc[1] == pytest.approx(1.0)
    assert len(pd.read_csv(out / "errors.csv")) == 4
    assert main([*argv[:-4], "--compare", "no-equals-sign"]) == 2
