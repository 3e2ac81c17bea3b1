"""Augmentation: letterbox mapping, box transforms (affine as ellipses, flips, mosaic, mixup), the dataset's samples."""

from __future__ import annotations

import numpy as np
import pytest

from cytologia.detection.yolox.augment import (
    AugmentConfig,
    DetectionDataset,
    Sample,
    affine_boxes,
    collate,
    flip,
    letterbox,
    mixup,
    mosaic,
    to_frame,
)

NO_AUG = AugmentConfig(mosaic_prob=0.0, mixup_prob=0.0, flip_lr=0.0, flip_ud=0.0, hsv_prob=0.0)


def test_letterbox_centres_and_maps_boxes() -> None:
    image = np.zeros((50, 100, 3), np.uint8)
    image[10:20, 30:40] = 255
    out, frame = letterbox(image, 64)
    assert out.shape == (64, 64, 3) and (frame.width, frame.height) == (100, 50)
    assert frame.gain_x == pytest.approx(0.64) and frame.pad_x == 0 and frame.pad_y == 16
    assert (out[:16] == 114).all() and (out[48:] == 114).all()
    box = to_frame(np.array([[30.0, 10.0, 40.0, 20.0]]), frame)
    np.testing.assert_allclose(box, [[19.2, 22.4, 25.6, 28.8]], atol=1e-4)
    x1, y1, x2, y2 = np.round(box[0]).astype(int)
    assert out[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].min() > 200  # the bright square is where the box says


def test_affine_boxes_follow_round_cells() -> None:
    box = np.array([[10.0, 20.0, 30.0, 60.0]])  # 20 x 40 centred at (20, 40)
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    np.testing.assert_allclose(affine_boxes(box, identity), box)
    quarter = np.array([[0.0, -1.0, 100.0], [1.0, 0.0, 0.0]])  # 90 degrees: (x, y) -> (100 - y, x)
    np.testing.assert_allclose(affine_boxes(box, quarter), [[40.0, 10.0, 80.0, 30.0]], atol=1e-5)
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    turn = np.array([[c, -s, 0.0], [s, c, 0.0]])
    square = np.array([[0.0, 0.0, 20.0, 20.0]])  # a round cell keeps its size when rotated (corners would give 28.3)
    moved = affine_boxes(square, turn)
    assert moved[0, 2] - moved[0, 0] == pytest.approx(20.0) and moved[0, 3] - moved[0, 1] == pytest.approx(20.0)


def test_flip_maps_boxes() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    cfg = AugmentConfig(flip_lr=1.0, flip_ud=1.0)
    _, boxes = flip(image, np.array([[2.0, 4.0, 10.0, 8.0]]), np.random.default_rng(0), cfg)
    np.testing.assert_allclose(boxes, [[22.0, 24.0, 30.0, 28.0]])


def test_mosaic_keeps_boxes_on_their_tiles() -> None:
    rng = np.random.default_rng(3)
    images = [np.full((40, 80, 3), 60 * k, np.uint8) for k in range(4)]
    boxes = [np.array([[10.0, 10.0, 30.0, 30.0]]) for _ in range(4)]
    canvas, out = mosaic(images, boxes, 64, rng)
    assert canvas.shape == (128, 128, 3)
    assert len(out) >= 1 and (out >= 0).all() and (out <= 128).all()
    for x1, y1, x2, y2 in out:  # every box covers image content (not the grey canvas)
        assert (canvas[int(y1) : int(y2), int(x1) : int(x2)] != 114).all()


def test_mixup_blends_and_adds_boxes() -> None:
    rng = np.random.default_rng(0)
    a = np.full((64, 64, 3), 200, np.uint8)
    b = np.full((64, 64, 3), 0, np.uint8)
    cfg = AugmentConfig(mixup_scale=(1.0, 1.0))
    out, boxes = mixup(a, np.array([[0.0, 0.0, 10.0, 10.0]]), b, np.array([[20.0, 20.0, 40.0, 40.0]]), rng, cfg)
    assert out.shape == a.shape and out.max() == 100  # 50/50 blend of 200 and 0
    assert len(boxes) == 2


def test_dataset_samples_are_seeded_and_well_formed(tiny_set) -> None:
    samples = [
        Sample(p, g[["x1", "y1", "x2", "y2"]].to_numpy(np.float32))
        for p, (_, g) in zip(tiny_set.paths, tiny_set.table.groupby("NAME", sort=True))
    ]
    ds = DetectionDataset(samples, 64, AugmentConfig(), seed=1)
    a_img, a_t = ds[3]
    b_img, b_t = ds[3]
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_t, b_t)
    ds.set_epoch(1, mosaic=True)
    assert not np.array_equal(ds[3][0], a_img)
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and t.shape[1] == 5
        assert (t[:, 0] == 0).all() and (t[:, 3:] > 0).all()
        assert (t[:, 1] - t[:, 3] / 2 >= -1e-3).all() and (t[:, 1] + t[:, 3] / 2 <= 64 + 1e-3).all()
    images, targets = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 64, 64) and len(targets) == 2


def test_without_augmentation_a_sample_is_the_letterbox(tiny_set) -> None:
    name = tiny_set.names[0]
    truth = tiny_set.table.loc[tiny_set.table["NAME"] == name, ["x1", "y1", "x2", "y2"]].to_numpy(np.float32)
    ds = DetectionDataset([Sample(tiny_set.image_dir / name, truth)], 64, NO_AUG)
    image, t = ds[0]
    from cytologia.data.images import decode

    expected, frame = letterbox(decode(tiny_set.image_dir / name), 64)
    np.testing.assert_array_equal(image, expected)
    boxes = to_frame(truth, frame)
    np.testing.assert_allclose(t[:, 1:3], (boxes[:, :2] + boxes[:, 2:]) / 2, atol=1e-4)
    with pytest.raises(ValueError, match="at least one"):
        DetectionDataset([], 64, NO_AUG)
