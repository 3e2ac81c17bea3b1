"""`cytologia bench synth`: generation speed, per core and with several worker processes
(:func:`cytologia.data.synthetic.bench.bench_synth`). The last line printed is a JSON object with the numbers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cytologia.data.synthetic.bench import TARGET_PER_CORE, bench_synth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=300, help="images per measurement (default 300)")
    parser.add_argument("--size", type=int, default=368, help="square image side in px (default 368)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--workers", type=int, default=0, help="processes for the parallel run (default 0 = one per CPU)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the temporary sets are written (default: the system temp dir)"
    )


def run(args: argparse.Namespace) -> int:
    if args.images < 1:
        print(f"error: --images must be >= 1, got {args.images}")
        return 2
    res = bench_synth(args.images, args.size, args.workers, args.seed, args.dir)
    print(f"synth @ {res['size']} px, {res['images']} images:")
    print(
        f"  generate, 1 process     {res['per_core_images_per_s']:8.1f} images per CPU-second "
        f"(target {TARGET_PER_CORE:.0f}: {'met' if res['meets_target'] else 'NOT met'}); "
        f"wall {res['single_process_wall_images_per_s']:.1f} images/s at load {res['load_avg_1min']}"
    )
    print(f"  render+encode only      {res['render_encode_per_core_images_per_s']:8.1f} images per CPU-second")
    if "workers" in res:
        print(f"  generate, {res['workers']} workers    {res['parallel_images_per_s']:8.1f} images/s (wall)")
    print(json.dumps(res))
    return 0
