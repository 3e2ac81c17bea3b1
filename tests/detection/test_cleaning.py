"""Noisy-box cleaning: each flag on constructed tables, actions, the assignment, evaluation against noise.csv."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cytologia.detection.cleaning import (
    REPORT_COLUMNS,
    CleaningConfig,
    _assign,
    clean_annotations,
    clean_truth,
    evaluate_cleaning,
)
from cytologia.errors import CytologiaInputError

ROOT = Path(__file__).resolve().parents[2]


def _ann(rows: list[tuple]) -> pd.DataFrame:
    """Annotations NAME, x1..y2, class, img_w, img_h, fixes with box_id = row number."""
    frame = pd.DataFrame(rows, columns=["NAME", "x1", "y1", "x2", "y2", "class"])
    frame.insert(1, "box_id", np.arange(len(frame)))
    frame["img_w"], frame["img_h"], frame["fixes"] = 368, 368, ""
    return frame


def _det(rows: list[tuple], model: str = "m") -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["NAME", "x1", "y1", "x2", "y2", "score"])
    frame["model"] = model
    return frame


ANN = _ann(
    [
        ("ok.jpg", 100, 100, 250, 250, "PNN"),  # 0: confirmed
        ("red.jpg", 100, 100, 250, 250, "LY"),  # 1: confirmed
        ("red.jpg", 10, 260, 100, 350, "LY"),  # 2: nothing there (a red cell boxed)
        ("weak.jpg", 100, 100, 250, 250, "MO"),  # 3: only a weak detection
        ("jit.jpg", 130, 100, 280, 250, "EO"),  # 4: shifted by 30 px -> IoU 0.67 with the detection
        ("border.jpg", 100, 100, 250, 250, "B"),  # 5: confirmed, but a confident cell at the border has no box
        ("dup.jpg", 100, 100, 250, 250, "M"),  # 6
        ("dup.jpg", 100, 100, 250, 250, "M"),  # 7: the same box again
        ("past.jpg", -20, 100, 130, 250, "LF"),  # 8: past the left border: clipped to 0, then confirmed
        ("nodet.jpg", 100, 100, 250, 250, "PM"),  # 9: the detector found nothing at all
    ]
)
DET = _det(
    [
        ("ok.jpg", 102, 98, 252, 249, 0.95),
        ("red.jpg", 101, 101, 251, 249, 0.9),
        ("weak.jpg", 100, 100, 250, 250, 0.1),
        ("jit.jpg", 100, 100, 250, 250, 0.9),
        ("border.jpg", 100, 100, 250, 250, 0.9),
        ("border.jpg", 300, 20, 368, 130, 0.8),  # unannotated
        ("border.jpg", 10, 280, 80, 360, 0.2),  # too weak to call it a cell
        ("dup.jpg", 100, 100, 250, 250, 0.9),
        ("past.jpg", 0, 100, 130, 250, 0.9),
    ]
)


def _flags(report: pd.DataFrame) -> dict[tuple[str, int], str]:
    return {(n, int(b)): f for n, b, f in zip(report["NAME"], report["box_id"], report["flag"])}


def test_each_flag_on_a_constructed_table() -> None:
    result = clean_annotations(ANN, DET)
    report = result.report
    assert list(report.columns) == list(REPORT_COLUMNS)
    assert _flags(report) == {
        ("red.jpg", 2): "unconfirmed",
        ("weak.jpg", 3): "unconfirmed",
        ("jit.jpg", 4): "misplaced",
        ("border.jpg", -1): "unannotated",
        ("dup.jpg", 7): "duplicate",
        ("nodet.jpg", 9): "unconfirmed",
    }
    jit = report[report["flag"] == "misplaced"].iloc[0]
    assert jit["iou"] == pytest.approx(120 * 150 / (180 * 150))
    assert jit["score"] == pytest.approx(0.9)
    unann = report[report["flag"] == "unannotated"].iloc[0]
    assert unann[["x1", "y1", "x2", "y2"]].tolist() == [300, 20, 368, 130]
    weak = report[report["box_id"] == 3].iloc[0]
    assert weak["score"] == pytest.approx(0.1) and weak["iou"] == pytest.approx(1.0)
    c = result.counts
    assert (c["unconfirmed"], c["misplaced"], c["unannotated"], c["duplicate"]) == (3, 1, 1, 1)
    assert c["images_without_detection"] == 1 and c["images_flagged"] == 6


def test_default_actions_drop_flagged_images_and_duplicate_boxes() -> None:
    cleaned = clean_annotations(ANN, DET).cleaned
    assert sorted(cleaned["box_id"]) == [0, 6, 8]  # ok, dup (first box), past
    past = cleaned[cleaned["box_id"] == 8].iloc[0]
    assert past["x1"] == 0  # clipped to the image
    assert list(cleaned.columns) == list(ANN.columns)


def test_fix_and_keep_actions() -> None:
    cfg = CleaningConfig(
        misplaced_action="fix", unconfirmed_action="keep", unannotated_action="keep", duplicate_action="keep"
    )
    result = clean_annotations(ANN, DET, cfg)
    cleaned = result.cleaned.set_index("box_id")
    assert len(cleaned) == len(ANN)
    assert cleaned.loc[4, ["x1", "y1", "x2", "y2"]].tolist() == [100, 100, 250, 250]  # the detection's box
    assert cleaned.loc[4, "fixes"] == "moved"
    assert result.counts["boxes_fixed"] == 1 and result.counts["boxes_dropped"] == 0
    drop_box = clean_annotations(ANN, DET, CleaningConfig(unconfirmed_action="drop_box"))
    assert 1 in set(drop_box.cleaned["box_id"]) and 2 not in set(drop_box.cleaned["box_id"])


def test_thresholds_move_the_flags() -> None:
    # a looser misplaced threshold accepts the jittered box; a lower confirm score accepts the weak detection
    result = clean_annotations(ANN, DET, CleaningConfig(misplaced_iou=0.6, confirm_score=0.05))
    flags = _flags(result.report)
    assert ("jit.jpg", 4) not in flags and ("weak.jpg", 3) not in flags
    # the weak border detection becomes an unannotated cell when the bar is low
    result = clean_annotations(ANN, DET, CleaningConfig(unannotated_score=0.15))
    assert result.counts["unannotated"] == 2


def test_several_models_per_image_are_fused_first() -> None:
    tta = pd.concat([DET, DET.assign(model="m+hflip", x1=DET["x1"] + 2, x2=DET["x2"] + 2)], ignore_index=True)
    result = clean_annotations(ANN, tta)
    assert set(_flags(result.report).values()) == {"unconfirmed", "misplaced", "unannotated", "duplicate"}
    assert result.counts["unannotated"] == 1  # the two TTA boxes of the border cell are one cell, not two


def test_assignment_maximises_total_giou_not_greedy() -> None:
    # image 0: truth A, B; detections d1, d2. Greedy takes A-d1 (0.9) then B-d2 (0.1) = 1.0; the optimum is
    # A-d2 + B-d1 = 1.65. Image 1: one truth box, two detections: the better one.
    img = np.array([0, 0, 0, 0, 1, 1])
    ti = np.array([0, 0, 1, 1, 2, 2])
    di = np.array([0, 1, 0, 1, 2, 3])
    giou = np.array([0.9, 0.85, 0.8, 0.1, 0.3, 0.7])
    chosen = sorted(_assign(img, ti, di, giou).tolist())
    assert chosen == [1, 2, 5]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="misplaced_action"):
        CleaningConfig(misplaced_action="explode")
    with pytest.raises(ValueError, match="unannotated_action"):
        CleaningConfig(unannotated_action="fix")  # an unannotated cell has no box to fix
    with pytest.raises(ValueError, match="match_iou"):
        CleaningConfig(match_iou=1.5)
    with pytest.raises(CytologiaInputError, match="match_ious"):
        CleaningConfig.from_mapping({"match_ious": 0.3})
    with pytest.raises(CytologiaInputError, match="row 2"):
        clean_annotations(ANN, DET.assign(score=[0.9, "x", *DET["score"].iloc[2:]]), source="oof.csv")


def test_yaml_defaults_equal_the_dataclass() -> None:
    path = ROOT / "configs" / "cleaning" / "default.yaml"
    assert CleaningConfig.from_yaml(path) == CleaningConfig()
    assert set(yaml.safe_load(path.read_text())) == set(CleaningConfig().as_dict())


def test_every_cleaning_preset_loads_and_names_every_key() -> None:
    presets = sorted((ROOT / "configs" / "cleaning").glob("*.yaml"))
    assert len(presets) >= 2
    for path in presets:
        CleaningConfig.from_yaml(path)  # unknown keys, bad values and bad actions are errors
        assert set(yaml.safe_load(path.read_text())) == set(CleaningConfig().as_dict()), path.name
    short = CleaningConfig.from_yaml(ROOT / "configs" / "cleaning" / "short_cpu.yaml")
    assert short.confirm_score < CleaningConfig().confirm_score and short.misplaced_action == "keep"


# ------------------------------------------------------------------------------------------------------ evaluation
NOISE = pd.DataFrame(
    [
        # NAME, split, kind, train_row (1-based), box_index, class, x1..y2, details
        ("red.jpg", "train", "red_cell_extra", 3, 1, "LY", 10, 260, 100, 350, "a red cell, no leukocyte"),
        ("jit.jpg", "train", "box_jitter", 5, 0, "EO", 100, 100, 250, 250, "written=130 100 280 250"),
        ("border.jpg", "train", "unannotated_border", -1, -1, "B", 298, 22, 368, 128, "not in train.csv"),
        ("past.jpg", "train", "past_border", 9, 0, "LF", 0, 100, 130, 250, "written=-20 100 130 250"),
        ("rep.jpg", "train", "red_cell_replace", 11, 0, "MO", 200, 200, 340, 340, "red_cell=10 10 100 100"),
        ("cp.jpg", "train", "duplicate_exact", -1, -1, "", "", "", "", "", "of=ok.jpg"),
        ("t.jpg", "test", "unannotated_border", -1, -1, "B", 0, 0, 50, 50, "test rows are not cleaned"),
    ],
    columns=["NAME", "split", "kind", "train_row", "box_index", "class", "x1", "y1", "x2", "y2", "details"],
)


def test_evaluation_counts_precision_and_recall() -> None:
    ann = pd.concat([ANN, _ann([("rep.jpg", 10, 10, 100, 100, "MO")]).assign(box_id=10)], ignore_index=True)
    report = clean_annotations(ann, DET).report
    table = evaluate_cleaning(report, NOISE).set_index(["scope", "name"])
    unc = table.loc[("flag", "unconfirmed")]
    # flagged: red.jpg#2 (red_cell_extra), weak.jpg#3 (no defect), nodet.jpg#9 (no defect), rep.jpg#10 (replace)
    assert (unc["n_flagged"], unc["tp"], unc["n_true"]) == (4, 2, 2)
    assert unc["precision"] == pytest.approx(0.5) and unc["recall"] == pytest.approx(1.0)
    mis = table.loc[("flag", "misplaced")]
    assert (mis["precision"], mis["recall"]) == (1.0, 1.0)
    # the border cell is found (IoU > 0.5 with its noise box); the leukocyte of rep.jpg was not detected
    una = table.loc[("flag", "unannotated")]
    assert (una["n_flagged"], una["tp"], una["n_true"]) == (1, 1, 2)
    assert table.loc[("kind", "past_border"), "recall"] == 0.0  # clipped, not flagged: what we want
    assert table.loc[("kind", "red_cell_replace (missed cell)"), "recall"] == 0.0
    img = table.loc[("image", "images")]
    # defect images: red, jit, border, rep; flagged: red, weak, jit, border, dup, nodet, rep
    assert (img["n_true"], img["n_flagged"], img["tp"]) == (4, 7, 4)


def test_clean_truth_undoes_the_box_defects() -> None:
    ann = pd.concat([ANN, _ann([("rep.jpg", 10, 10, 100, 100, "MO")]).assign(box_id=10)], ignore_index=True)
    truth, red = clean_truth(ann, NOISE)
    by_id = truth[truth["box_id"] >= 0].set_index("box_id")
    assert 2 not in by_id.index  # the red-cell row is gone
    assert by_id.loc[4, ["x1", "y1", "x2", "y2"]].tolist() == [100, 100, 250, 250]  # jitter undone
    assert by_id.loc[10, ["x1", "y1", "x2", "y2"]].tolist() == [200, 200, 340, 340]  # the leukocyte back
    added = truth[truth["box_id"] == -1]
    assert added[["NAME", "class"]].values.tolist() == [["border.jpg", "B"]]  # test rows ignored
    assert sorted(map(tuple, red[["x1", "y1", "x2", "y2"]].to_numpy().tolist())) == [
        (10, 10, 100, 100),
        (10, 260, 100, 350),
    ]
    assert len(truth) == len(ann) - 1 + 1


def test_simulated_detector_on_a_generated_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end on a tiny generated set: generator -> read -> simulated OOF boxes -> clean -> evaluate."""
    import importlib.util

    from cytologia.data.io import read_annotations
    from cytologia.data.synthetic.defects import DefectRates
    from cytologia.data.synthetic.generate import SynthConfig, generate

    rates = DefectRates(box_jitter=0.15, past_border=0.05, red_cell=0.15, unannotated_border=0.15)
    generate(tmp_path, n_images=60, seed=3, config=SynthConfig(size=128, defects=rates))
    spec = importlib.util.spec_from_file_location("eval_cleaning", ROOT / "scripts" / "eval_cleaning.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "eval_cleaning", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    ann, _ = read_annotations(tmp_path / "train.csv", tmp_path / "images", lenient=True)
    noise = pd.read_csv(tmp_path / "noise.csv", dtype={"NAME": str}, keep_default_na=False)
    truth, red = clean_truth(ann, noise)
    sizes = ann[["NAME", "img_w", "img_h"]].drop_duplicates("NAME")
    sim = module.SimDetector(miss=0.0, miss_border=0.0, red_cell=0.0, stray=0.0, duplicate=0.0)
    boxes = module.simulate_detections(truth, red, sizes, sim, seed=0)
    table = evaluate_cleaning(clean_annotations(ann, boxes).report, noise).set_index(["scope", "name"])
    # a detector that finds every cell and nothing else: every flag is right
    for flag in ("unconfirmed", "misplaced", "unannotated"):
        row = table.loc[("flag", flag)]
        assert row["n_flagged"] > 0 and row["precision"] == 1.0, (flag, row.to_dict())
    assert table.loc[("flag", "unconfirmed"), "recall"] == 1.0
    assert table.loc[("kind", "past_border"), "n_flagged"] == 0


def test_clean_command_writes_the_cleaned_table_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cytologia.cli import main

    data = tmp_path / "data"
    data.mkdir()
    ANN[["NAME", "x1", "y1", "x2", "y2", "class"]].to_csv(data / "train.csv", index=False)
    DET.to_csv(tmp_path / "oof.csv", index=False)
    out = tmp_path / "out"
    rc = main(
        [
            "clean",
            "--data",
            str(data),
            "--boxes",
            str(tmp_path / "oof.csv"),
            "--out",
            str(out),
            "--set",
            "misplaced_action=fix",
        ]
    )
    assert rc == 0
    cleaned = pd.read_csv(out / "train_clean.csv")
    assert list(cleaned.columns) == ["NAME", "x1", "y1", "x2", "y2", "class"]
    # no images: nothing is clipped (past.jpg keeps x1 = -20); the jittered box is moved onto its detection
    assert sorted(cleaned["NAME"].unique()) == ["dup.jpg", "jit.jpg", "ok.jpg", "past.jpg"]
    assert cleaned.loc[cleaned["NAME"] == "jit.jpg", "x1"].tolist() == [100]
    report = pd.read_csv(out / "cleaning_report.csv")
    assert sorted(report["flag"]) == sorted(["unconfirmed"] * 3 + ["misplaced", "unannotated", "duplicate"])
    summary = json.loads((out / "cleaning_summary.json").read_text())
    assert summary["settings"]["misplaced_action"] == "fix" and summary["counts"]["boxes_fixed"] == 1
    assert (
        main(
            [
                "clean",
                "--data",
                str(data),
                "--boxes",
                str(tmp_path / "oof.csv"),
                "--out",
                str(out),
                "--set",
                "misplaced_iou=2",
            ]
        )
        == 2
    )
    assert "misplaced_iou" in capsys.readouterr().err
