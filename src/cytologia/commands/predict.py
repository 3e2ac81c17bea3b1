"""`cytologia predict --data DIR --ensemble FILE --out submission.csv`: detect, crop, classify, blend, submit.

``DIR`` holds ``test.csv`` (``trustii_id,NAME``) and ``images/``. Known-count mode (the default) keeps exactly as
many boxes per image as ``test.csv`` lists and writes a submission that is validated before it is written: every
``trustii_id`` exactly once with its image's NAME, a valid class, a box inside its image (a single empty image would
cost the macro-F1 a factor 23/24). Open-world mode thresholds the detections instead and writes the per-image output
(``--boxes-out``: a CSV and a JSON with boxes, class and probabilities); with a ``test.csv`` it writes the known-count
submission too. Without ``test.csv`` (open-world only) every image in ``DIR/images`` (or ``DIR``) is predicted.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd

from cytologia.data.errors import CytologiaInputError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder with test.csv and images/")
    parser.add_argument("--ensemble", type=Path, required=True, help="ensemble file (cytologia tune)")
    parser.add_argument("--out", type=Path, default=None, help="submission CSV to write (needs test.csv)")
    parser.add_argument("--mode", choices=("known-count", "open-world"), default="known-count")
    parser.add_argument("--runtime", choices=("onnx", "torch"), default="onnx", help="network back-end (onnx)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto")
    parser.add_argument(
        "--tta-flip", action=argparse.BooleanOptionalAction, default=None,
        help="flip TTA for the detector and every classifier (default: as the ensemble file says)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=8, help="images per batch (8)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per session (default: all)")
    parser.add_argument("--workers", type=int, default=None, help="image decoding threads (default: the batch)")
    parser.add_argument("--int8", choices=("off", "on", "measure"), default="off", help="CPU int8 classifiers (off)")
    parser.add_argument(
        "--boxes-out", type=Path, default=None,
        help="per-image output, written as PATH.csv and PATH.json (default in open-world mode: next to --out, or "
        "predictions in DIR's parent when there is no --out)",
    )  # fmt: skip
    parser.add_argument("--report", type=Path, default=None, help="write what ran and how long it took as JSON")


def _inputs(data: Path) -> tuple[Path, pd.DataFrame | None, list[str]]:
    from cytologia.data.io import read_test

    images = data / "images" if (data / "images").is_dir() else data
    if not images.is_dir():
        raise CytologiaInputError(f"{data}: no such folder")
    if (data / "test.csv").is_file():
        test = read_test(data / "test.csv", images)
        return images, test, list(pd.unique(test["NAME"]))
    suffixes = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
    names = sorted(p.name for p in images.iterdir() if p.suffix.lower() in suffixes)
    if not names:
        raise CytologiaInputError(f"{data}: no test.csv and no image files")
    return images, None, names


def run(args: argparse.Namespace) -> int:
    from cytologia.data.io import write_submission
    from cytologia.ensemble import read_ensemble
    from cytologia.runtime.pipeline import Pipeline, submission_table, write_per_image

    if args.batch < 1:
        raise CytologiaInputError(f"--batch {args.batch} must be >= 1")
    images, test, names = _inputs(args.data)
    if args.mode == "known-count" and test is None:
        raise CytologiaInputError(f"{args.data / 'test.csv'}: known-count mode needs it (or use --mode open-world)")
    if test is not None and args.out is None:
        raise CytologiaInputError("--out is required when the data folder has a test.csv (the submission to write)")
    ensemble = read_ensemble(args.ensemble)
    pipe = Pipeline(
        ensemble, runtime=args.runtime, device=args.device, threads=args.threads, tta_flip=args.tta_flip,
        int8=args.int8, batch_size=args.batch, workers=args.workers,
    )  # fmt: skip
    paths = [images / n for n in names]
    if args.int8 == "measure":
        for d in pipe.calibrate_int8(paths[: min(8, len(paths))]):
            print(f"int8 {d['model']}: {'kept' if d['accepted'] else 'not used'} -- {d['reason']}")
    counts = test.groupby("NAME").size() if test is not None else None
    result = pipe.predict(paths, names, counts=counts, mode=args.mode)
    ms = 1000.0 * result.wall_seconds / max(len(names), 1)
    print(f"{len(names)} images in {result.wall_seconds:.1f} s ({ms:.1f} ms/image, {args.runtime}, {args.mode})")
    if test is not None:
        table = submission_table(result.rows("known-count"), test)
        write_submission(table, args.out, test=test, image_sizes=result.sizes)
        print(f"wrote {args.out}: {len(table)} rows, every trustii_id of {args.data / 'test.csv'} once")
    boxes_out = args.boxes_out
    if boxes_out is None and args.mode == "open-world":
        boxes_out = args.out.with_name(args.out.stem + "_boxes") if args.out else args.data.parent / "predictions"
    if boxes_out is not None:
        rows = result.rows(args.mode)
        csv_path, json_path = boxes_out.with_suffix(".csv"), boxes_out.with_suffix(".json")
        write_per_image(rows, result.sizes, csv_path, json_path)
        print(f"wrote {csv_path} and {json_path}: {len(rows)} boxes over {len(result.sizes)} images")
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        info = {**result.info, "n_images": len(names), "wall_seconds": result.wall_seconds, "mode": args.mode}
        args.report.write_text(json.dumps(info, indent=1, default=str) + "\n")
    return 0
