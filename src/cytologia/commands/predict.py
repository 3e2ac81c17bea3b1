"""`cytologia predict --data DIR --ensemble FILE --out submission.csv`: detect, crop, classify, blend, submit
(:func:`cytologia.predict.predict_folder`).

``DIR`` holds ``test.csv`` (``trustii_id,NAME``) and ``images/``. Known-count mode (the default) keeps exactly as
many boxes per image as ``test.csv`` lists and writes a submission that is validated before it is written: every
``trustii_id`` exactly once with its image's NAME, a valid class, a box inside its image (a single empty image would
cost the macro-F1 a factor 23/24). Open-world mode thresholds the detections instead and writes the per-image output
(``--boxes-out``: a CSV and a JSON with boxes, class and probabilities); with a ``test.csv`` it writes the known-count
submission too. Without ``test.csv`` (open-world only) every image in ``DIR/images`` (or ``DIR``) is predicted.
An image that cannot be decoded is predicted with the fallback rule and listed (``--strict``: an error instead);
see ``docs/prediction.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cytologia.data.schema import CLASSES
from cytologia.errors import CytologiaInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder with test.csv and images/")
    parser.add_argument(
        "--ensemble",
        type=Path,
        required=True,
        help="ensemble file (cytologia tune), or an inference bundle folder (cytologia export ensemble)",
    )
    parser.add_argument("--out", type=Path, default=None, help="submission CSV to write (needs test.csv)")
    parser.add_argument("--mode", choices=("known-count", "open-world"), default="known-count")
    parser.add_argument("--runtime", choices=("onnx", "torch"), default="onnx", help="network back-end (onnx)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto")
    parser.add_argument(
        "--tta-flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flip TTA for the detector and every classifier (default: as the ensemble file says)",
    )
    parser.add_argument("--batch", type=int, default=8, help="images per batch (8)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per session (default: all)")
    parser.add_argument("--workers", type=int, default=None, help="image decoding threads (default: the batch)")
    parser.add_argument("--int8", choices=("off", "on", "measure"), default="off", help="CPU int8 classifiers (off)")
    parser.add_argument(
        "--boxes-out",
        type=Path,
        default=None,
        help="per-image output, written as PATH.csv and PATH.json (default in open-world mode: next to --out, or "
        "predictions in DIR's parent when there is no --out)",
    )
    parser.add_argument("--report", type=Path, default=None, help="write what ran and how long it took as JSON")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop with an error at a missing or undecodable image (default: predict it with the fallback rule -- "
        "prior class, padded boxes -- count it and list it in <out>_image_problems.csv)",
    )
    parser.add_argument(
        "--fallback-class",
        choices=CLASSES,
        default=None,
        metavar="CLASS",
        help="class of the fallback rule (default: the most frequent class of DIR/train.csv, else of the real "
        "train set)",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="predict in N local processes, gathered into one submission (under torchrun each rank is a shard)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on the standard error (default: when it is a terminal)",
    )


def run(args: argparse.Namespace) -> int:
    from cytologia.predict import predict_folder

    if args.batch < 1:
        raise CytologiaInputError(f"--batch {args.batch} must be >= 1")
    if args.shards < 1:
        raise CytologiaInputError(f"--shards {args.shards} must be >= 1")
    if args.out is None and (args.data / "test.csv").is_file():
        raise CytologiaInputError("--out is required when the data folder has a test.csv (the submission to write)")
    boxes_out = args.boxes_out
    if boxes_out is None and args.mode == "open-world":
        boxes_out = args.out.with_name(args.out.stem + "_boxes") if args.out else args.data.parent / "predictions"
    prediction = predict_folder(
        args.data,
        args.ensemble,
        args.out,
        mode=args.mode,
        runtime=args.runtime,
        device=args.device,
        tta_flip=args.tta_flip,
        batch_size=args.batch,
        threads=args.threads,
        workers=args.workers,
        int8=args.int8,
        boxes_out=boxes_out,
        report=args.report,
        strict=args.strict,
        fallback_class=args.fallback_class,
        progress=args.progress,
        shards=args.shards,
    )
    print("\n".join(prediction.lines))
    return 0
