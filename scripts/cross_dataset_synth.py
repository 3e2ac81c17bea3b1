"""Cross-data-set gap on generated data: train on half of the images of sources S01-S05, score on the other half
(same scanners and stains) and on the images of S06-S10 (other ones), with `cytologia evaluate`'s function.

    python scripts/cross_dataset_synth.py --out outputs/cross_synth   # ~3-8 min on a 2-core CPU

Prints and writes (``OUT/summary.json``) the shared-class macro-F1 and accuracy of both runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd

from cytologia.crossdata import evaluate_cross
from cytologia.data.synthetic.generate import SynthConfig, generate

SOURCES_A = {f"S0{k}" for k in range(1, 6)}


def split(root: Path, out: Path) -> dict[str, Path]:
    """Data folders A1 / A2 (alternate images of sources S01-S05) and B (S06-S10), images hard-linked."""
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    source = table["NAME"].map(pd.read_csv(root / "sources.csv", dtype=str).set_index("NAME")["source"])
    in_a = source.isin(SOURCES_A)
    half = set(sorted(table.loc[in_a, "NAME"].unique())[::2])
    masks = {"A1": in_a & table["NAME"].isin(half), "A2": in_a & ~table["NAME"].isin(half), "B": ~in_a}
    folders = {}
    for name, mask in masks.items():
        folder = out / name
        (folder / "images").mkdir(parents=True)
        for image in table.loc[mask, "NAME"].unique():
            os.link(root / "images" / image, folder / "images" / image)
        table[mask].to_csv(folder / "train.csv", index=False)
        folders[name] = folder
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    generate(args.out / "gen", args.images, seed=args.seed, config=SynthConfig(size=160, test_fraction=0.0))
    folders = split(args.out / "gen", args.out)
    overrides = [
        "+exp=smoke",
        "classifier.name=resnet10t",
        "classifier.img_size=64",
        f"trainer.max_epochs={args.epochs}",
        "trainer.batch_size=16",
    ]
    summary = {}
    for test in ("A2", "B"):
        result = evaluate_cross(folders["A1"], folders[test], args.out / f"run_{test}", overrides)
        print(result.summary().splitlines()[0])
        summary[test] = {
            k: getattr(result, k) for k in ("macro_f1_shared", "accuracy_shared", "n_scored", "shared_classes")
        }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
