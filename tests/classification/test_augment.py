"""Augmentation: 2.x argument names are checked, the bbox-aware rotation keeps the cell, MixUp/CutMix targets."""

from __future__ import annotations

import warnings

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from cytologia.classification.augment import (
    STRENGTHS,
    BBoxAwareRotate,
    build_transforms,
    check_arguments,
    fill_region,
    mixup_cutmix,
    rotate_cell,
)
from cytologia.errors import CytologiaInputError

BACKGROUND = (225, 205, 215)
CELL = (150, 60, 170)
NUCLEUS = (60, 20, 110)


def _cell_crop(size: int = 96, box: tuple[int, int, int, int] = (20, 20, 76, 76)) -> np.ndarray:
    """A flat background with an elliptical cell filling ``box`` and a nucleus on its right side."""
    img = np.full((size, size, 3), BACKGROUND, np.uint8)
    x1, y1, x2, y2 = box
    centre = ((x1 + x2) // 2, (y1 + y2) // 2)
    cv2.ellipse(img, centre, ((x2 - x1) // 2 - 1, (y2 - y1) // 2 - 1), 0, 0, 360, CELL, -1)
    cv2.circle(img, (x2 - (x2 - x1) // 4, centre[1]), max(2, (y2 - y1) // 8), NUCLEUS, -1)
    return img


def _is(img: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> np.ndarray:
    return (np.abs(img.astype(int) - colour) <= tol).all(axis=2)


# ------------------------------------------------------------------------------------------------------ pipelines
@pytest.mark.parametrize("strength", STRENGTHS)
def test_pipelines_run_without_warnings(strength: str) -> None:
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 1.4 argument name would warn in albumentations 2.x
        train = build_transforms(48, True, strength=strength)
        evaluate = build_transforms(48, False)
    train.set_random_seed(1)
    for _ in range(5):
        out = train(image=crop, cell_box=np.array([8.0, 8.0, 40.0, 40.0]))["image"]
        assert out.shape == crop.shape and out.dtype == np.uint8
    assert np.array_equal(evaluate(image=crop)["image"], crop)


def test_hue_saturation_off_by_default_and_options_checked() -> None:
    names = [type(t).__name__ for t in build_transforms(32, True).transforms]
    assert "HueSaturationValue" not in names and names[0] == "BBoxAwareRotate"
    assert "HueSaturationValue" in [
        type(t).__name__ for t in build_transforms(32, True, hue_saturation=True).transforms
    ]
    with pytest.raises(CytologiaInputError, match="strength"):
        build_transforms(32, True, strength="wild")
    with pytest.raises(CytologiaInputError, match="bbox_aware_p"):
        build_transforms(32, True, bbox_aware_p=2.0)


def test_old_argument_names_are_caught() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = A.GaussNoise(var_limit=(10.0, 50.0))  # the 1.4 name: albumentations 2.x only warns and ignores it
    with pytest.raises(CytologiaInputError, match="var_limit"):
        check_arguments([A.HorizontalFlip(), A.Compose([old])])


def test_seeded_pipeline_is_reproducible() -> None:
    crop = _cell_crop(64, (12, 12, 52, 52))
    a, b = build_transforms(64, True), build_transforms(64, True)
    a.set_random_seed(7)
    b.set_random_seed(7)
    outs = [(a(image=crop)["image"], b(image=crop)["image"]) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in outs)


def test_geometric_jitter_keeps_the_cell_inside() -> None:
    """A cell with the default 16 px margin around a 100 px box (12 % of the crop per side) never leaves the crop
    under the training pipeline's geometric part."""
    size = 132
    crop = _cell_crop(size, (16, 16, 116, 116))
    area = _is(crop, CELL, 40).sum() + _is(crop, NUCLEUS, 40).sum()
    photometric = (A.GaussNoise, A.CoarseDropout, A.RandomBrightnessContrast)
    steps = build_transforms(size, True, strength="strong").transforms
    geometric = A.Compose([t for t in steps if not isinstance(t, photometric)])
    geometric.set_random_seed(0)
    for _ in range(30):
        out = geometric(image=crop, cell_box=np.array([16.0, 16.0, 116.0, 116.0]))["image"]
        cell = _is(out, CELL, 40) | _is(out, NUCLEUS, 40)
        edge = np.concatenate([cell[0], cell[-1], cell[:, 0], cell[:, -1]])
        assert not edge.any() and cell.sum() > 0.6 * area  # zoom-out to 0.85 leaves 0.72 of the area


# ---------------------------------------------------------------------------------------------- bbox-aware rotate
def test_rotation_keeps_the_cell_and_moves_the_nucleus() -> None:
    crop = _cell_crop()
    before = _is(crop, CELL) | _is(crop, NUCLEUS)
    out = rotate_cell(crop, (20, 20, 76, 76), 180.0)
    after = _is(out, CELL) | _is(out, NUCLEUS)
    assert abs(int(after.sum()) - int(before.sum())) <= 0.03 * before.sum()
    # 180 degrees about the box centre (48, 48): the nucleus moves from x ~ 62 to x ~ 34.
    assert _is(crop[48:49, 60:65], NUCLEUS).all() and _is(out[48:49, 31:36], NUCLEUS).all()
    assert _is(out[48:49, 60:65], CELL).all()
    far = np.ones(before.shape, bool)
    far[14:82, 14:82] = False
    assert np.array_equal(out[far], crop[far])  # the background away from the cell is untouched


def test_rotation_fills_the_vacated_area_with_background() -> None:
    crop = _cell_crop(96, (18, 36, 78, 60))  # a wide cell; turned 90 degrees it leaves its left and right ends
    out = rotate_cell(crop, (18, 36, 78, 60), 90.0)
    vacated = (_is(crop, CELL) | _is(crop, NUCLEUS)) & ~(_is(out, CELL, 40) | _is(out, NUCLEUS, 40))
    assert vacated.sum() > 200
    assert _is(out, BACKGROUND, 6)[vacated].mean() > 0.97  # filled from the background, no black or cell colour


def test_rotation_shrinks_instead_of_cutting_the_cell() -> None:
    box = (4, 50, 92, 82)  # a wide cell low in the crop: turned 90 degrees about its centre it spans y 22..110
    crop = _cell_crop(96, box)
    out = rotate_cell(crop, box, 90.0)
    cell = _is(out, CELL, 40) | _is(out, NUCLEUS, 40)
    # Shrunk by (96 - 66) / (44 + 3) = 0.64 (its area by 0.41), not cut: no cell pixel on the border.
    assert cell.sum() > 0.3 * (_is(crop, CELL) | _is(crop, NUCLEUS)).sum()
    assert not np.concatenate([cell[0], cell[-1], cell[:, 0], cell[:, -1]]).any()
    # The check can fail: a plain rotation of the same crop about the same centre cuts the cell at the bottom.
    m = cv2.getRotationMatrix2D((47.5, 65.5), 90.0, 1.0)
    plain = cv2.warpAffine(crop, m, (96, 96), borderMode=cv2.BORDER_CONSTANT)
    assert _is(plain, CELL, 40)[-1].any()


def test_transform_reads_cell_box_or_falls_back_to_the_centre() -> None:
    crop = _cell_crop(96, (10, 10, 86, 86))
    t = A.Compose([BBoxAwareRotate(limit=(90.0, 90.0), p=1.0)])
    with_box = t(image=crop, cell_box=np.array([10.0, 10.0, 86.0, 86.0]))["image"]
    assert np.array_equal(with_box, rotate_cell(crop, (10, 10, 86, 86), 90.0))
    fallback = t(image=crop)["image"]  # centre minus 10 % per side: 9.6 .. 86.4
    assert np.array_equal(fallback, rotate_cell(crop, (9.6, 9.6, 86.4, 86.4), 90.0))
    assert not np.array_equal(fallback, crop)
    with pytest.raises(ValueError):
        BBoxAwareRotate(margin_fraction=0.7)


def test_fill_region_is_smooth() -> None:
    ys, xs = np.mgrid[0:100, 0:120]
    ramp = np.dstack([xs * 2, ys * 2, xs + ys]).astype(np.uint8)
    mask = np.zeros((100, 120), bool)
    mask[30:70, 40:80] = True
    filled = fill_region(ramp, mask)
    assert np.array_equal(filled[~mask], ramp[~mask])
    assert np.abs(filled[mask].astype(int) - ramp[mask]).mean() < 4  # a linear ramp is continued, roughly
    flat = np.full((40, 40, 3), BACKGROUND, np.uint8)
    hole = np.zeros((40, 40), bool)
    hole[5:35, 2:38] = True
    flat[hole] = 0
    assert (fill_region(flat, hole) == BACKGROUND).all()


# -------------------------------------------------------------------------------------------------- mixup, cutmix
def test_mixup_matches_its_targets() -> None:
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(0)
    mixed, soft = mixup_cutmix(x, y, 5, alpha_mixup=0.8, alpha_cutmix=0.0, generator=g)
    lam = soft[0, 0].item()
    assert 0 < lam < 1 and soft[0, 3].item() == pytest.approx(1 - lam)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(soft.sum(1), torch.ones(4))


def test_cutmix_lambda_is_the_pasted_area() -> None:
    x = torch.zeros(2, 1, 16, 16)
    x[1] = 1.0
    y = torch.tensor([0, 1])
    for seed in range(5):
        mixed, soft = mixup_cutmix(
            x, y, 2, alpha_mixup=0.0, alpha_cutmix=1.0, generator=torch.Generator().manual_seed(seed)
        )
        pasted = mixed[0].mean().item()  # share of sample 0 now showing sample 1
        assert soft[0, 1].item() == pytest.approx(pasted) and soft[1, 0].item() == pytest.approx(pasted)


def test_mixup_cutmix_options_and_reproducibility() -> None:
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    same = mixup_cutmix(x, y, 3, prob=0.0)
    assert same[0] is x and torch.equal(same[1], torch.nn.functional.one_hot(y, 3).float())
    a = mixup_cutmix(x, y, 3, generator=torch.Generator().manual_seed(3))
    b = mixup_cutmix(x, y, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    soft_in = torch.softmax(torch.randn(6, 3), 1)
    _, soft_out = mixup_cutmix(x, soft_in, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(soft_out.sum(1), torch.ones(6))
    with pytest.raises(CytologiaInputError, match="0..2"):
        mixup_cutmix(x, torch.tensor([0, 1, 2, 3, 0, 1]), 3)
    with pytest.raises(CytologiaInputError, match="columns"):
        mixup_cutmix(x, torch.rand(6, 4), 3)
