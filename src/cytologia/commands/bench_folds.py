"""`cytologia bench folds`: fold balance and speed on the real table, source-inference accuracy on generated data.

Two measurements (:mod:`cytologia.data.folds_bench`), one table and a JSON line (last line of the output):

1. **Real table** (when ``train.csv`` of the real Cytologia set is found; it holds no images): the time
   :func:`~cytologia.data.folds.make_folds` takes on its 48k images and the worst per-class deviation of any fold's
   class share from the global share, in percentage points, box- and image-based. The target is <= 1.5 points.
2. **Source inference**: a set of images with known acquisition sources -- ``--data DIR`` (a folder with
   ``images/``, ``train.csv`` and ``sources.csv``), else ``cytologia synth`` output when the generator is
   installed, else a small set rendered with :func:`~cytologia.data.folds_bench.render_source_set` -- is read by
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
from pathlib import Path

from cytologia.data.folds_bench import SOURCES_FILE, measure_real_balance, measure_source_ari, render_source_set
from cytologia.paths import real_data_dir

log = logging.getLogger(__name__)

# Where the real tables live: $CYTOLOGIA_REAL_DATA, else ../shared/data/cytologia next to a source checkout (None:
# an installed package without the variable; see cytologia.paths).
DEFAULT_REAL_DIR = real_data_dir()


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
        log.warning(
            "cytologia synth failed (exit %d) or wrote no %s: rendering a set of known sources instead",
            code,
            SOURCES_FILE,
        )
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
