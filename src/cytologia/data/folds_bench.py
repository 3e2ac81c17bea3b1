"""`cytologia bench folds`: fold balance and speed on the real table, source-inference accuracy on generated data.

Two measurements, one table and a JSON line (last line of the output):

1. **Real table** (when ``train.csv`` of the real Cytologia set is found; it holds no images): the time
   :func:`~cytologia.data.folds.make_folds` takes on its 48k images and the worst per-class deviation of any fold's
   class share from the global share, in percentage points, box- and image-based. The target is <= 1.5 points.
2. **Source inference**: a set of images with known acquisition sources -- ``--data DIR`` (a folder with
   ``images/``, ``train.csv`` and ``sources.csv``), else ``cytologia synth`` output when the generator is
   installed, else a small set rendered here with :func:`render_source_set` -- is read by
   :func:`~cytologia.data.sources.image_features` and clustered by :func:`~cytologia.data.sources.infer_sources`;
   the adjusted Rand index (ARI) against the true sources is reported with and without the JPEG tables.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia.data.errors import CytologiaInputError
from cytologia.data.schema import CLASSES, TRAIN_COLUMNS
from cytologia.paths import real_data_dir

log = logging.getLogger(__name__)

# Where the real tables live: $CYTOLOGIA_REAL_DATA, else ../shared/data/cytologia next to a source checkout (None:
# an installed package without the variable; see cytologia.paths).
DEFAULT_REAL_DIR = real_data_dir()
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


def _generated_set(out: Path, n_images: int, seed: int) -> str:
    """Fill ``out`` with a set of known sources: ``cytologia synth`` when the generator is installed, else
    :func:`render_source_set`. Returns which one was used."""
    try:
        importlib.import_module("cytologia.data.synthetic.generate")
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("cytologia.data.synthetic"):
            raise
    else:
        from cytologia.cli import main as cli_main

        # Through the command line, the generator's documented interface (issue #3: --out, --images, --seed).
        code = cli_main(["synth", "--out", str(out), "--images", str(n_images), "--seed", str(seed)])
        if code == 0 and (out / SOURCES_FILE).is_file():
            return "cytologia synth"
        log.warning("cytologia synth failed (exit %d) or wrote no %s: rendering a set of known sources instead",
                    code, SOURCES_FILE)  # fmt: skip
    render_source_set(out, n_images, seed=seed)
    return "render_source_set"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--real",
        type=Path,
        default=DEFAULT_REAL_DIR,
        help=f"folder of the real train.csv (default {DEFAULT_REAL_DIR or 'none: set $CYTOLOGIA_REAL_DATA'})",
    )
    parser.add_argument("--data", type=Path, default=None, help="generated set with images/ and sources.csv")
    # 1000: the smallest synthetic source (3 % of images) then holds ~30 images, the smallest cluster that source
    # inference accepts when it has to split on colour (the ablation without JPEG tables).
    parser.add_argument("--images", type=int, default=1000, help="images to generate when --data is not given")
    parser.add_argument("--k", type=int, default=4, help="folds for the real-table balance (default 4)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the folds and of the generated set")
    parser.add_argument("--workers", type=int, default=None, help="threads decoding images (default: CPU count)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON result to this file")


def run(args: argparse.Namespace) -> int:
    result: dict[str, object] = {"bench": "folds"}
    rows: list[tuple[str, str]] = []
    real_csv = Path(args.real) / "train.csv" if args.real is not None else None
    if real_csv is not None and real_csv.is_file():
        real = measure_real_balance(real_csv, k=args.k, seed=args.seed)
        result["real"] = real
        rows += [
            ("real table", f"{real['images']} images, {real['boxes']} boxes, k={real['k']}, seed={real['seed']}"),
            ("  split time", f"{real['seconds']:.2f} s"),
            ("  max dev, box share", f"{real['max_dev_boxes']:.2f} points ({real['worst_class_boxes']})"),
            ("  max dev, image share", f"{real['max_dev_images']:.2f} points ({real['worst_class_images']})"),
            ("  within +-1.5 points", str(real["within_target"])),
        ]
    else:
        result["real"] = None
        missing = f"{real_csv} not found" if real_csv is not None else "no folder (an installed package)"
        rows.append(("real table", f"skipped: {missing} (--real or $CYTOLOGIA_REAL_DATA)"))

    with tempfile.TemporaryDirectory(prefix="cytologia-folds-bench-") as tmp:
        if args.data is not None:
            data_dir, origin = Path(args.data), str(args.data)
        else:
            data_dir = Path(tmp)
            start = time.perf_counter()
            origin = _generated_set(data_dir, args.images, args.seed)
            rows.append(("generated set", f"{args.images} images by {origin} in {time.perf_counter() - start:.1f} s"))
        ari = measure_source_ari(data_dir, seed=args.seed, workers=args.workers)
    ari["origin"] = origin
    result["sources"] = ari
    rows += [
        ("source inference", f"{ari['images']} images, {ari['true_sources']} true sources"),
        ("  features", f"{ari['feature_seconds']:.2f} s"),
        ("  ARI with JPEG tables", f"{ari['ari_jpeg']:.3f} ({ari['found_jpeg']} sources found)"),
        ("  ARI without (ablation)", f"{ari['ari_no_jpeg']:.3f} ({ari['found_no_jpeg']} sources found)"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    line = json.dumps(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    print(line)
    return 0
