"""The real test table: with placeholder images for the names of the real ``test.csv`` (22,689 trustii_ids over
20,751 images, rows of one image not adjacent), ``cytologia predict`` writes one row per trustii_id, each with its
image's NAME. The default suite runs a few hundred names; the whole table is a benchmark (``pytest -m bench``) that
prints images/s."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest

from cytologia.cli import main
from cytologia.data.io import read_submission, read_test

SUBSET_IMAGES = 300  # images of the default-suite subset (the first ones of the table, with all their ids)
REAL_ROWS, REAL_IMAGES = 22_689, 20_751  # MISSION.md


def placeholder_folder(real: Path, out: Path, source_images: Path, n_images: int | None = None) -> pd.DataFrame:
    """``out/test.csv`` (the real table, or the rows of its first ``n_images`` images, in the real order) and
    ``out/images/`` with a placeholder for each name: hard links to the generated images of ``source_images`` in turn
    (no pixel copied: 20,751 names cost a directory listing). Returns the test table written."""
    test = pd.read_csv(real / "test.csv", dtype={"NAME": str})
    if n_images is not None:
        keep = set(pd.unique(test["NAME"])[:n_images])
        test = test[test["NAME"].isin(keep)]
    (out / "images").mkdir(parents=True)
    test.to_csv(out / "test.csv", index=False)
    sources = sorted(source_images.iterdir())
    for i, name in enumerate(pd.unique(test["NAME"])):
        os.link(sources[i % len(sources)], out / "images" / name)
    return test


def _check(sub_path: Path, data: Path) -> pd.DataFrame:
    test = read_test(data / "test.csv")
    sub = read_submission(sub_path, test=test)  # every id once, no foreign id, NAME = the id's image
    assert len(sub) == len(test)
    assert sub["trustii_id"].is_unique and set(sub["trustii_id"]) == set(test["trustii_id"])
    merged = sub.merge(test, on="trustii_id", suffixes=("", "_test"))
    assert (merged["NAME"] == merged["NAME_test"]).all()
    return sub


def test_real_table_subset(real_data_dir: Path, yolox_tiny, tmp_path: Path, capsys) -> None:
    data = tmp_path / "real"
    test = placeholder_folder(real_data_dir, data, yolox_tiny.data / "images", SUBSET_IMAGES)
    assert test["NAME"].nunique() == SUBSET_IMAGES and len(test) > SUBSET_IMAGES  # multi-cell images included
    out = tmp_path / "sub.csv"
    args = ["predict", "--data", str(data), "--ensemble", str(yolox_tiny.ensemble_path), "--out", str(out)]
    assert main([*args, "--batch", "16", "--progress"]) == 0
    _check(out, data)
    captured = capsys.readouterr()
    assert f"{SUBSET_IMAGES}/{SUBSET_IMAGES}" in captured.err and "img/s" in captured.err  # the progress bar
    assert f"wrote {out}: {len(test)} rows" in captured.out


@pytest.mark.bench
def test_real_table_full(real_data_dir: Path, yolox_tiny, tmp_path: Path, capsys) -> None:
    """All 20,751 names: 22,689 rows; prints images/s (tiny random models: the pipeline's overhead, not a model's)."""
    data = tmp_path / "real"
    test = placeholder_folder(real_data_dir, data, yolox_tiny.data / "images")
    assert len(test) == REAL_ROWS and test["NAME"].nunique() == REAL_IMAGES
    out = tmp_path / "sub.csv"
    start = time.perf_counter()
    args = ["predict", "--data", str(data), "--ensemble", str(yolox_tiny.ensemble_path), "--out", str(out)]
    assert main([*args, "--batch", "32", "--threads", "1"]) == 0
    wall = time.perf_counter() - start
    _check(out, data)
    with capsys.disabled():
        rate = REAL_IMAGES / wall
        print(f"\nreal test table: {REAL_IMAGES} images, {REAL_ROWS} rows in {wall:.1f} s ({rate:.1f} images/s)")
