"""Hygiene: box clipping, perceptual hashes, pigeonhole near pairs, duplicate groups (exact / near, train / test)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cytologia.data.hygiene import (
    DUPLICATE_COLUMNS,
    EXACT,
    NEAR,
    clip_boxes,
    duplicate_summary,
    find_duplicates,
    near_pairs,
    perceptual_hash,
    popcount64,
)
from cytologia.errors import CytologiaInputError


def textured(seed: int, w: int = 120, h: int = 112) -> np.ndarray:
    """A smooth random colour image; different seeds give unrelated images."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def save_jpeg(path: Path, image: np.ndarray, quality: int = 90) -> Path:
    assert cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return path


# -------------------------------------------------------------------------------------------------------- clipping
def test_clip_boxes_to_header_sizes() -> None:
    table = pd.DataFrame(
        {
            "NAME": ["a.jpg", "a.jpg", "b.jpg", "c.jpg", "a.jpg"],
            "x1": [10.0, -5.0, 150.0, -20.0, 0.0],
            "y1": [10.0, -3.0, 10.0, -20.0, 0.0],
            "x2": [50.0, 120.0, 200.0, 30.0, 100.0],
            "y2": [50.0, 90.0, 50.0, 30.0, 80.0],
        }
    )
    sizes = pd.DataFrame({"NAME": ["a.jpg", "b.jpg"], "img_w": [100, 120], "img_h": [80, 60]})
    out = clip_boxes(table, sizes)
    assert out[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [
        [10, 10, 50, 50],  # inside: unchanged
        [0, 0, 100, 80],  # past every border: clipped to the image
        [120, 10, 120, 50],  # right of the image: empty
        [-20, -20, 30, 30],  # c.jpg has no known size: left as read
        [0, 0, 100, 80],  # exactly the image: not "clipped"
    ]
    assert out["clipped"].tolist() == [False, True, True, False, False]
    assert out["empty"].tolist() == [False, False, True, False, False]
    assert out["img_w"].tolist() == [100, 100, 120, -1, 100]
    assert table["x1"].tolist()[1] == -5.0  # the input is not modified
    same = clip_boxes(table, {"a.jpg": (100, 80), "b.jpg": (120, 60)})
    pd.testing.assert_frame_equal(same, out)
    with pytest.raises(ValueError, match="no sizes"):
        clip_boxes(table)


# ---------------------------------------------------------------------------------------------------------- hashes
def brute_force_pairs(h: np.ndarray, t: int) -> set[tuple[int, int]]:
    d = popcount64((h[:, None] ^ h[None, :]).ravel()).reshape(len(h), len(h))
    i, j = np.nonzero(np.triu(d <= t, 1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("threshold", [0, 1, 3, 4, 7])
def test_near_pairs_matches_all_pairs(threshold: int) -> None:
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**63, 120, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    hashes = [base]
    for flips in range(threshold + 3):  # planted neighbours at distances around the threshold
        bits = np.array([rng.choice(64, flips, replace=False) for _ in range(40)], dtype=np.uint64).reshape(40, flips)
        masks = np.bitwise_or.reduce(np.uint64(1) << bits, axis=1) if flips else np.zeros(40, np.uint64)
        hashes.append(base[:40] ^ masks)
    h = np.concatenate(hashes)
    i, j = near_pairs(h, threshold)
    assert set(zip(i.tolist(), j.tolist())) == brute_force_pairs(h, threshold)
    assert (i < j).all()


def test_near_pairs_rejects_silly_thresholds() -> None:
    with pytest.raises(ValueError):
        near_pairs(np.zeros(3, np.uint64), 40)


def test_phash_is_stable_under_reencoding(tmp_path: Path) -> None:
    a = perceptual_hash(save_jpeg(tmp_path / "a.jpg", textured(1), 95))
    b = perceptual_hash(save_jpeg(tmp_path / "b.jpg", textured(1), 60))
    c = perceptual_hash(save_jpeg(tmp_path / "c.jpg", textured(2), 95))
    assert bin(a ^ b).count("1") <= 4 < bin(a ^ c).count("1")
    with pytest.raises(CytologiaInputError, match="nope.jpg"):
        perceptual_hash(tmp_path / "nope.jpg")


# ------------------------------------------------------------------------------------------------------ duplicates
def with_comment(jpeg: bytes) -> bytes:
    """Same JPEG with a COM segment after SOI: different bytes, identical pixels."""
    text = b"re-saved by a scanner"
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


@pytest.fixture()
def dup_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    base = textured(10)
    a = save_jpeg(folder / "a.jpg", base, 90)
    (folder / "a_copy.jpg").write_bytes(a.read_bytes())  # byte-identical
    (folder / "a_meta.jpg").write_bytes(with_comment(a.read_bytes()))  # other bytes, same pixels
    cv2.imwrite(str(folder / "a_png.png"), cv2.imread(str(a)))  # same pixels, another format
    brighter = cv2.convertScaleAbs(base, alpha=1.0, beta=6)
    save_jpeg(folder / "a_near.jpg", brighter, 70)  # re-encoded at another quality, slightly brightened
    for k in range(4):
        save_jpeg(folder / f"other{k}.jpg", textured(100 + k), 90)
    save_jpeg(folder / "b.jpg", textured(20), 90)
    (folder / "b_test.jpg").write_bytes((folder / "b.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def test_find_duplicates_exact_and_near(dup_folder: Path) -> None:
    train = ["a.jpg", "other0.jpg", "a_copy.jpg", "a_meta.jpg", "a_png.png", "a_near.jpg", "other1.jpg", "b.jpg"]
    test = ["other2.jpg", "b_test.jpg", "other3.jpg", "broken.jpg"]
    dups = find_duplicates(dup_folder, train, near_threshold=4, test_names=test, workers=2)
    assert tuple(dups.columns) == DUPLICATE_COLUMNS
    assert dups["NAME"].tolist() == train + test
    assert dups["split"].tolist() == ["train"] * len(train) + ["test"] * len(test)
    d = dups.set_index("NAME")
    group_a = d.loc["a.jpg", "dup_group"]
    assert group_a >= 0
    for name in ("a_copy.jpg", "a_meta.jpg", "a_png.png"):
        assert d.loc[name, "dup_group"] == group_a and d.loc[name, "kind"] == EXACT, name
    assert d.loc["a.jpg", "kind"] == EXACT
    assert d.loc["a_near.jpg", "dup_group"] == group_a and d.loc["a_near.jpg", "kind"] == NEAR
    assert d.loc["a.jpg", "group_split"] == "train"
    assert d.loc["b.jpg", "dup_group"] == d.loc["b_test.jpg", "dup_group"] >= 0
    assert d.loc["b.jpg", "group_split"] == "train-test" and d.loc["b.jpg", "kind"] == EXACT
    for name in ("other0.jpg", "other1.jpg", "other2.jpg", "other3.jpg", "broken.jpg"):
        assert d.loc[name, "dup_group"] == -1 and d.loc[name, "kind"] == "" and d.loc[name, "group_split"] == "", name
    assert not d.loc["broken.jpg", "readable"] and d.loc["broken.jpg", "phash"] == ""
    assert sorted(dups.loc[dups["dup_group"] >= 0, "dup_group"].unique().tolist()) == [0, 1]  # numbered 0..G-1

    summary = duplicate_summary(dups)
    assert summary == {
        "images": 12,
        "unreadable": 1,
        "groups": 2,
        "exact_groups": 1,  # b / b_test; the a-group holds a near member
        "near_groups": 1,
        "images_in_groups": 7,
        "train_only_groups": 1,
        "train_test_groups": 1,
        "test_only_groups": 0,
        "train_removable": 4,
    }
    # The folds command's use: NAME -> group
    assert dups.set_index("NAME")["dup_group"].loc["a_copy.jpg"] == group_a


def test_find_duplicates_exact_only_and_thresholds(dup_folder: Path) -> None:
    names = ["a.jpg", "a_copy.jpg", "a_near.jpg", "other0.jpg"]
    exact_only = find_duplicates(dup_folder, names, near_threshold=None).set_index("NAME")
    assert exact_only.loc["a_copy.jpg", "dup_group"] == exact_only.loc["a.jpg", "dup_group"] >= 0
    assert exact_only.loc["a_near.jpg", "dup_group"] == -1
    none = find_duplicates(dup_folder, ["other0.jpg", "other1.jpg", "other2.jpg"])
    assert (none["dup_group"] == -1).all() and (none["kind"] == "").all()
    assert duplicate_summary(none)["groups"] == 0
    with pytest.raises(CytologiaInputError, match="repeat"):
        find_duplicates(dup_folder, ["a.jpg", "a.jpg"])
    with pytest.raises(ValueError, match="near_threshold"):
        find_duplicates(dup_folder, names, near_threshold=64)


def test_find_duplicates_test_folder(tmp_path: Path) -> None:
    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    train_dir.mkdir()
    test_dir.mkdir()
    save_jpeg(train_dir / "x.jpg", textured(5))
    save_jpeg(test_dir / "x.jpg", textured(5))  # same name, same pixels, another folder
    dups = find_duplicates(train_dir, ["x.jpg"], test_names=["x.jpg"], test_dir=test_dir)
    assert dups["dup_group"].tolist() == [0, 0] and dups["group_split"].tolist() == ["train-test"] * 2


@pytest.mark.bench
def test_bench_find_duplicates_throughput(tmp_path: Path) -> None:
    """~500 generated 368 px images, 10 % of them exact copies and 10 % near copies: images per second."""
    n = 500
    rng = np.random.default_rng(0)
    for k in range(n):
        if k % 10 == 1:
            (tmp_path / f"{k}.jpg").write_bytes((tmp_path / f"{k - 1}.jpg").read_bytes())
        elif k % 10 == 2:
            save_jpeg(tmp_path / f"{k}.jpg", cv2.convertScaleAbs(textured(k - 2, 368, 368), beta=5), 75)
        else:
            img = textured(k, 368, 368)
            img = cv2.add(img, rng.integers(0, 8, img.shape, dtype=np.uint8))  # sensor-like noise
            save_jpeg(tmp_path / f"{k}.jpg", img, 90)
    names = [f"{k}.jpg" for k in range(n)]
    start = time.perf_counter()
    dups = find_duplicates(tmp_path, names)
    seconds = time.perf_counter() - start
    print(f"\nfind_duplicates: {n} images of 368 px in {seconds:.2f} s = {n / seconds:.0f} images/s")
    summary = duplicate_summary(dups)
    assert summary["groups"] == n // 10
