"""Folds of a combined folder: leave one data set out (``group-dataset``), data sets balanced by the stratified mode,
the data sets read from ``sources.csv`` by ``folds_for_folder``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia.data.folds import folds_for_folder, make_folds, stratification_labels
from cytologia.data.schema import CLASSES
from cytologia.errors import CytologiaInputError


def _combined(sizes: dict[str, int], seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """An annotation table of several data sets (``<dataset>__img<i>.jpg``, one or two boxes) and NAME -> data set."""
    rng = np.random.default_rng(seed)
    rows, datasets = [], {}
    for dataset, n in sizes.items():
        for i in range(n):
            name = f"{dataset}__img{i:04d}.jpg"
            datasets[name] = dataset
            for _ in range(int(rng.choice([1, 2], p=[0.9, 0.1]))):
                x1, y1 = rng.integers(0, 100, size=2)
                rows.append((name, x1, y1, x1 + 50, y1 + 50, str(rng.choice(CLASSES[:8]))))
    return pd.DataFrame(rows, columns=["NAME", "x1", "y1", "x2", "y2", "class"]), pd.Series(datasets)


def test_group_dataset_leaves_one_data_set_out() -> None:
    table, datasets = _combined({"cytologia": 120, "pbc": 60, "raabin": 40})
    folds, report = make_folds(table, k=3, mode="group-dataset", datasets=datasets)
    fold_of = folds.set_index("NAME")["fold"]
    per_dataset = fold_of.groupby(datasets.reindex(fold_of.index)).nunique()
    assert (per_dataset == 1).all()  # never split
    assert sorted(report.dataset_folds.values()) == [0, 1, 2] and report.n_datasets == 3
    assert report.dataset_folds == {d: int(fold_of[datasets == d].iat[0]) for d in ("cytologia", "pbc", "raabin")}

    # Fewer folds than data sets: whole data sets share folds, the largest alone.
    folds2, report2 = make_folds(table, k=2, mode="group-dataset", datasets=datasets)
    assert report2.dataset_folds["pbc"] == report2.dataset_folds["raabin"] != report2.dataset_folds["cytologia"]
    with pytest.raises(CytologiaInputError, match="at least k=4 separable datasets, found 3"):
        make_folds(table, k=4, mode="group-dataset", datasets=datasets)
    with pytest.raises(CytologiaInputError, match="needs the data set of every image"):
        make_folds(table, k=2, mode="group-dataset")
    with pytest.raises(CytologiaInputError, match="1 image\\(s\\) have no data set"):
        make_folds(table, k=2, mode="group-dataset", datasets=datasets.iloc[1:])


def test_duplicates_across_data_sets_share_a_fold() -> None:
    table, datasets = _combined({"a": 30, "b": 30, "c": 30})
    dup = pd.Series(-1, index=datasets.index)
    dup[["a__img0000.jpg", "b__img0000.jpg"]] = 7  # the same image in two data sets
    _, report = make_folds(table, k=2, mode="group-dataset", datasets=datasets, dup_groups=dup)
    assert report.dataset_folds["a"] == report.dataset_folds["b"]
    assert any("link 2 data sets" in w for w in report.warnings)


def test_stratified_balances_the_data_sets() -> None:
    table, datasets = _combined({"big": 300, "small": 100}, seed=1)
    folds, _ = make_folds(table, k=4, mode="stratified", datasets=datasets)
    share = folds.assign(small=folds["NAME"].map(datasets).eq("small")).groupby("fold")["small"].mean()
    assert (share - 0.25).abs().max() < 0.02  # 25 % of the images in every fold

    units = pd.DataFrame({"class=B": [1, 0, 1, 0], "n_boxes": [1, 1, 2, 1], "dataset": [0, 1, 1, 0]})
    for feat in ("box_size", "img_size", "L_mean", "a_mean", "b_mean"):
        units[feat] = np.nan
    labels = stratification_labels(units, ["B"])
    assert labels[["dataset=0", "dataset=1"]].to_numpy().tolist() == [[1, 0], [0, 1], [0, 1], [1, 0]]
    assert not any(c.startswith("dataset") for c in stratification_labels(units.drop(columns="dataset"), ["B"]))


def test_folds_for_folder_reads_the_data_sets(tmp_path: Path) -> None:
    table, datasets = _combined({"cytologia": 40, "lisc": 20})
    table.to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"NAME": datasets.index, "source": datasets.to_numpy(), "dataset": datasets.to_numpy()}).to_csv(
        tmp_path / "sources.csv", index=False
    )
    folds, report = folds_for_folder(tmp_path, tmp_path / "folds.csv", k=2, mode="group-dataset", use_images=False)
    assert report.dataset_folds is not None and set(report.dataset_folds) == {"cytologia", "lisc"}
    saved = json.loads((tmp_path / "folds_report.json").read_text())
    assert saved["mode"] == "group-dataset" and saved["n_datasets"] == 2
