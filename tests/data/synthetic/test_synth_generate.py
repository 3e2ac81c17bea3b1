"""The synthetic data set generator: layout, schemas, determinism, class coverage, statistics and the score."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cytologia.data.schema import CLASSES, SUBMISSION_COLUMNS, TEST_COLUMNS, TRAIN_COLUMNS
from cytologia.data.synthetic.defects import KINDS, NOISE_COLUMNS, DefectRates
from cytologia.data.synthetic.generate import OUTPUT_FILES, SynthConfig, _plan, generate, spread_rows
from cytologia.data.synthetic.sources import SOURCE_BY_NAME
from cytologia.data.synthetic.stats import load_real_stats
from cytologia.errors import CytologiaInputError
from cytologia.metrics import score

NAME_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]\.jpg")


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False)


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~100 images, no defects, small images: every class must show up."""
    out = tmp_path_factory.mktemp("synth_clean")
    generate(out, 100, seed=3, config=SynthConfig(size=128, defects=DefectRates.none()))
    return out


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 images at the sources' own sizes with the default defect rates."""
    out = tmp_path_factory.mktemp("synth_default")
    generate(out, 40, seed=11, config=SynthConfig(size=None))
    return out


def test_layout_and_schemas(default_set: Path) -> None:
    d = default_set
    for f in OUTPUT_FILES:
        assert (d / f).is_file(), f
    train, test, labels = _read(d / "train.csv"), _read(d / "test.csv"), _read(d / "test_labels.csv")
    noise, sources = _read(d / "noise.csv"), _read(d / "sources.csv")
    assert tuple(train.columns) == TRAIN_COLUMNS
    assert tuple(test.columns) == TEST_COLUMNS
    assert tuple(labels.columns) == SUBMISSION_COLUMNS
    assert tuple(noise.columns) == NOISE_COLUMNS
    assert tuple(sources.columns) == ("NAME", "source")

    files = sorted(p.name for p in (d / "images").iterdir())
    assert len(files) == 40
    assert all(NAME_RE.fullmatch(f) for f in files)
    train_names, test_names = set(train.NAME), set(test.NAME)
    assert not train_names & test_names
    assert train_names | test_names == set(files)  # every image is in exactly one split, every row has a file
    assert sorted(sources.NAME) == files
    assert set(sources.source) <= set(SOURCE_BY_NAME)
    assert set(train["class"]) <= set(CLASSES) and set(labels["class"]) <= set(CLASSES)
    for col in ("x1", "y1", "x2", "y2"):
        assert pd.api.types.is_integer_dtype(train[col]) and pd.api.types.is_integer_dtype(labels[col])
    assert set(noise.kind) <= set(KINDS)

    # image sizes are the sources' own (352-608 px) when no --size is given
    for name, src in zip(sources.NAME, sources.source):
        with Image.open(d / "images" / name) as im:
            assert im.size == SOURCE_BY_NAME[src].size

    info = json.loads((d / "synth.json").read_text())
    c = info["counts"]
    assert (info["seed"], info["n_images"]) == (11, 40)
    assert c["train_images"] == len(train_names) and c["train_rows"] == len(train)
    assert c["test_images"] == len(test_names) and c["test_boxes"] == len(test)
    assert c["defects"] == {k: int((noise.kind == k).sum()) for k in KINDS}
    assert sum(c["sources"].values()) == 40


def test_test_csv_one_row_per_box_shuffled_unique_ids(clean_set: Path, default_set: Path) -> None:
    for d in (clean_set, default_set):
        test, labels = _read(d / "test.csv"), _read(d / "test_labels.csv")
        assert test.equals(labels[list(TEST_COLUMNS)])  # same rows, same order
        assert test.trustii_id.is_unique and (test.trustii_id > 0).all()
        names = test.NAME.tolist()
        assert all(a != b for a, b in zip(names, names[1:])), "rows of one image must not be adjacent"
        assert names != sorted(names) and not test.trustii_id.is_monotonic_increasing
    # the clean set has multi-cell test images, so "not adjacent" was really exercised
    labels = _read(clean_set / "test_labels.csv")
    assert labels.NAME.value_counts().max() >= 2


def test_test_labels_are_clean_and_inside_the_image(default_set: Path) -> None:
    labels = _read(default_set / "test_labels.csv")
    for name, g in labels.groupby("NAME"):
        with Image.open(default_set / "images" / name) as im:
            w, h = im.size
            im.load()  # test images are never corrupt
        assert (g.x1 >= 0).all() and (g.y1 >= 0).all() and (g.x2 <= w).all() and (g.y2 <= h).all()
        assert (g.x2 - g.x1 >= 4).all() and (g.y2 - g.y1 >= 4).all()


def test_scoring_test_labels_against_themselves_gives_one(default_set: Path) -> None:
    labels = _read(default_set / "test_labels.csv")
    res = score(labels, labels)
    assert res.score == pytest.approx(1.0)
    assert res.giou == pytest.approx(1.0) and res.f1 == pytest.approx(1.0)


def test_every_class_appears_in_both_splits(clean_set: Path) -> None:
    train, labels = _read(clean_set / "train.csv"), _read(clean_set / "test_labels.csv")
    assert set(train["class"]) == set(CLASSES)
    assert set(labels["class"]) == set(CLASSES)
    assert _read(clean_set / "noise.csv").empty


def test_clean_set_boxes_are_inside_the_images(clean_set: Path) -> None:
    train = _read(clean_set / "train.csv")
    assert (train[["x1", "y1"]] >= 0).all().all()
    assert (train[["x2", "y2"]] <= 128).all().all()
    assert ((train.x2 - train.x1) > 0).all() and ((train.y2 - train.y1) > 0).all()


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_deterministic_per_seed_and_independent_of_workers(tmp_path: Path) -> None:
    rates = DefectRates(box_jitter=0.3, near_duplicate=0.1, exact_duplicate=0.1, extraneous_bytes=0.1)
    cfg = SynthConfig(size=96, defects=rates)
    generate(tmp_path / "a", 20, seed=5, config=cfg, workers=1)
    generate(tmp_path / "b", 20, seed=5, config=cfg, workers=2)
    generate(tmp_path / "c", 20, seed=6, config=cfg, workers=1)
    a, b, c = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b"), _snapshot(tmp_path / "c")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert a["train.csv"] != c["train.csv"]
    assert set(k for k in a if k.startswith("images/")) != set(k for k in c if k.startswith("images/"))


def test_refuses_to_overwrite_without_asking(tmp_path: Path) -> None:
    cfg = SynthConfig(size=96, defects=DefectRates.none())
    generate(tmp_path, 3, seed=0, config=cfg)
    with pytest.raises(CytologiaInputError, match="already holds a data set"):
        generate(tmp_path, 3, seed=0, config=cfg)
    generate(tmp_path, 4, seed=1, config=cfg, overwrite=True)
    assert len(list((tmp_path / "images").iterdir())) == 4


@pytest.mark.parametrize(
    "kwargs",
    [{"size": 10}, {"test_fraction": 1.0}, {"test_fraction": -0.1}, {"min_per_class": -1}],
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SynthConfig(**kwargs)  # type: ignore[arg-type]


def test_plan_follows_the_real_statistics() -> None:
    """The plan (no rendering) of a large set: cells per image, class shares, names, split and defect counts."""
    stats = load_real_stats()
    n = 6000
    tasks, train_order = _plan(n, 0, SynthConfig(), stats)
    cells = np.array([len(t.classes) for t in tasks])
    assert 0.91 < (cells == 1).mean() < 0.95  # real: 93.5 % single-cell images
    assert cells.max() <= 11
    boxes = pd.Series([c for t in tasks for c in t.classes])
    share = boxes.value_counts(normalize=True)
    for c in CLASSES:
        assert abs(share[c] - stats.class_freq[c]) < 0.01, c
    names = [t.name for t in tasks] + [cp.name for t in tasks for cp in t.copies]
    assert len(names) == n and len(set(names)) == n and all(NAME_RE.fullmatch(x) for x in names)
    n_test = sum(t.split == "test" for t in tasks) + sum(cp.split == "test" for t in tasks for cp in t.copies)
    assert abs(n_test / n - 0.3) < 0.01
    assert len(train_order) == n - n_test
    rates = DefectRates()
    n_train_boxes = sum(len(t.classes) for t in tasks if t.split == "train")
    n_past = sum(len(t.past_border) for t in tasks if t.split == "train")
    assert abs(n_past / n_train_boxes - rates.past_border) < 0.006
    n_copies = sum(len(t.copies) for t in tasks)
    assert abs(n_copies / n - rates.exact_duplicate - rates.near_duplicate) < 0.004
    used = [t.source for t in tasks]
    assert len(set(used)) == len(SOURCE_BY_NAME) >= 8
    # one defect per box at most; test images and duplicated originals carry no image-level defect
    for t in tasks:
        assert not set(t.jitter) & set(t.past_border) and t.red_replace_index not in (*t.past_border, *t.jitter)
        assert (t.red_cell == "replace") == (t.red_replace_index >= 0)
        if t.split == "test" or t.copies:
            assert not (t.red_cell or t.unannotated or t.corrupt)
        if t.split == "test":
            assert not t.jitter and not t.copies


def test_spread_rows_separates_rows_of_one_image() -> None:
    names = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + [f"s{i}" for i in range(12)]
    for seed in range(20):
        order = spread_rows(np.random.default_rng(seed), names)
        seq = [names[k] for k in order]
        assert sorted(order) == list(range(len(names)))
        assert all(x != y for x, y in zip(seq, seq[1:]))
