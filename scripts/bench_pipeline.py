#!/usr/bin/env python
"""Pipeline benchmark sweep: ``python scripts/bench_pipeline.py [--configs compact-320,winner] [options]``.

For each named configuration, random-weight models of that architecture and size are built and exported (speed does
not depend on the weights), then ``cytologia bench pipeline`` runs on them -- ONNX Runtime and torch in the same
process -- and the tables are printed; ``--out`` writes every result as JSON. Without ``--data`` a synthetic test set
at the real image sizes (352-608 px) is generated into a temporary folder.

Configurations (:data:`CONFIGS`):

- ``compact-320``: yolo11n at 320 px + resnet18 at 128 px -- the 2-CPU-core target (<= 50 ms/image p50);
- ``compact-384``: yolo11n at 384 px + efficientnet_b0 at 224 px;
- ``winner``: a 1st-place-sized ensemble for a GPU -- yolo11s at 512 px with flip TTA + EfficientNetV2-M 512,
  ViT-L/16 224, DinoBloom-B 224, NextViT-S 384 and TinyViT-21M 512, each with flip TTA (target on an H100-class
  GPU: <= 50 ms/image p50; the 1st place needed 462 ms on an RTX 3090). Exporting it writes ~2 GB of ONNX.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "compact-320": {"detector": "yolo11n", "det_size": 320, "classifiers": [("resnet18", 128)], "tta_flip": False},
    "compact-384": {
        "detector": "yolo11n",
        "det_size": 384,
        "classifiers": [("efficientnet_b0", 224)],
        "tta_flip": False,
    },
    "winner": {
        "detector": "yolo11s",
        "det_size": 512,
        "classifiers": [
            ("tf_efficientnetv2_m", 512),
            ("vit_large_patch16_224", 224),
            ("dinobloom_b", 224),
            ("nextvit_small", 384),
            ("tiny_vit_21m_512", 512),
        ],
        "tta_flip": True,
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_pipeline.py", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="compact-320", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--data", type=Path, default=None, help="test.csv + images/ (default: generated)")
    parser.add_argument("--n-generate", type=int, default=60, help="images to generate without --data (60)")
    parser.add_argument("--images", type=int, default=50, help="images timed (50)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per runtime (2)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "tensorrt"))
    parser.add_argument("--runtime", choices=("onnx", "torch", "both"), default="both")
    parser.add_argument("--batch", type=int, default=1, help="images per batch (1)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--int8", choices=("off", "on", "measure"), default="off")
    parser.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from cytologia.ensemble import read_ensemble
    from cytologia.errors import CytologiaInputError
    from cytologia.runtime.bench import bench_runtime, build_random_ensemble, format_table, image_list

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        print(f"error: unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    runtimes = ["onnx", "torch"] if args.runtime == "both" else [args.runtime]
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="cytologia-bench-") as tmp:
            data = args.data
            if data is None:
                from cytologia.data.synthetic.generate import SynthConfig, generate

                data = Path(tmp) / "data"
                generate(data, args.n_generate, seed=0, config=SynthConfig(test_fraction=0.9))
            paths, counts = image_list(data, args.images)
            for name in names:
                cfg = CONFIGS[name]
                path = build_random_ensemble(
                    Path(tmp) / name,
                    detector=cfg["detector"],
                    det_size=cfg["det_size"],
                    classifiers=list(cfg["classifiers"]),
                    tta_flip=cfg["tta_flip"],
                )
                ensemble = read_ensemble(path)
                rows = [
                    bench_runtime(
                        ensemble,
                        rt,
                        paths,
                        counts,
                        device=args.device,
                        threads=args.threads,
                        batch_size=args.batch,
                        warmup=min(args.warmup, len(paths)),
                        int8=args.int8,
                    )
                    for rt in runtimes
                ]
                header = (
                    f"== {name}: {cfg['detector']}@{cfg['det_size']} + "
                    + ", ".join(f"{c}@{s}" for c, s in cfg["classifiers"])
                    + (" (flip TTA)" if cfg["tta_flip"] else "")
                    + f"; {len(paths)} images, batch {args.batch}, {args.threads} thread(s), device {args.device}"
                )
                print(format_table(rows, header), flush=True)
                results[name] = [r.as_dict() for r in rows]
    except CytologiaInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
