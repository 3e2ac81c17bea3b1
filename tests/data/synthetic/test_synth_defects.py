"""Every defect listed in noise.csv is really in the files, and nothing else is wrong with them."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cytologia.boxes import iou_scalar as box_iou
from cytologia.data.synthetic.defects import (
    EOI,
    DefectRates,
    draw_shift,
    insert_extraneous_bytes,
    jitter_box,
    shift_boxes,
    truncate_jpeg,
)
from cytologia.data.synthetic.generate import SynthConfig, generate
from cytologia.data.synthetic.render import encode_jpeg, render_scene

HIGH = DefectRates(
    box_jitter=0.2,
    past_border=0.15,
    red_cell=0.15,
    unannotated_border=0.15,
    exact_duplicate=0.06,
    near_duplicate=0.12,
    cross_split=0.4,
    truncated_jpeg=0.08,
    extraneous_bytes=0.08,
)
WARNING_RE = re.compile(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0xd9")


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    out = tmp_path_factory.mktemp("synth_noisy")
    generate(out, 50, seed=7, config=SynthConfig(size=192, defects=HIGH))
    read = lambda f: pd.read_csv(out / f, keep_default_na=False)  # noqa: E731
    return out, read("train.csv"), read("noise.csv"), read("test_labels.csv")


def _size(d: Path, name: str) -> tuple[int, int]:
    with Image.open(d / "images" / name) as im:  # header only: works on truncated files too
        return im.size


def _box(row: pd.Series) -> tuple[int, int, int, int]:
    return int(row.x1), int(row.y1), int(row.x2), int(row.y2)


def _nums(text: str, key: str) -> tuple[int, ...]:
    m = re.search(rf"{key}=(-?\d+(?: -?\d+)*)", text)
    assert m, (key, text)
    return tuple(int(v) for v in m.group(1).split())


def _kind(noise: pd.DataFrame, kind: str) -> pd.DataFrame:
    rows = noise[noise.kind == kind]
    assert len(rows) > 0, f"the fixture should inject at least one {kind}"
    return rows


def test_every_kind_is_injected_and_rows_point_at_train(noisy) -> None:
    d, train, noise, _ = noisy
    for _, r in noise.iterrows():
        if r.kind.startswith("duplicate_"):
            assert r.split in ("train", "test")
            continue
        assert r.split == "train"  # defects never touch test images
        if r.train_row != -1:
            assert 1 <= r.train_row <= len(train)
            assert train.NAME.iloc[r.train_row - 1] == r.NAME
            first = int(np.flatnonzero(train.NAME.to_numpy() == r.NAME)[0]) + 1
            assert r.train_row == first + r.box_index


def test_past_border_boxes_exceed_the_image(noisy) -> None:
    d, train, noise, _ = noisy
    for _, r in _kind(noise, "past_border").iterrows():
        w, h = _size(d, r.NAME)
        x1, y1, x2, y2 = _box(train.iloc[r.train_row - 1])
        assert x1 < 0 or y1 < 0 or x2 > w or y2 > h
        assert _box(r) == (max(x1, 0), max(y1, 0), min(x2, w), min(y2, h))  # truth = the clipped box
        assert _nums(r.details, "written") == (x1, y1, x2, y2)


def test_rows_without_defects_are_inside_the_image(noisy) -> None:
    d, train, noise, _ = noisy
    past = set(noise.train_row[noise.kind == "past_border"])
    for k, row in train.iterrows():
        if k + 1 in past:
            continue
        w, h = _size(d, row.NAME)
        assert 0 <= row.x1 < row.x2 <= w and 0 <= row.y1 < row.y2 <= h


def test_jittered_boxes_differ_from_the_truth(noisy) -> None:
    d, train, noise, _ = noisy
    for _, r in _kind(noise, "box_jitter").iterrows():
        written = _box(train.iloc[r.train_row - 1])
        assert written == _nums(r.details, "written")
        assert box_iou(written, _box(r)) < 0.85
        assert train["class"].iloc[r.train_row - 1] == r["class"]


def test_red_cell_boxes(noisy) -> None:
    d, train, noise, _ = noisy
    kinds = set(noise.kind)
    assert {"red_cell_extra", "red_cell_replace"} & kinds
    for _, r in noise[noise.kind == "red_cell_extra"].iterrows():
        assert _box(train.iloc[r.train_row - 1]) == _box(r)
        assert train["class"].iloc[r.train_row - 1] == r["class"]
    for _, r in noise[noise.kind == "red_cell_replace"].iterrows():
        rows = train[train.NAME == r.NAME]
        assert _box(train.iloc[r.train_row - 1]) == _nums(r.details, "red_cell")
        assert all(box_iou(_box(x), _box(r)) < 0.5 for _, x in rows.iterrows())  # the leukocyte lost its box
    # a red cell is a disc of ~90 px at 368 px: its box is square-ish and smaller than most leukocytes
    for _, r in noise[noise.kind.str.startswith("red_cell")].iterrows():
        x1, y1, x2, y2 = _nums(r.details, "red_cell") if r.kind == "red_cell_replace" else _box(r)
        assert abs((x2 - x1) - (y2 - y1)) <= 2


def test_unannotated_leukocytes_touch_the_border_and_have_no_row(noisy) -> None:
    d, train, noise, _ = noisy
    for _, r in _kind(noise, "unannotated_border").iterrows():
        w, h = _size(d, r.NAME)
        x1, y1, x2, y2 = _box(r)
        assert x1 == 0 or y1 == 0 or x2 == w or y2 == h
        assert r.train_row == -1
        rows = train[train.NAME == r.NAME]
        assert all(box_iou(_box(x), (x1, y1, x2, y2)) < 0.5 for _, x in rows.iterrows())


def test_truncated_jpegs_fail_a_strict_decode(noisy) -> None:
    d, _, noise, _ = noisy
    for _, r in _kind(noise, "truncated_jpeg").iterrows():
        data = (d / "images" / r.NAME).read_bytes()
        assert not data.endswith(EOI)
        assert len(data) == _nums(r.details, "kept")[0]
        with Image.open(d / "images" / r.NAME) as im, pytest.raises(OSError, match="truncated"):
            im.load()


def test_extraneous_bytes_decode_with_the_libjpeg_warning(noisy, capfd: pytest.CaptureFixture[str]) -> None:
    d, _, noise, _ = noisy
    for _, r in _kind(noise, "extraneous_bytes").iterrows():
        path = d / "images" / r.NAME
        assert path.read_bytes().endswith(EOI)
        capfd.readouterr()
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        err = capfd.readouterr().err
        assert img is not None and img.shape[:2][::-1] == _size(d, r.NAME)
        m = WARNING_RE.search(err)
        assert m, f"no libjpeg warning for {r.NAME}: {err!r}"
        inserted = _nums(r.details, "inserted")[0]
        assert 0 < int(m.group(1)) <= inserted  # libjpeg does not count the few bytes its Huffman reader pre-read
        with Image.open(path) as im:
            im.load()  # Pillow decodes it without complaint


def test_clean_files_decode_without_warnings(noisy, capfd: pytest.CaptureFixture[str]) -> None:
    d, _, noise, _ = noisy
    corrupt = set(noise.NAME[noise.kind.isin(["truncated_jpeg", "extraneous_bytes"])])
    capfd.readouterr()
    for p in sorted((d / "images").iterdir()):
        if p.name not in corrupt:
            assert cv2.imread(str(p)) is not None
    assert "Corrupt JPEG" not in capfd.readouterr().err


def _clean_boxes(train: pd.DataFrame, noise: pd.DataFrame, name: str) -> list[tuple[int, int, int, int]]:
    """The true boxes of a training image: its rows, with jittered / past-border rows replaced by their truth."""
    truth = {int(r.train_row): _box(r) for _, r in noise[noise.kind.isin(["box_jitter", "past_border"])].iterrows()}
    return [truth.get(k + 1, _box(row)) for k, row in train[train.NAME == name].iterrows()]


def test_duplicates(noisy) -> None:
    d, train, noise, labels = noisy
    seen = set()
    for _, r in noise[noise.kind.str.startswith("duplicate_")].iterrows():
        orig = re.search(r"of=(\S+)", r.details).group(1)
        assert orig in set(train.NAME)  # originals are training images
        assert not noise[
            (noise.NAME == orig)
            & noise.kind.isin(
                ["red_cell_extra", "red_cell_replace", "unannotated_border", "truncated_jpeg", "extraneous_bytes"]
            )
        ].shape[0]
        seen.add((r.kind, r.split))
        a, b = (d / "images" / orig).read_bytes(), (d / "images" / r.NAME).read_bytes()
        ia = cv2.imdecode(np.frombuffer(a, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
        ib = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
        h, w = ia.shape[:2]
        copy_rows = (labels if r.split == "test" else train).query("NAME == @r.NAME")
        assert list(copy_rows["class"]) == list(train.loc[train.NAME == orig, "class"])
        clean = _clean_boxes(train, noise, orig)
        got = [_box(x) for _, x in copy_rows.iterrows()]
        if r.kind == "duplicate_exact":
            assert a == b and got == clean
        elif r.kind == "duplicate_reencoded":
            assert a != b and ia.shape == ib.shape and got == clean
            assert np.abs(ia - ib).mean() < 4
        else:
            dx, dy = _nums(r.details, "dx")[0], _nums(r.details, "dy")[0]
            assert (dx, dy) != (0, 0) and got == shift_boxes(clean, dx, dy, w, h)
            m = 16  # compare away from the replicated border strip
            moved = ib[m + max(dy, 0) : h - m + min(dy, 0), m + max(dx, 0) : w - m + min(dx, 0)]
            src = ia[m + max(-dy, 0) : h - m + min(-dy, 0), m + max(-dx, 0) : w - m + min(-dx, 0)]
            assert np.abs(moved - src).mean() < 4 < np.abs(ib - ia).mean()
    assert {k for k, _ in seen} == {"duplicate_exact", "duplicate_reencoded", "duplicate_shifted"}
    assert {s for _, s in seen} == {"train", "test"}  # train-only and train-test duplicates


def test_test_copies_carry_clean_boxes(noisy) -> None:
    d, _, noise, labels = noisy
    for _, r in noise[noise.kind.str.startswith("duplicate_") & (noise.split == "test")].iterrows():
        g = labels[labels.NAME == r.NAME]
        assert len(g) >= 1
        w, h = _size(d, r.NAME)
        assert (g.x1 >= 0).all() and (g.y1 >= 0).all() and (g.x2 <= w).all() and (g.y2 <= h).all()


# ---- the byte and box edits on their own -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    scene = render_scene(np.random.default_rng(0), "S01", ["PNN"], 128)
    return encode_jpeg(scene.image, "S01")


def test_insert_extraneous_bytes_creates_no_marker(jpeg: bytes) -> None:
    for seed in range(10):
        out, details = insert_extraneous_bytes(np.random.default_rng(seed), jpeg)
        n = _nums(details, "inserted")[0]
        assert len(out) == len(jpeg) + n and out.endswith(EOI)
        assert b"\xff" not in out[len(jpeg) - 2 : -2]


def test_truncate_cuts_inside_the_scan(jpeg: bytes) -> None:
    out, _ = truncate_jpeg(np.random.default_rng(0), jpeg)
    assert jpeg.find(b"\xff\xda") < len(out) < len(jpeg) - 2


def test_jitter_box_stays_inside_and_moves() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        box = (int(rng.integers(0, 100)), int(rng.integers(0, 100)), 0, 0)
        box = (box[0], box[1], box[0] + int(rng.integers(20, 150)), box[1] + int(rng.integers(20, 150)))
        box = (box[0], box[1], min(box[2], 256), min(box[3], 256))
        j = jitter_box(rng, box, 256, 256)
        assert 0 <= j[0] < j[2] <= 256 and 0 <= j[1] < j[3] <= 256
        assert box_iou(j, box) < 0.85


def test_draw_shift_keeps_boxes_mostly_inside() -> None:
    rng = np.random.default_rng(1)
    boxes = [(0, 40, 30, 90), (100, 100, 180, 170)]
    dx, dy = draw_shift(rng, boxes, 192, 192, 192 / 368)
    moved = shift_boxes(boxes, dx, dy, 192, 192)
    for (a, b, c, e), (x, y, z, t) in zip(moved, boxes):
        assert (c - a) * (e - b) >= 0.6 * (z - x) * (t - y)


def test_rates_are_validated() -> None:
    with pytest.raises(ValueError, match="box_jitter"):
        DefectRates(box_jitter=1.5)
    assert all(v == 0 for v in DefectRates.none().as_dict().values())
