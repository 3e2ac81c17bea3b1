"""Crops: pixel windows without off-by-one, resize rules, labels of detected boxes by GIoU, the crop dataset."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from cytologia.classification.crops import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropDataset,
    crop_and_locate,
    crop_box_with_margin,
    crop_with_margin,
    label_boxes_from_truth,
    resize_interpolation,
)
from cytologia.data.schema import labels
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.metrics import giou_pairs


def _coords(h: int, w: int) -> np.ndarray:
    """uint8 image whose channel 0 is x and channel 1 is y (for h, w <= 256)."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.dstack([xs, ys, np.zeros_like(xs)]).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------- windows
def test_window_integer_box_and_margin() -> None:
    assert crop_box_with_margin((10, 10, 20, 20), 0, 100, 100) == (10, 10, 20, 20)
    assert crop_box_with_margin((10, 10, 20, 20), 16, 100, 100) == (0, 0, 36, 36)  # clipped at 0
    assert crop_box_with_margin((70, 80, 95, 99), 16, 100, 100) == (54, 64, 100, 100)  # clipped at w/h
    assert crop_box_with_margin((-30, -5, 40, 120), 4, 100, 100) == (0, 0, 44, 100)  # real boxes past the border


def test_window_float_corners_round_outwards() -> None:
    assert crop_box_with_margin((10.2, 10.9, 19.1, 19.9), 0, 100, 100) == (10, 10, 20, 20)
    assert crop_box_with_margin((10.0, 10.0, 19.0001, 20.0), 0, 100, 100) == (10, 10, 20, 20)
    assert crop_box_with_margin((10.5, 10.5, 20.5, 20.5), 2.5, 100, 100) == (8, 8, 23, 23)


def test_window_matches_pixel_set_definition() -> None:
    """Pixel i is in the window iff its open square (i, i+1) meets the open grown box (x1 - m, x2 + m) and the
    image: checked against that definition on random float boxes."""
    rng = np.random.default_rng(0)
    w, h = 37, 29
    for _ in range(300):
        x1, x2 = np.sort(rng.uniform(-10, w + 10, 2))
        y1, y2 = np.sort(rng.uniform(-10, h + 10, 2))
        m = float(rng.choice([0, 1.5, 3]))
        wx1, wy1, wx2, wy2 = crop_box_with_margin((x1, y1, x2, y2), m, w, h)
        xs = [i for i in range(w) if i < x2 + m and i + 1 > x1 - m]
        ys = [j for j in range(h) if j < y2 + m and j + 1 > y1 - m]
        if xs and ys:
            assert (wx1, wx2, wy1, wy2) == (xs[0], xs[-1] + 1, ys[0], ys[-1] + 1)
        assert 0 <= wx1 < wx2 <= w and 0 <= wy1 < wy2 <= h  # never empty, always inside


@pytest.mark.parametrize(
    "box, expected",
    [
        ((50, 50, 50, 50), (50, 50, 51, 51)),  # zero-size box: one pixel
        ((150, 10, 160, 20), (99, 10, 100, 20)),  # right of the image: the last column
        ((-20, -20, -10, -10), (0, 0, 1, 1)),  # above-left: the first pixel
        ((100, 100, 100, 100), (99, 99, 100, 100)),  # on the far corner
    ],
)
def test_window_never_empty(box: tuple[float, ...], expected: tuple[int, ...]) -> None:
    assert crop_box_with_margin(box, 0, 100, 100) == expected


@pytest.mark.parametrize(
    "box, margin, match",
    [
        ((10, 10, 5, 20), 0, "inverted"),
        ((10, float("nan"), 20, 20), 0, "finite"),
        ((10, 10, 20), 0, "4 values"),
        ((10, 10, 20, 20), -1, "margin"),
    ],
)
def test_window_rejects_bad_input(box: tuple[float, ...], margin: float, match: str) -> None:
    with pytest.raises(CytologiaInputError, match=match):
        crop_box_with_margin(box, margin, 100, 100)


# --------------------------------------------------------------------------------------------------------- crops
def test_crop_native_size_holds_the_window_pixels() -> None:
    image = _coords(60, 80)
    crop = crop_with_margin(image, (10.5, 20, 30, 40.2), 5, None)
    assert crop.shape == (31, 30, 3)  # x: floor(5.5) = 5 .. 35 (exclusive); y: 15 .. ceil(45.2) = 46
    assert tuple(crop[0, 0, :2]) == (5, 15) and tuple(crop[-1, -1, :2]) == (34, 45)


def test_crop_resized_and_cell_box_located() -> None:
    image = np.full((120, 160, 3), 20, np.uint8)
    image[40:80, 50:110] = 250  # the cell fills its box (x 50..110, y 40..80)
    crop, cell = crop_and_locate(image, (50, 40, 110, 80), 16, 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    # window x 34..126 (92 px), y 24..96 (72 px): the cell box scales by 64/92, 64/72
    np.testing.assert_allclose(cell, [16 * 64 / 92, 16 * 64 / 72, 76 * 64 / 92, 56 * 64 / 72])
    x1, y1, x2, y2 = cell
    inner = crop[math.ceil(y1) + 1 : math.floor(y2) - 1, math.ceil(x1) + 1 : math.floor(x2) - 1]
    assert (inner == 250).all()
    assert (crop[: math.floor(y1) - 1] == 20).all() and (crop[:, math.ceil(x2) + 1 :] == 20).all()


def test_interpolation_rule() -> None:
    assert resize_interpolation(300, 300, 224) == cv2.INTER_AREA
    assert resize_interpolation(100, 120, 224) == cv2.INTER_LINEAR
    image = np.zeros((400, 400, 3), np.uint8)
    image[::2] = 255  # stripes: area averaging gives grey, linear sampling would alias to black/white bands
    shrunk = crop_with_margin(image, (0, 0, 400, 400), 0, 100)
    assert np.abs(shrunk.astype(int) - 127).max() <= 1


def test_keep_aspect_pads_with_border_colour() -> None:
    image = np.full((100, 200, 3), (200, 150, 100), np.uint8)
    image[40:60, 60:140] = (10, 10, 10)  # a wide dark cell
    crop, cell = crop_and_locate(image, (60, 40, 140, 60), 10, 50, keep_aspect=True)
    assert crop.shape == (50, 50, 3)
    # window 100 x 40 px -> padded to 100 x 100 (30 px top and bottom) -> scaled by 0.5
    np.testing.assert_allclose(cell, [5, 20, 45, 30])
    assert (crop[:14] == (200, 150, 100)).all() and (crop[36:] == (200, 150, 100)).all()
    assert (crop[22:28, 8:42] == 10).all()
    plain = crop_with_margin(image, (60, 40, 140, 60), 10, 50)
    assert (plain[20:30, 10:40] == 10).all()  # default: stretched, the cell fills the middle rows


# ------------------------------------------------------------------------------------------------ labels by GIoU
def test_label_boxes_from_truth_by_best_giou() -> None:
    truth = pd.DataFrame(
        {
            "NAME": ["a.jpg", "a.jpg", "b.jpg"],
            "box_id": [7, 8, 9],
            "x1": [0, 50, 10],
            "y1": [0, 50, 10],
            "x2": [40, 90, 30],
            "y2": [40, 90, 30],
            "class": ["LY", "PNN", "EO"],
        }
    )
    boxes = pd.DataFrame(
        {
            "NAME": ["a.jpg", "a.jpg", "b.jpg", "c.jpg", "a.jpg", "a.jpg"],
            "x1": [2, 48, 0, 0, 35, 30],
            "y1": [1, 52, 0, 0, 35, 30],
            "x2": [41, 88, 100, 10, 65, 60],
            "y2": [38, 91, 100, 10, 65, 60],
            "score": [0.9, 0.8, 0.3, 0.5, 0.1, 0.1],
        }
    )
    out = label_boxes_from_truth(boxes, truth)
    assert out["class"].isna().tolist() == [False, False, False, True, False, False]
    assert out["class"].fillna("").tolist() == ["LY", "PNN", "EO", "", "PNN", "LY"]
    assert out["truth_box_id"].tolist() == [7, 8, 9, -1, 8, 7]
    assert out["box_id"].tolist() == [0, 1, 2, 3, 4, 5] and out["score"].tolist() == boxes["score"].tolist()
    expected = giou_pairs(
        boxes.loc[[0, 1, 2], ["x1", "y1", "x2", "y2"]].to_numpy(), truth.iloc[[0, 1, 2], 2:6].to_numpy()
    )
    np.testing.assert_allclose(out["giou"].to_numpy()[:3], expected)
    assert np.isnan(out["giou"].iloc[3])
    # Box 4 straddles both truth boxes of a.jpg and takes the better one (GIoU -0.149 vs -0.404 by hand); box 5 is
    # symmetric between them (a tie) and takes the first truth row.
    g = giou_pairs(np.array([[35, 35, 65, 65]] * 2, float), truth.iloc[:2, 2:6].to_numpy(float))
    np.testing.assert_allclose(g, [0.0101 - 1750 / 4225, 225 / 2275 - 750 / 3025], atol=1e-4)
    assert out["giou"].iloc[4] == pytest.approx(g[1])
    tie = giou_pairs(np.array([[30, 30, 60, 60]] * 2, float), truth.iloc[:2, 2:6].to_numpy(float))
    assert tie[0] == tie[1]


def test_label_boxes_from_truth_without_box_id_and_bad_rows() -> None:
    truth = pd.DataFrame({"NAME": ["a"], "x1": [0], "y1": [0], "x2": [5], "y2": [5], "class": ["M"]})
    boxes = pd.DataFrame({"NAME": ["a"], "box_id": [42], "x1": [0], "y1": [0], "x2": [5], "y2": [5]})
    out = label_boxes_from_truth(boxes, truth)
    assert out["truth_box_id"].tolist() == [0] and out["box_id"].tolist() == [42] and out["giou"].iloc[0] == 1.0
    bad = boxes.assign(x2=[-1.0])
    with pytest.raises(ValidationError, match="row 1"):
        label_boxes_from_truth(bad, truth)
    with pytest.raises(CytologiaInputError, match="class"):
        label_boxes_from_truth(boxes, truth.drop(columns="class"))


# ------------------------------------------------------------------------------------------------------- dataset
def _write_images(folder: Path) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    a = np.zeros((60, 80, 3), np.uint8)
    a[:] = (30, 60, 90)  # BGR on disk
    b = np.zeros((50, 50, 3), np.uint8)
    b[:] = (200, 100, 0)
    cv2.imwrite(str(folder / "a.png"), a)  # PNG: lossless, exact pixel checks
    cv2.imwrite(str(folder / "b.png"), b)
    return pd.DataFrame(
        {
            "NAME": ["a.png", "b.png", "a.png"],
            "box_id": [0, 1, 5],
            "x1": [10, 5, 0],
            "y1": [10, 5, 0],
            "x2": [40, 25, 80],
            "y2": [30, 45, 60],
            "class": ["LY", None, "background"],
        }
    )


def test_dataset_items(tmp_path: Path) -> None:
    table = _write_images(tmp_path / "img")
    ds = CropDataset(table, tmp_path / "img", labels(background=True), img_size=32, margin=4)
    assert len(ds) == 3
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    rgb = np.array([90, 60, 30]) / 255.0  # converted from BGR
    expected = (rgb - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(item["image"].mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    assert item["label"].item() == labels().index("LY") and item["label"].dtype == torch.int64
    assert ds[1]["label"].item() == -1 and ds[2]["label"].item() == 23  # no class / background (24th label)
    assert ds[2]["box_id"].item() == 5 and ds[2]["index"].item() == 2 and ds[-1]["index"].item() == 2
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["label"].tolist() == [10, -1, 23]
    with pytest.raises(IndexError):
        ds[3]


def test_dataset_errors_name_rows_and_files(tmp_path: Path) -> None:
    table = _write_images(tmp_path / "img")
    with pytest.raises(ValidationError, match=r"row 3.*'background'"):
        CropDataset(table, tmp_path / "img", labels(), img_size=32)  # no background label in a 23-class model
    with pytest.raises(CytologiaInputError, match="box_id"):
        CropDataset(table.drop(columns="box_id"), tmp_path / "img", labels(True), img_size=32)
    with pytest.raises(CytologiaInputError, match="cache"):
        CropDataset(table, tmp_path / "img", labels(True), img_size=32, cache="disk")
    ds = CropDataset(table.assign(NAME=["a.png", "gone.png", "a.png"]), tmp_path / "img", labels(True), img_size=32)
    with pytest.raises(CytologiaInputError, match=r"row 2 \(NAME='gone.png'\).*gone.png: image file not found"):
        ds[1]


def test_dataset_memory_cache_is_lru_bounded(tmp_path: Path) -> None:
    table = _write_images(tmp_path / "img")
    ds = CropDataset(table, tmp_path / "img", labels(True), img_size=16, cache="memory", cache_images=1)
    first = ds[0]["image"]
    (tmp_path / "img" / "a.png").unlink()
    assert torch.equal(ds[2]["image"][:, 0, 0], first[:, 0, 0])  # a.png served from the cache
    ds[1]  # b.png evicts a.png (one image at most)
    assert list(ds._cache) == ["b.png"]
    with pytest.raises(CytologiaInputError, match="a.png"):
        ds[0]


def test_dataset_reads_repaired_copy_and_applies_transform(tmp_path: Path) -> None:
    from cytologia.classification.augment import build_transforms

    table = _write_images(tmp_path / "img")
    repaired = tmp_path / "repaired"
    repaired.mkdir()
    cv2.imwrite(str(repaired / "b.png"), np.full((50, 50, 3), 255, np.uint8))
    ds = CropDataset(table, tmp_path / "img", labels(True), img_size=24, repair_dir=repaired)
    assert ds.image_path("b.png") == repaired / "b.png"
    assert ds[1]["image"].max().item() == pytest.approx((1 - IMAGENET_MEAN[2]) / IMAGENET_STD[2], abs=1e-5)
    aug = CropDataset(table, tmp_path / "img", labels(True), img_size=24, transform=build_transforms(24, train=True))
    aug.reseed(3)
    assert aug[0]["image"].shape == (3, 24, 24)

    def resizing(**data: np.ndarray) -> dict[str, np.ndarray]:
        return {"image": cv2.resize(data["image"], (10, 10))}

    bad = CropDataset(table, tmp_path / "img", labels(True), img_size=24, transform=resizing)
    with pytest.raises(CytologiaInputError, match="size"):
        bad[0]
