"""Cross-data-set evaluation and combined folders: two "data sets" cut from one generated set by acquisition source
(different scanners/stains) and by class, combined, trained on one and scored on the other over the shared classes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from cytologia.classification.oof import logits_of, read_oof
from cytologia.cli import main
from cytologia.crossdata import shared_class_scores
from cytologia.data.combine import combine_folders, read_datasets
from cytologia.data.io import read_annotations
from cytologia.data.schema import CLASSES
from cytologia.data.synthetic.generate import SynthConfig, generate
from cytologia.errors import CytologiaInputError

TINY = "test_convnext"  # timm's 209k-parameter test network
SOURCES_A = {f"S0{k}" for k in range(1, 6)}


def _subset(root: Path, out: Path, sources: set[str], drop: set[str]) -> Path:
    """The images of ``sources`` (generated sources.csv) without the boxes of classes ``drop``, as a data folder."""
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    source_of = pd.read_csv(root / "sources.csv", dtype=str).set_index("NAME")["source"]
    keep = table["NAME"].map(source_of).isin(sources) & ~table["class"].isin(drop)
    (out / "images").mkdir(parents=True)
    for name in table.loc[keep, "NAME"].unique():
        os.link(root / "images" / name, out / "images" / name)
    table[keep].to_csv(out / "train.csv", index=False)
    return out


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    """Set A: the images of sources S01-S05, set B: those of S06-S10 (60 generated images of 96 px). B's most frequent
    class is removed from A (a test-only class) and A's most frequent other class from B (a training-only class)."""
    root = tmp_path_factory.mktemp("synth")
    generate(root, 60, seed=0, config=SynthConfig(size=96, test_fraction=0.0))
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    in_a = table["NAME"].map(pd.read_csv(root / "sources.csv").set_index("NAME")["source"]).isin(SOURCES_A)
    test_only = table.loc[~in_a, "class"].value_counts().index[0]
    train_only = table.loc[in_a & (table["class"] != test_only), "class"].value_counts().index[0]
    base = tmp_path_factory.mktemp("sets")
    a = _subset(root, base / "a", SOURCES_A, {test_only})
    b = _subset(root, base / "b", {f"S{k:02d}" for k in range(6, 11)}, {train_only})
    return a, b, test_only, train_only


def test_shared_class_scores_by_hand() -> None:
    labels = ["EO", "LY", "MO", "PNN"]
    truth = ["LY", "LY", "PNN", "MO", "PNN"]
    logits = np.array(
        [
            [0, 5, 9, 0],  # LY; MO is not a training class -> argmax over EO/LY/PNN: LY (right)
            [4, 1, 0, 0],  # LY predicted EO (a training-only class): a miss of LY
            [0, 0, 0, 3],  # PNN right
            [9, 0, 0, 0],  # MO: not a training class, not scored
            [0, 2, 0, 1],  # PNN predicted LY
        ],
        dtype=float,
    )
    per_class, macro, acc, n = shared_class_scores(truth, logits, labels, ["EO", "LY", "PNN"])
    assert list(per_class) == ["LY", "PNN"] and n == 4
    # LY: tp 1, fn 1 (-> EO), fp 1 (the PNN box) -> P 1/2, R 1/2, F1 1/2; PNN: tp 1, fn 1 -> P 1, R 1/2, F1 2/3.
    assert per_class["LY"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert per_class["PNN"]["f1"] == pytest.approx(2 / 3) and per_class["PNN"]["precision"] == 1.0
    assert macro == pytest.approx((0.5 + 2 / 3) / 2) and acc == 0.5
    with pytest.raises(CytologiaInputError, match="share no class"):
        shared_class_scores(["MO"], logits[:1], labels, ["EO"])


def test_combine_keeps_the_data_set(two_sets: tuple[Path, Path], tmp_path: Path) -> None:
    a, b, test_only, train_only = two_sets
    summary = combine_folders({"SetA": a, "setb": b}, tmp_path / "both", lenient=True)
    table, report = read_annotations(tmp_path / "both" / "train.csv", tmp_path / "both" / "images")
    assert report.kept == report.rows == summary["seta"]["boxes"] + summary["setb"]["boxes"]
    datasets = read_datasets(tmp_path / "both")
    assert table["NAME"].map(datasets).value_counts().to_dict() == {
        "seta": summary["seta"]["boxes"],
        "setb": summary["setb"]["boxes"],
    }
    assert test_only not in summary["seta"]["classes"] and train_only not in summary["setb"]["classes"]
    assert table["NAME"].str.startswith(("seta__", "setb__")).all()
    assert read_datasets(a) is None  # a plain folder: one data set
    with pytest.raises(CytologiaInputError, match="not an empty folder"):
        combine_folders({"a": a}, tmp_path / "both")


def test_evaluate_across_two_generated_sets(two_sets: tuple[Path, Path], tmp_path: Path) -> None:
    a, b, test_only, train_only = two_sets
    out = tmp_path / "cross"
    overrides = [f"classifier.name={TINY}", "classifier.img_size=32", "trainer.batch_size=4", "trainer.max_epochs=1"]
    argv = ["evaluate", "--train", str(a), "--test", str(b), "--out", str(out), "--exp", "smoke"]
    assert main(argv + [arg for o in overrides for arg in ("--set", o)]) == 0
    result = json.loads((out / "cross_eval.json").read_text())

    train_classes = set(pd.read_csv(a / "train.csv")["class"])
    test_classes = set(pd.read_csv(b / "train.csv")["class"])
    shared = [c for c in CLASSES if c in train_classes & test_classes]
    assert result["shared_classes"] == list(result["per_class"]) == shared
    assert test_only in result["test_only"] and train_only in result["train_only"]
    assert test_only not in result["per_class"] and train_only not in result["per_class"]
    assert result["test_only"] == sorted(test_classes - train_classes, key=CLASSES.index)

    # Recomputed from the run's own out-of-fold logits with scikit-learn: argmax over the training classes.
    oof = read_oof(out / "fold_0" / "oof_logits.csv")
    plain = oof[oof["model"] == "cross"]
    cols = [CLASSES.index(c) for c in CLASSES if c in train_classes]
    pred = np.array([c for c in CLASSES if c in train_classes])[logits_of(plain)[:, cols].argmax(axis=1)]
    boxes, _ = read_annotations(out / "data" / "train.csv", out / "data" / "images")
    truth = boxes.set_index("box_id")["class"].reindex(plain["box_id"]).to_numpy()
    assert set(boxes.loc[boxes["box_id"].isin(plain["box_id"]), "NAME"].str[:5]) == {"test_"}  # only set B is scored
    scored = np.isin(truth, shared)
    f1 = f1_score(truth[scored], pred[scored], labels=shared, average=None, zero_division=0)
    assert [result["per_class"][c]["f1"] for c in shared] == pytest.approx(f1.tolist())
    assert result["macro_f1_shared"] == pytest.approx(float(np.mean(f1)))
    assert result["n_scored"] == int(scored.sum()) and result["n_test"] == len(plain)
    assert result["accuracy_shared"] == pytest.approx(float((truth[scored] == pred[scored]).mean()))
    test_boxes = boxes[boxes["NAME"].str.startswith("test__")]
    support = test_boxes["class"].value_counts()
    assert {c: result["per_class"][c]["support"] for c in shared} == {c: int(support[c]) for c in shared}
    assert (out / "per_class.csv").is_file() and (out / "config.yaml").is_file()
