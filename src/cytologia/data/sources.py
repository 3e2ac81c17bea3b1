"""Acquisition-source inference: cheap per-image features and a clustering that groups images by scanner/centre.

Cytologia images come from 20+ hospitals, but the table does not say which. A scanner leaves fingerprints that cost
almost nothing to read: the image size and the JPEG quantisation tables live in the header, and the stain and
illumination show in the background colour (white point) of a 4x-downscaled decode. :func:`image_features` reads them,
:func:`infer_sources` clusters them into source ids (``-1`` = unknown: the image could not be read).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd
from PIL import Image, JpegImagePlugin

from cytologia.data.images import imread

if TYPE_CHECKING:
    from sklearn.cluster import KMeans

log = logging.getLogger(__name__)

FEATURE_COLUMNS: tuple[str, ...] = (
    "NAME",
    "readable",
    "img_w",
    "img_h",
    "q_luma",
    "q_chroma",
    "q_hash",
    "sampling",
    "L_mean",
    "a_mean",
    "b_mean",
    "L_std",
    "a_std",
    "b_std",
    "bg_L",
    "bg_a",
    "bg_b",
)
COLOUR_COLUMNS: tuple[str, ...] = ("L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std")
# Background (white point): mean L*a*b* of the brightest pixels -- the glass and plasma between the cells. It shows
# the scanner's illumination, white balance and plasma tint, and hardly depends on which cells the image holds; the
# whole-image statistics above also follow the cell content (a large blue blast vs a small lymphocyte). On 400
# rendered images of 10 sources (folds_bench.render_source_set, seed 0) the between/within-source variance ratio is
# 517 for bg_b, 66 for bg_a, 15 for b_mean, 6 for L_mean and < 1.5 for every standard deviation.
BACKGROUND_COLUMNS: tuple[str, ...] = ("bg_L", "bg_a", "bg_b")
_BACKGROUND_QUANTILE = 0.9  # "brightest pixels" = L* above its 90th percentile
UNKNOWN_SOURCE = -1
NO_QTABLE = "none"  # q_hash of an image without JPEG quantisation tables (PNG, unreadable header)

# Feature groups for clustering. Each group gets the same total weight whatever its number of columns, so the three
# JPEG columns do not outvote the two size columns, nor the three background ones.
_GROUPS: dict[str, tuple[str, ...]] = {
    "size": ("log_w", "log_h"),
    "jpeg": ("log_q_luma", "log_q_chroma", "sampling"),
    "background": BACKGROUND_COLUMNS,
}
# Not clustered on: the whole-image colour statistics and a focus measure (variance of the Laplacian). Both follow
# the image content more than the scanner: on the 10-source synthetic set, adding the focus measure to size and
# background dropped the ARI of KMeans with the true k from 0.99 to 0.56.
# Splitting a set of images into sub-sources (see _split): KMeans with k clusters is accepted when every pair of
# clusters is far apart along the line joining their centres: Ashman's D = sqrt(2)|m1 - m0| / sqrt(s0^2 + s1^2) of
# the projections. D is measured on held-out images (KMeans fitted on one half of the sample, D computed on the
# other, and the other way round; the smaller D counts), because a k-means cut of pure noise looks separated on its
# own training points. References: KMeans' best cut of one Gaussian gives D ~ 2.7, of a uniform box ~ 3.5; two
# Gaussians 5 sd apart give D = 5. Simulated 2-cuts of one source (3-D Gaussian or uniform, 60 runs each): with one
# direction, D >= 4 in ~5-10 % of runs at 40 images; with both, the largest D was 3.6 from 60 images on -- hence
# the cross-fitting and _MIN_CLUSTER = 30 (a set is split from 60 images on). The largest accepted k wins. A
# recursive 2-means bisection with the same test was tried first: on a mixture of 10 sources a 2-cut lumps sources
# together, its D stays ~3, and it found 2 sources where there were 10.
_MIN_SEPARATION = 4.0
_SPLIT_SAMPLE = 4000  # KMeans is fitted on at most this many images (fixed-seed sample), then predicts all
_MAX_SOURCES = 16  # most sub-sources one JPEG-settings part is split into
_MIN_CLUSTER = 30  # never accept a cluster of fewer images than this (D estimates on smaller ones are noise)
# The scan of k stops after this many rejected k in a row. Acceptance is not monotone in k: on 10 synthetic sources
# without JPEG tables, k=2 passed, k=3..6 failed (sources lumped in pairs), k=7..9 passed. A single source of 48k
# images costs ~0.4 s per k.
_PATIENCE = 6
_KEY_PURITY = 0.9  # an exact (size, qtables) key whose images are >= 90 % in one cluster joins that cluster wholly


def _missing_row(name: str) -> dict[str, object]:
    row: dict[str, object] = {c: np.nan for c in FEATURE_COLUMNS}
    row.update(NAME=name, readable=False, q_hash=NO_QTABLE, sampling=-1)
    return row


def _qtable_summary(qtables: dict[int, Sequence[int]] | None) -> tuple[float, float, str]:
    """Mean of the luma (0) and chroma (1) tables, and a short hash of all tables (a scanner's exact signature)."""
    if not qtables:
        return np.nan, np.nan, NO_QTABLE
    digest = hashlib.sha1()
    for idx in sorted(qtables):
        digest.update(np.asarray(qtables[idx], dtype=np.uint16).tobytes())
    luma = float(np.mean(qtables[0])) if 0 in qtables else np.nan
    chroma = float(np.mean(qtables[1])) if 1 in qtables else luma  # grey JPEGs have one table
    return luma, chroma, digest.hexdigest()[:12]


def read_image_features(path: Path) -> dict[str, object]:
    """Features of one image; ``readable`` is False (and the statistics NaN) when it cannot be decoded."""
    row = _missing_row(path.name)
    try:
        with Image.open(path) as im:  # reads the header only
            row["img_w"], row["img_h"] = im.size
            row["q_luma"], row["q_chroma"], row["q_hash"] = _qtable_summary(getattr(im, "quantization", None))
            row["sampling"] = JpegImagePlugin.get_sampling(im) if im.format == "JPEG" else -1
    except (OSError, SyntaxError, ValueError):  # missing file, not an image, broken header
        return row
    # IMREAD_REDUCED_COLOR_4 lets libjpeg decode at 1/4 scale (DCT scaling): ~5x faster than a full decode and
    # plenty for global colour statistics.
    small = imread(path, cv2.IMREAD_REDUCED_COLOR_4)
    if small is None or small.size == 0:
        return row
    # Float L*a*b* (L 0..100, a/b about -100..100): the 8-bit conversion rounds a and b to whole steps, which made
    # the background a*/b* of a source take one or two values only.
    lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_BGR2LAB).reshape(-1, 3)
    mean, std = lab.mean(axis=0), lab.std(axis=0)
    row.update(zip(("L_mean", "a_mean", "b_mean"), map(float, mean)))
    row.update(zip(("L_std", "a_std", "b_std"), map(float, std)))
    bright = lab[lab[:, 0] >= np.quantile(lab[:, 0], _BACKGROUND_QUANTILE)]
    row.update(zip(BACKGROUND_COLUMNS, map(float, bright.mean(axis=0))))
    row["readable"] = True
    return row


def image_features(image_dir: Path, names: Sequence[str], workers: int | None = None) -> pd.DataFrame:
    """Per-image features (columns :data:`FEATURE_COLUMNS`, one row per name, in order).

    Unreadable or missing images get ``readable=False`` and NaN statistics; a warning names them. Decoding runs in
    ``workers`` threads (OpenCV releases the GIL); the result does not depend on the number of threads.
    """
    image_dir = Path(image_dir)
    workers = max(1, min(os.cpu_count() or 1, 8) if workers is None else workers)
    paths = [image_dir / n for n in names]
    if workers == 1:
        rows = [read_image_features(p) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(read_image_features, paths, chunksize=64))
    for row, name in zip(rows, names):
        row["NAME"] = name
    feats = pd.DataFrame(rows, columns=list(FEATURE_COLUMNS))
    feats["readable"] = feats["readable"].astype(bool)
    feats["sampling"] = feats["sampling"].astype(np.int64)
    bad = feats.loc[~feats["readable"], "NAME"].tolist()
    if bad:
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        log.warning(
            "%d of %d images in %s could not be read; their statistics are missing: %s",
            len(bad),
            len(names),
            image_dir,
            shown,
        )
    return feats


def _design_matrix(feats: pd.DataFrame, groups: Sequence[str] = tuple(_GROUPS)) -> np.ndarray:
    """Standardised clustering features of readable images; each feature group weighs the same in distances."""
    cols: dict[str, np.ndarray] = {
        "log_w": np.log(feats["img_w"].to_numpy(float)),
        "log_h": np.log(feats["img_h"].to_numpy(float)),
        # Quantisation steps scale with 1/quality: log makes quality 50 -> 75 as far as 75 -> 87.
        "log_q_luma": np.log(feats["q_luma"].fillna(0).to_numpy(float) + 1.0),
        "log_q_chroma": np.log(feats["q_chroma"].fillna(0).to_numpy(float) + 1.0),
        "sampling": feats["sampling"].to_numpy(float),
        **{c: feats[c].to_numpy(float) for c in BACKGROUND_COLUMNS},
    }
    blocks = []
    for group in groups:
        mat = np.column_stack([cols[c] for c in _GROUPS[group]])
        std = mat.std(axis=0)
        keep = std > 1e-9  # a constant column carries no information (and would divide by zero)
        if not keep.any():
            continue
        mat = (mat[:, keep] - mat[:, keep].mean(axis=0)) / std[keep]
        blocks.append(mat / np.sqrt(keep.sum()))
    return np.column_stack(blocks) if blocks else np.zeros((len(feats), 0))


def _header_keys(feats: pd.DataFrame, with_size: bool) -> np.ndarray:
    """Integer code of the JPEG encoder settings (qtable hash, chroma sampling), and of the size when asked."""
    key = feats["q_hash"].astype(str) + "|" + feats["sampling"].astype(str)
    if with_size:
        key = key + "|" + feats["img_w"].astype("Int64").astype(str) + "x" + feats["img_h"].astype("Int64").astype(str)
    return pd.factorize(key, sort=True)[0]


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int = 4) -> KMeans:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)


def _separation(x: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> float:
    """Ashman's D of two clusters projected on the line through their centres."""
    axis = centres[1] - centres[0]
    norm = float(np.linalg.norm(axis))
    if norm == 0.0 or min(np.bincount(labels, minlength=2)) < 2:
        return 0.0
    proj = x @ (axis / norm)
    a, b = proj[labels == 0], proj[labels == 1]
    spread = np.sqrt(a.var(ddof=1) + b.var(ddof=1))
    return float(np.sqrt(2.0) * abs(b.mean() - a.mean()) / max(spread, 1e-12))


def _min_pair_separation(x: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> float:
    """Smallest Ashman's D over all pairs of clusters (0 when a cluster has fewer than two points)."""
    d_min = np.inf
    for i in range(len(centres)):
        for j in range(i + 1, len(centres)):
            pair = (labels == i) | (labels == j)
            d_min = min(d_min, _separation(x[pair], (labels[pair] == j).astype(np.int64), centres[[i, j]]))
    return float(d_min)


def _split(x: np.ndarray, seed: int) -> np.ndarray:
    """Cluster labels of a set of images: the largest k whose KMeans clusters are all pairwise clearly apart.

    For k = 2.._MAX_SOURCES, KMeans is fitted on each half of a fixed-seed sample and its clusters are checked on
    the other half (cross-fitting): every pair must be separated by Ashman's D >= _MIN_SEPARATION in both
    directions, and every cluster must hold >= _MIN_CLUSTER images. The scan stops after _PATIENCE rejections in a
    row. Labels are all 0 when no k passes (one source).
    """
    n = len(x)
    labels = np.zeros(n, dtype=np.int64)
    if n < 2 * _MIN_CLUSTER or not x.shape[1]:
        return labels
    sample = np.random.RandomState(seed).permutation(n)[:_SPLIT_SAMPLE]
    half_a, half_b = sample[: len(sample) // 2], sample[len(sample) // 2 :]
    n_distinct = len(np.unique(np.round(x[half_a], 6), axis=0))
    rejected = 0
    for k in range(2, min(_MAX_SOURCES, n_distinct, n // _MIN_CLUSTER) + 1):
        if rejected >= _PATIENCE:
            break
        km_a, km_b = _kmeans(x[half_a], k, seed), _kmeans(x[half_b], k, seed)
        d_min = min(
            _min_pair_separation(x[half_b], km_a.predict(x[half_b]), km_a.cluster_centers_),
            _min_pair_separation(x[half_a], km_b.predict(x[half_a]), km_b.cluster_centers_),
        )
        cut = km_a.predict(x).astype(np.int64)
        sizes = np.bincount(cut, minlength=k)
        log.debug("k=%d on %d images: sizes %s, min pairwise held-out D = %.2f", k, n, sizes.tolist(), d_min)
        if d_min >= _MIN_SEPARATION and sizes.min() >= _MIN_CLUSTER:
            labels, rejected = cut, 0
        else:
            rejected += 1
    return labels


def infer_sources(
    features: pd.DataFrame, n_sources: int | None = None, seed: int = 0, use_jpeg: bool = True
) -> pd.Series:
    """Inferred acquisition source per image: a Series NAME -> int id (0..S-1; -1 for unreadable images).

    Automatic (``n_sources=None``), hierarchical: images are first partitioned by their JPEG encoder settings
    (quantisation-table hash + chroma sampling: a scanner's exact fingerprint); each part is then split further on
    image size and background colour only where those are clearly multimodal (two centres, one scanner model).
    With ``n_sources`` given: KMeans with that many clusters on all features. Either way, each exact key (size +
    encoder settings) whose images fall >= 90 % in one cluster is then moved wholly into it. ``use_jpeg=False``
    ignores the JPEG tables (an ablation: how far size and background colour alone go). Ids are numbered by
    decreasing size (ties by first image), so they do not depend on KMeans' label order.
    """
    if n_sources is not None and n_sources < 1:
        from cytologia.errors import CytologiaInputError

        raise CytologiaInputError(f"number of sources must be >= 1, got {n_sources}")
    missing = [c for c in FEATURE_COLUMNS if c not in features.columns]
    if missing:
        from cytologia.errors import CytologiaInputError

        raise CytologiaInputError(f"features table lacks column(s) {', '.join(missing)}")
    names = features["NAME"].astype(str).to_numpy()
    out = np.full(len(features), UNKNOWN_SOURCE, dtype=np.int64)
    ok = features["readable"].to_numpy(bool)
    if ok.any():
        feats = features.loc[ok].reset_index(drop=True)
        groups = tuple(_GROUPS) if use_jpeg else tuple(g for g in _GROUPS if g != "jpeg")
        x = _design_matrix(feats, groups)
        if n_sources is not None:
            k = min(n_sources, len(np.unique(np.round(x, 6), axis=0)) if x.shape[1] else 1)
            labels = _kmeans(x, k, seed).labels_ if k > 1 else np.zeros(len(feats), dtype=np.int64)
        else:
            parts = _header_keys(feats, with_size=False) if use_jpeg else np.zeros(len(feats), dtype=np.int64)
            labels = np.zeros(len(feats), dtype=np.int64)
            for part in np.unique(parts):
                rows = np.flatnonzero(parts == part)
                labels[rows] = labels.max() + 1 + _split(x[rows], seed)
        if use_jpeg:
            labels = _snap_to_keys(labels, _header_keys(feats, with_size=True))
        out[ok] = _renumber(labels)
    return pd.Series(out, index=pd.Index(names, name="NAME"), name="source")


def _snap_to_keys(labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Move every key whose images are >= _KEY_PURITY in one cluster wholly into that cluster."""
    counts = pd.crosstab(keys, labels)  # keys x clusters
    modal = counts.to_numpy().argmax(axis=1)
    total = counts.to_numpy().sum(axis=1)
    pure = (total > 1) & (counts.to_numpy().max(axis=1) >= _KEY_PURITY * total)
    key_pos = np.searchsorted(counts.index.to_numpy(), keys)
    snapped = counts.columns.to_numpy()[modal][key_pos]
    return np.where(pure[key_pos], snapped, labels)


def _renumber(labels: np.ndarray) -> np.ndarray:
    uniq, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))  # by decreasing size, then by first appearance
    new_id = np.empty(len(uniq), dtype=np.int64)
    new_id[order] = np.arange(len(uniq))
    return new_id[inverse.ravel()]
