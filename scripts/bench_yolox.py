"""YOLOX next to ultralytics YOLO11 on the CPU: detection ms/image (torch and ONNX Runtime) and the box term after
training each for the same wall-clock budget on a generated set.

    python scripts/bench_yolox.py timing --sizes 384 512 --threads 2
    python scripts/bench_yolox.py score --budget-s 600 --img-size 256 --n-images 300

``timing``: random weights (the speed does not depend on them), every model exported to ONNX, then
:func:`cytologia.detection.yolox.export.benchmark` / :func:`cytologia.detection.export.benchmark` -- decode, letterbox,
network, NMS; the best of 3 interleaved passes over generated 368 px images, batch 1, same thread count.

``score``: a generated data set (``cytologia.data.synthetic.generate``), 4 random folds, fold 0 held out; each model
trains on the other folds until the budget is spent (YOLOX: ``time_limit_s``; ultralytics: its ``time`` argument), then
predicts the held-out images; reported is the challenge's box term under the known-count rule (plain pass). Prints a
JSON summary; ``--json`` writes it. ultralytics rows are skipped when it is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cytologia.detection import DetectionData, TrainSettings, create_detector, load_detector
from cytologia.detection.oof import known_count_giou

HAVE_ULTRALYTICS = importlib.util.find_spec("ultralytics") is not None


def yolox_checkpoint(name: str, out: Path) -> Path:
    from cytologia.detection.yolox.checkpoint import save_checkpoint
    from cytologia.detection.yolox.model import build_yolox

    return save_checkpoint(out / f"{name}.pt", build_yolox(name), name, img_size=512, epoch=0, metrics={},
                           train_args={})  # fmt: skip


def ultralytics_checkpoint(name: str, out: Path) -> Path:
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    yolo = YOLO(f"{name}.yaml", task="detect", verbose=False)
    yolo.model = DetectionModel(f"{name}.yaml", nc=1, verbose=False)  # one class, as the backend trains
    path = out / f"{name}.pt"
    yolo.save(str(path))
    return path


def timing(args: argparse.Namespace) -> dict[str, Any]:
    from cytologia.detection.export import generated_images

    results: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-yolox-") as tmp:
        tmp_path = Path(tmp)
        images = generated_images(tmp_path / "images", n=args.n_images, size=368)
        models = [("yolox", m) for m in args.yolox] + ([("ultralytics", m) for m in args.ultralytics]
                                                        if HAVE_ULTRALYTICS else [])  # fmt: skip
        for backend, name in models:
            if backend == "yolox":
                from cytologia.detection.yolox.export import benchmark

                ckpt = yolox_checkpoint(name, tmp_path)
            else:
                from cytologia.detection.export import benchmark

                ckpt = ultralytics_checkpoint(name, tmp_path)
            detector = load_detector(ckpt, backend=backend)
            params = sum(p.numel() for p in detector.network("cpu").parameters()) / 1e6
            for size in args.sizes:
                onnx_path = detector.export_onnx(tmp_path / f"{name}_{size}.onnx", img_size=size)
                t = benchmark(detector, onnx_path, images, size, threads=args.threads, batch_size=1, repeats=3)
                row = {"backend": backend, "model": name, "params_M": round(params, 2), "img_size": size,
                       "torch_ms": round(t["torch_ms_per_image"], 1),
                       "onnxruntime_ms": round(t["onnxruntime_ms_per_image"], 1)}  # fmt: skip
                print(row, flush=True)
                results["rows"].append(row)
    return results


def score(args: argparse.Namespace) -> dict[str, Any]:
    from cytologia.data.io import read_annotations
    from cytologia.data.synthetic.generate import generate

    root = args.data
    if not (root / "train.csv").is_file():
        generate(root, args.n_images, seed=args.seed, workers=2)
    table, _ = read_annotations(root / "train.csv", root / "images", lenient=True)
    names = sorted(pd.unique(table["NAME"]))
    folds = pd.DataFrame({"NAME": names, "fold": np.random.default_rng(args.seed).permutation(len(names)) % 4})
    held = folds.loc[folds["fold"] == 0, "NAME"].tolist()
    truth = table.loc[table["NAME"].isin(held)]
    results: dict[str, Any] = {"budget_s": args.budget_s, "img_size": args.img_size, "n_images": len(names),
                               "n_held_out": len(held), "rows": []}  # fmt: skip
    runs = [("yolox", m) for m in args.yolox] + ([("ultralytics", m) for m in args.ultralytics]
                                                 if HAVE_ULTRALYTICS else [])  # fmt: skip
    for backend, name in runs:
        if backend == "yolox":
            extra = {"time_limit_s": args.budget_s, "no_aug_epochs": 2, "warmup_epochs": 1, "mixup_prob": 0.0}
            lr, optimizer = args.yolox_lr, "AdamW"
        else:  # ultralytics: its time limit (hours) and the flips of configs/detector/yolo11n.yaml
            extra = {"time": args.budget_s / 3600.0, "flipud": 0.5, "close_mosaic": 2, "warmup_epochs": 1}
            lr, optimizer = 0.002, "AdamW"
        cache = args.out / "cache"
        data = DetectionData(table=table, folds=folds, image_dir=root / "images", fold=0, cache_dir=cache)
        settings = TrainSettings(epochs=args.max_epochs, img_size=args.img_size, batch_size=16, lr=lr,
                                 optimizer=optimizer, device="cpu", workers=2, amp=False, seed=args.seed,
                                 extra=extra)  # fmt: skip
        detector = create_detector(backend, name)
        start = time.perf_counter()
        result = detector.train(data, args.out / f"{backend}_{name}", settings)
        train_s = time.perf_counter() - start
        boxes = detector.predict([root / "images" / n for n in held], img_size=args.img_size, names=held,
                                 device="cpu", batch_size=16)  # fmt: skip
        value = known_count_giou(boxes, truth)
        row = {"backend": backend, "model": name, "train_s": round(train_s, 1), "epochs": len(result.history),
               "best_epoch": result.best_epoch, "known_count_giou": round(value, 4)}  # fmt: skip
        print(row, flush=True)
        results["rows"].append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--sizes", type=int, nargs="+", default=[384, 512])
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--n-images", type=int, default=16)
    t.add_argument("--yolox", nargs="*", default=["yolox_nano", "yolox_tiny", "yolox_s"])
    t.add_argument("--ultralytics", nargs="*", default=["yolo11n", "yolo11s"])
    s = sub.add_parser("score")
    s.add_argument("--budget-s", type=float, default=600.0)
    s.add_argument("--img-size", type=int, default=256)
    s.add_argument("--n-images", type=int, default=300)
    s.add_argument("--max-epochs", type=int, default=100)
    s.add_argument("--yolox-lr", type=float, default=0.002)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data", type=Path, default=Path("outputs/bench_yolox/data"))
    s.add_argument("--out", type=Path, default=Path("outputs/bench_yolox/runs"))
    s.add_argument("--yolox", nargs="*", default=["yolox_nano"])
    s.add_argument("--ultralytics", nargs="*", default=["yolo11n"])
    for p in (t, s):
        p.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(getattr(args, "threads", 2))
    results = timing(args) if args.what == "timing" else score(args)
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
