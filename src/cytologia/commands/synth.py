"""`cytologia synth`: write a synthetic Cytologia data set (Trustii layout) and/or a contact sheet of the renderer
(:func:`cytologia.data.synthetic.generate.generate`, :func:`cytologia.data.synthetic.preview.contact_sheet`).

cytologia synth --out data/synth --images 2000 --seed 0 --workers 2
cytologia synth --out data/tiny --images 40 --size 256 --no-defects
cytologia synth --contact-sheet /tmp/sheet.png
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from cytologia.data.synthetic.defects import DefectRates
from cytologia.data.synthetic.generate import MAX_SIZE, MIN_SIZE, SynthConfig, cpu_count, generate

# Help for the defect-rate options, one per DefectRates field (the option is --rate-<field with dashes>).
_RATE_HELP: dict[str, str] = {
    "box_jitter": "share of training boxes moved/resized by 10-35 %% of their size",
    "past_border": "share of training boxes cut by the border and written unclipped",
    "red_cell": "share of training images with a red cell boxed as a leukocyte",
    "unannotated_border": "share of training images with an unannotated leukocyte cut by the border",
    "exact_duplicate": "share of images that are exact copies of a training image",
    "near_duplicate": "share of images that are re-encoded or shifted copies of a training image",
    "cross_split": "share of the duplicate copies placed in the test split",
    "truncated_jpeg": "share of training images whose JPEG is truncated",
    "extraneous_bytes": "share of training images with junk bytes before the JPEG end marker",
}


def _size(text: str) -> int:
    v = int(text)
    if not MIN_SIZE <= v <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"--size must be in [{MIN_SIZE}, {MAX_SIZE}] px, got {v}")
    return v


def _rate(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"a rate must be in [0, 1], got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="output folder (images/, train.csv, test.csv, ...)")
    parser.add_argument("--images", type=int, default=200, help="number of images, duplicates included (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size", type=_size, default=None, help="square image side in px (default: each source's size, 352-608)"
    )
    parser.add_argument(
        "--test-fraction", type=float, default=None, help="share of test images (default: the real 0.3)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes (default 1; 0 = one per CPU); output does not depend on it"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    parser.add_argument("--contact-sheet", type=Path, default=None, metavar="PNG", help="also write a contact sheet")
    parser.add_argument("--no-defects", action="store_true", help="set every defect rate to 0 (a clean set)")
    defaults = DefectRates()
    for f in fields(DefectRates):
        parser.add_argument(
            f"--rate-{f.name.replace('_', '-')}",
            dest=f"rate_{f.name}",
            type=_rate,
            default=None,
            metavar="R",
            help=f"{_RATE_HELP[f.name]} (default {getattr(defaults, f.name)})",
        )


def rates_from_args(args: argparse.Namespace) -> DefectRates:
    """The defect rates the options ask for: defaults (or zeros with --no-defects), then each --rate-* given."""
    base = DefectRates.none() if args.no_defects else DefectRates()
    values = {f.name: getattr(base, f.name) for f in fields(DefectRates)}
    for name in values:
        given = getattr(args, f"rate_{name}", None)
        if given is not None:
            values[name] = given
    return DefectRates(**values)


def run(args: argparse.Namespace) -> int:
    if args.out is None and args.contact_sheet is None:
        print("error: give --out DIR (a data set) and/or --contact-sheet PNG")
        return 2
    if args.contact_sheet is not None:
        from cytologia.data.synthetic.preview import contact_sheet

        path = contact_sheet(args.contact_sheet, seed=args.seed, size=args.size)
        print(f"contact sheet: {path}")
    if args.out is None:
        return 0
    if args.images < 1:
        print(f"error: --images must be >= 1, got {args.images}")
        return 2
    workers = cpu_count() if args.workers == 0 else args.workers
    cfg = SynthConfig(size=args.size, test_fraction=args.test_fraction, defects=rates_from_args(args))
    s = generate(args.out, args.images, args.seed, cfg, workers=workers, overwrite=args.overwrite)
    print(
        f"wrote {s.n_images} images to {s.out_dir}: train {s.n_train_images} images / {s.n_train_rows} rows, "
        f"test {s.n_test_images} images / {s.n_test_boxes} boxes; {sum(s.defects.values())} defects in noise.csv; "
        f"{s.seconds:.1f} s ({s.images_per_s:.0f} images/s with {s.workers} worker(s))"
    )
    print(json.dumps({k: v for k, v in s.defects.items() if v}))
    return 0
