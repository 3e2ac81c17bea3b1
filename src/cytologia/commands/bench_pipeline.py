"""`cytologia bench pipeline`: the command-line face of :func:`cytologia.runtime.bench.bench_pipeline`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cytologia.runtime.bench import bench_pipeline
from cytologia.runtime.inference import MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder with test.csv + images/ (or only images)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ensemble", type=Path, help="ensemble file (cytologia tune)")
    src.add_argument("--random-models", action="store_true", help="random-weight compact models (timing only)")
    parser.add_argument("--runtime", choices=("onnx", "torch", "both"), default="both")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "tensorrt"), help="(cpu)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per runtime (2: the challenge's CPU)")
    parser.add_argument("--images", type=int, default=50, help="images timed (50; 0 = all)")
    parser.add_argument("--batch", type=int, default=1, help="images per batch (1: per-image latency)")
    parser.add_argument("--warmup", type=int, default=3, help="images run before timing (3)")
    parser.add_argument("--mode", choices=MODES, default=None, help="default: known-count with test.csv")
    parser.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None, help="override the file")
    parser.add_argument("--int8", choices=("off", "on", "measure"), default="off", help="CPU int8 (onnx runtime)")
    parser.add_argument("--det", default="yolo11n", help="--random-models: detector architecture (yolo11n)")
    parser.add_argument("--det-size", type=int, default=320, help="--random-models: detector input (320)")
    parser.add_argument("--cls", default="resnet18", help="--random-models: classifier(s), comma-separated")
    parser.add_argument("--cls-size", type=int, default=128, help="--random-models: classifier input (128)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    random_models = None
    if args.random_models:
        classifiers = [(c.strip(), args.cls_size) for c in args.cls.split(",") if c.strip()]
        random_models = (args.det, args.det_size, classifiers)
    bench = bench_pipeline(
        args.data,
        args.ensemble,
        random_models=random_models,
        runtimes=["onnx", "torch"] if args.runtime == "both" else [args.runtime],
        device=args.device,
        threads=args.threads,
        images=args.images or None,
        batch=args.batch,
        warmup=args.warmup,
        mode=args.mode,
        tta_flip=args.tta_flip,
        int8=args.int8,
    )
    print(bench.table())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(bench.as_dict(), indent=1, default=str) + "\n")
    return 0
