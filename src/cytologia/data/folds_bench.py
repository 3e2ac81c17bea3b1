"""The measurements of `cytologia bench folds` (:mod:`cytologia.commands.bench_folds`): fold balance and speed on
the real table, source-inference accuracy on generated data.

1. **Real table** (:func:`measure_real_balance`; the real Cytologia ``train.csv`` holds no images): the time
   :func:`~cytologia.data.folds.make_folds` takes on its 48k images and the worst per-class deviation of any fold's
   class share from the global share, in percentage points, box- and image-based. The target is <= 1.5 points.
2. **Source inference** (:func:`measure_source_ari`): a set of images with known acquisition sources (``images/``,
   ``train.csv`` and ``sources.csv``; :func:`render_source_set` renders a small one) is read by
   :func:`~cytologia.data.sources.image_features` and clustered by :func:`~cytologia.data.sources.infer_sources`;
   the adjusted Rand index (ARI) against the true sources is reported with and without the JPEG tables.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia.data.schema import CLASSES, TRAIN_COLUMNS
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

SOURCES_FILE = "sources.csv"  # NAME,source: the truth, for evaluation only
BALANCE_TARGET_POINTS = 1.5  # the target for each class's share per fold
_P_TWO_CELLS = 0.07  # 93 % of real images hold one leukocyte; the rest are drawn with two here


def render_source_set(
    out: str | Path,
    n_images: int,
    seed: int = 0,
    sources: Sequence[str] | None = None,
    size: int | None = None,
) -> pd.DataFrame:
    """Render a small data set with known sources: ``out/images/*.jpg``, ``out/train.csv``, ``out/sources.csv``.

    Images are spread evenly over ``sources`` (names from :data:`cytologia.data.synthetic.sources.SOURCES`, default
    all of them), in a seeded random order; each holds one leukocyte (two for 7 % of images) of a uniformly drawn
    class, rendered at the source's own size (or ``size`` px square) and encoded with the source's JPEG tables.
    Returns the ``NAME,source`` table. Deterministic per seed.
    """
    from cytologia.data.synthetic.render import encode_jpeg, render_scene
    from cytologia.data.synthetic.sources import SOURCES, get_source

    if n_images < 1:
        raise CytologiaInputError(f"n_images must be >= 1, got {n_images}")
    chosen = [get_source(s) for s in (sources or [s.name for s in SOURCES])]
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.arange(n_images) % len(chosen))
    boxes: list[tuple[object, ...]] = []
    truth: list[tuple[str, str]] = []
    for i, s_idx in enumerate(order):
        src = chosen[int(s_idx)]
        n_cells = 2 if rng.random() < _P_TWO_CELLS else 1
        classes = [str(c) for c in rng.choice(CLASSES, size=n_cells)]
        scene = render_scene(rng, src, classes, size)
        name = f"{seed:04d}{i:06d}-s.jpg"
        (out / "images" / name).write_bytes(encode_jpeg(scene.image, src))
        boxes.extend((name, *map(int, box), cls) for box, cls in zip(scene.boxes, classes))
        truth.append((name, src.name))
    pd.DataFrame(boxes, columns=list(TRAIN_COLUMNS)).to_csv(out / "train.csv", index=False)
    table = pd.DataFrame(truth, columns=["NAME", "source"])
    table.to_csv(out / SOURCES_FILE, index=False)
    return table


def measure_real_balance(train_csv: str | Path, k: int = 4, seed: int = 42) -> dict[str, object]:
    """Fold balance and time of :func:`make_folds` on an annotation table without images (e.g. the real one)."""
    from cytologia.data.folds import make_folds

    table = pd.read_csv(train_csv, dtype={"NAME": str, "class": str}, keep_default_na=False)
    start = time.perf_counter()
    _, report = make_folds(table, k=k, seed=seed)
    seconds = time.perf_counter() - start
    worst_box = max(report.worst_dev_boxes, key=report.worst_dev_boxes.__getitem__)
    worst_img = max(report.worst_dev_images, key=report.worst_dev_images.__getitem__)
    return {
        "table": str(train_csv),
        "images": report.n_images,
        "boxes": report.n_boxes,
        "k": k,
        "seed": seed,
        "seconds": round(seconds, 2),
        "max_dev_boxes": report.max_dev_boxes,
        "worst_class_boxes": worst_box,
        "max_dev_images": report.max_dev_images,
        "worst_class_images": worst_img,
        "fold_images": report.fold_images,
        "within_target": max(report.max_dev_boxes, report.max_dev_images) <= BALANCE_TARGET_POINTS,
    }


def measure_source_ari(data_dir: str | Path, seed: int = 0, workers: int | None = None) -> dict[str, object]:
    """ARI of inferred vs true sources on a folder with ``images/`` and ``sources.csv`` (with and without JPEG)."""
    from sklearn.metrics import adjusted_rand_score

    from cytologia.data.sources import image_features, infer_sources

    data_dir = Path(data_dir)
    truth_path = data_dir / SOURCES_FILE
    if not truth_path.is_file():
        raise CytologiaInputError(f"{truth_path}: no such file (the true NAME,source table is needed for the ARI)")
    truth = pd.read_csv(truth_path, dtype={"NAME": str, "source": str}, keep_default_na=False)
    missing = {"NAME", "source"} - set(truth.columns)
    if missing:
        raise CytologiaInputError(f"{truth_path}: lacks column(s) {', '.join(sorted(missing))}")
    start = time.perf_counter()
    feats = image_features(data_dir / "images", truth["NAME"].tolist(), workers=workers)
    feature_s = time.perf_counter() - start
    result: dict[str, object] = {
        "data": str(data_dir),
        "images": len(truth),
        "true_sources": int(truth["source"].nunique()),
        "feature_seconds": round(feature_s, 2),
    }
    for use_jpeg, tag in ((True, "jpeg"), (False, "no_jpeg")):
        start = time.perf_counter()
        inferred = infer_sources(feats, seed=seed, use_jpeg=use_jpeg)
        result[f"ari_{tag}"] = round(float(adjusted_rand_score(truth["source"], inferred.to_numpy())), 4)
        result[f"found_{tag}"] = int(inferred[inferred >= 0].nunique())
        result[f"cluster_seconds_{tag}"] = round(time.perf_counter() - start, 2)
    return result
