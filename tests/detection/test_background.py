"""Background images: painting removes the cell and nothing else; the set on disk keeps folds and originals."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cytologia.data.schema import ANNOTATION_COLUMNS, BACKGROUND, labels
from cytologia.data.synthetic.render import render_scene
from cytologia.detection.background import (
    BACKGROUND_COLUMNS,
    METHODS,
    as_annotations,
    background_name,
    detector_negatives,
    make_background_set,
    outside_mask,
    paint_out,
    read_background,
    saturation,
)
from cytologia.errors import CytologiaInputError


def _scene(seed: int, classes: list[str], size: int = 192):
    scene = render_scene(np.random.default_rng(seed), "S01", classes, size=size)
    return scene.image, scene.boxes.astype(np.float64)


def _inside(shape: tuple[int, ...], boxes: np.ndarray) -> np.ndarray:
    return ~outside_mask(shape, boxes, grow=0.0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed,classes", [(0, ["LY"]), (1, ["PNN"]), (2, ["MO", "EO"])])
def test_painting_removes_the_cell_and_keeps_the_rest(method: str, seed: int, classes: list[str]) -> None:
    image, boxes = _scene(seed, classes)
    original = image.copy()
    painted = paint_out(image, boxes, method=method)
    np.testing.assert_array_equal(image, original)  # the input is not modified
    sat, sat_after = saturation(image), saturation(painted)
    inside = _inside(image.shape, boxes)
    outside = outside_mask(image.shape, boxes, grow=0.0)
    # "stained": more saturated than 99 % of the smear around the cells (nucleus, granules)
    stained = np.quantile(sat[outside], 0.99)
    assert (sat[inside] > stained).mean() > 0.1, "the rendered cell should be stained"
    assert (sat_after[inside] > stained).mean() < 0.03, method  # the stained cell is gone ...
    # ... and what replaced it is as saturated as a typical part of the background (red cells and plasma)
    assert sat_after[inside].mean() < np.quantile(sat[outside], 0.75), (method, sat_after[inside].mean())
    # far from the cells nothing changed (the mask stays within the box grown by 8 %, feathering adds a few px)
    far = outside_mask(image.shape, boxes, grow=0.3)
    np.testing.assert_array_equal(painted[far], image[far])


def test_no_box_gives_an_unchanged_copy_and_bad_input_is_refused() -> None:
    image, _ = _scene(3, ["LY"], size=96)
    out = paint_out(image, np.zeros((0, 4)))
    assert out is not image and np.array_equal(out, image)
    with pytest.raises(ValueError, match="method"):
        paint_out(image, [[10, 10, 50, 50]], method="blur")
    with pytest.raises(ValueError, match="BGR uint8"):
        paint_out(image[:, :, 0], [[10, 10, 50, 50]])


def _write_set(tmp_path: Path, n: int = 6) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    rows, folds = [], []
    for i in range(n):
        classes = ["LY", "PNN"] if i % 3 == 0 else ["MO"]
        image, boxes = _scene(10 + i, classes, size=128)
        name = f"{i:08x}-0.jpg"
        cv2.imwrite(str(image_dir / name), image)
        rows += [(name, *b, c) for b, c in zip(boxes, classes)]
        folds.append((name, i % 3))
    ann = pd.DataFrame(rows, columns=["NAME", "x1", "y1", "x2", "y2", "class"])
    return image_dir, ann, pd.DataFrame(folds, columns=["NAME", "fold"])


def test_background_set_on_disk(tmp_path: Path) -> None:
    image_dir, ann, folds = _write_set(tmp_path)
    before = {p.name: p.read_bytes() for p in image_dir.iterdir()}
    out_dir = tmp_path / "background"
    excluded = ann["NAME"].iloc[0]
    table = make_background_set(ann, image_dir, folds, out_dir, n_images=4, seed=1, exclude=[excluded], workers=2)
    assert list(table.columns) == list(BACKGROUND_COLUMNS)
    assert table["NAME"].nunique() == 4 and excluded not in set(table["source_name"])
    # one row per painted box, each with its source image's fold
    for name, group in table.groupby("source_name"):
        assert len(group) == (ann["NAME"] == name).sum()
        assert (group["fold"] == folds.set_index("NAME").loc[name, "fold"]).all()
        assert (group["NAME"] == background_name(name)).all()
    for name in table["NAME"].unique():
        assert (out_dir / "images" / name).is_file()
    assert {p.name: p.read_bytes() for p in image_dir.iterdir()} == before  # originals untouched
    pd.testing.assert_frame_equal(read_background(out_dir / "background.csv"), table, check_dtype=False)
    # deterministic for a seed
    again = make_background_set(ann, image_dir, folds, tmp_path / "again", n_images=4, seed=1, exclude=[excluded])
    pd.testing.assert_frame_equal(again, table)
    single = make_background_set(ann, image_dir, folds, tmp_path / "single", n_images=2, max_cells=1)
    assert single.groupby("source_name").size().eq(1).all()
    with pytest.raises(CytologiaInputError, match="candidate"):
        make_background_set(ann, image_dir, folds, tmp_path / "x", n_images=7)


def test_background_rows_for_detector_and_classifier(tmp_path: Path) -> None:
    image_dir, ann, folds = _write_set(tmp_path, n=3)
    table = make_background_set(ann, image_dir, folds, tmp_path / "bg", n_images=3)
    neg = detector_negatives(table)
    assert list(neg.columns) == ["NAME", "fold"] and neg["NAME"].is_unique and len(neg) == 3
    rows = as_annotations(table)
    assert list(rows.columns) == list(ANNOTATION_COLUMNS)
    assert (rows["class"] == BACKGROUND).all() and BACKGROUND in labels(background=True)
    assert (rows["box_id"] < 0).all() and rows["box_id"].is_unique
