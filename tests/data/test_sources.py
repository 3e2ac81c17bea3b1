"""Acquisition-source inference: per-image features and clustering on small rendered sets with known sources."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from cytologia.data.folds_bench import render_source_set
from cytologia.data.sources import FEATURE_COLUMNS, UNKNOWN_SOURCE, image_features, infer_sources
from cytologia.data.synthetic.sources import get_source
from cytologia.errors import CytologiaInputError

EIGHT = ["S01", "S02", "S03", "S04", "S05", "S06", "S07", "S08"]


@pytest.fixture(scope="module")
def eight_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """96 images, 12 from each of 8 sources, at their native sizes: (folder, truth, features)."""
    out = tmp_path_factory.mktemp("eight")
    truth = render_source_set(out, 96, seed=3, sources=EIGHT)
    return out, truth, image_features(out / "images", truth["NAME"].tolist(), workers=1)


def test_image_features_read_header_and_colour(eight_sources: tuple[Path, pd.DataFrame, pd.DataFrame]) -> None:
    _, truth, feats = eight_sources
    assert list(feats.columns) == list(FEATURE_COLUMNS)
    assert feats["NAME"].tolist() == truth["NAME"].tolist()
    assert feats["readable"].all()
    src = truth["source"].map(get_source)
    assert (feats["img_w"].to_numpy() == [s.size[0] for s in src]).all()
    assert (feats["img_h"].to_numpy() == [s.size[1] for s in src]).all()
    # One quantisation-table hash per source, different between sources (each source has its own tables).
    hashes = feats.groupby(truth["source"])["q_hash"].nunique()
    assert (hashes == 1).all()
    assert feats["q_hash"].nunique() == len(EIGHT)
    # The background is the bright glass/plasma: lighter than the image average.
    assert (feats["bg_L"] > feats["L_mean"]).all()


def test_image_features_do_not_depend_on_threads(eight_sources: tuple[Path, pd.DataFrame, pd.DataFrame]) -> None:
    out, truth, feats = eight_sources
    threaded = image_features(out / "images", truth["NAME"].tolist(), workers=3)
    pd.testing.assert_frame_equal(feats, threaded)


def test_unreadable_images_are_named_and_get_unknown_source(
    eight_sources: tuple[Path, pd.DataFrame, pd.DataFrame], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, truth, _ = eight_sources
    images = tmp_path / "images"
    images.mkdir()
    names = truth["NAME"].tolist()[:70]
    for n in names:
        (images / n).write_bytes((out / "images" / n).read_bytes())
    (images / "garbage.jpg").write_bytes(b"this is not a jpeg")
    with caplog.at_level(logging.WARNING, logger="cytologia.data.sources"):
        feats = image_features(images, [*names, "garbage.jpg", "missing.jpg"], workers=1)
    assert feats["readable"].tolist() == [True] * 70 + [False, False]
    assert feats.loc[~feats["readable"], ["L_mean", "bg_b", "img_w"]].isna().all().all()
    assert "2 of 72 images" in caplog.text and "garbage.jpg" in caplog.text and "missing.jpg" in caplog.text
    sources = infer_sources(feats)
    assert sources.loc[["garbage.jpg", "missing.jpg"]].tolist() == [UNKNOWN_SOURCE, UNKNOWN_SOURCE]
    assert (sources.iloc[:70] >= 0).all()


def test_infer_sources_recovers_eight_sources(eight_sources: tuple[Path, pd.DataFrame, pd.DataFrame]) -> None:
    _, truth, feats = eight_sources
    inferred = infer_sources(feats)
    assert inferred.index.tolist() == truth["NAME"].tolist()
    # Every synthetic source writes its own quantisation tables and they are read exactly from the header, so the
    # partition should be perfect; 0.9 leaves room for nothing more than a stray image or two. An ARI below that
    # means the header fingerprint was lost (or sources were merged/split wholesale).
    assert adjusted_rand_score(truth["source"], inferred) >= 0.9
    assert inferred.nunique() == len(EIGHT)
    # Ids are numbered by decreasing cluster size, then first appearance: 0..S-1.
    assert sorted(inferred.unique()) == list(range(len(EIGHT)))


def test_background_colour_separates_sources_without_jpeg_or_size(tmp_path: Path) -> None:
    # Three sources rendered at one size (96 px): without the JPEG tables only the background colour is left. 64
    # images per source: a cluster is only accepted from 30 images on and each half of the cross-fit needs several.
    truth = render_source_set(tmp_path, 192, seed=5, sources=["S02", "S04", "S07"], size=96)
    feats = image_features(tmp_path / "images", truth["NAME"].tolist(), workers=1)
    assert feats["img_w"].nunique() == 1
    inferred = infer_sources(feats, use_jpeg=False)
    # The three backgrounds are > 5 L*a*b* units apart against within-source spreads < 2: a clean separation
    # is expected; 0.8 still tolerates a few misassigned images.
    assert adjusted_rand_score(truth["source"], inferred) >= 0.8


def test_one_source_is_not_split(tmp_path: Path) -> None:
    truth = render_source_set(tmp_path, 90, seed=7, sources=["S01"], size=96)
    feats = image_features(tmp_path / "images", truth["NAME"].tolist(), workers=1)
    assert infer_sources(feats).nunique() == 1
    assert infer_sources(feats, use_jpeg=False).nunique() == 1


def test_infer_sources_fixed_count_and_determinism(eight_sources: tuple[Path, pd.DataFrame, pd.DataFrame]) -> None:
    _, truth, feats = eight_sources
    three = infer_sources(feats, n_sources=3, seed=1)
    assert three.nunique() <= 3
    pd.testing.assert_series_equal(three, infer_sources(feats, n_sources=3, seed=1))
    pd.testing.assert_series_equal(infer_sources(feats, seed=4), infer_sources(feats, seed=4))


def test_infer_sources_bad_input(eight_sources: tuple[Path, pd.DataFrame, pd.DataFrame]) -> None:
    _, _, feats = eight_sources
    with pytest.raises(CytologiaInputError, match="number of sources must be >= 1"):
        infer_sources(feats, n_sources=0)
    with pytest.raises(CytologiaInputError, match="lacks column.*bg_L"):
        infer_sources(feats.drop(columns=["bg_L"]))


def test_all_unreadable_gives_unknown() -> None:
    feats = pd.DataFrame([{c: np.nan for c in FEATURE_COLUMNS} | {"NAME": f"x{i}.jpg"} for i in range(3)])
    feats["readable"] = False
    feats["q_hash"] = "none"
    feats["sampling"] = -1
    assert infer_sources(feats).tolist() == [UNKNOWN_SOURCE] * 3
