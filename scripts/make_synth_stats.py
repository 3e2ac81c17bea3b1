"""Derive the small statistics file the synthetic generator reads from the real Cytologia tables.

    python scripts/make_synth_stats.py [--train ../shared/data/cytologia/train.csv] [--test ...] [--out ...]

The real tables are never copied into the repository; only the aggregate numbers below are
(``src/cytologia/data/synthetic/real_stats.json``, package data). Re-running the script on the same tables gives
the same file byte for byte.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cytologia"
DEFAULT_OUT = ROOT / "src" / "cytologia" / "data" / "synthetic" / "real_stats.json"
NAME_REGEX = r"[0-9a-f]{8}-[0-9a-f]\.jpg"
# MISSION.md: images are "mostly about 360x368 px"; box sizes below are in pixels of such an image. The real
# table has no image sizes, so single-cell images whose boxes end inside 368 px stand for that reference size.
REFERENCE_PX = 368


def _r(x: float, nd: int = 4) -> float:
    return float(round(float(x), nd))


def derive(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, object]:
    """All statistics the generator uses, as a JSON-able dict."""
    df = train.copy()
    n_per_image = df.groupby("NAME").size().rename("n")
    df = df.join(n_per_image, on="NAME")
    df["w"] = df.x2 - df.x1
    df["h"] = df.y2 - df.y1
    df["s"] = np.sqrt(df.w.clip(lower=1) * df.h.clip(lower=1))
    single = df[(df.n == 1) & (df.x2 <= REFERENCE_PX) & (df.y2 <= REFERENCE_PX) & (df.x1 >= 0) & (df.y1 >= 0)]

    class_counts = df["class"].value_counts().sort_index()
    multi_frac = df.groupby("class").n.apply(lambda s: (s > 1).mean()).sort_index()

    cells = n_per_image.value_counts().sort_index()
    test_cells = test.groupby("NAME").size().value_counts().sort_index()

    # Same-class structure of multi-cell images: the fraction of boxes that carry their image's majority class.
    multi = df[df.n > 1]
    majority = multi.groupby("NAME")["class"].agg(lambda s: s.value_counts().iloc[0] / len(s))
    w_img = multi.groupby("NAME").size()
    majority_frac = float((majority * w_img).sum() / w_img.sum())
    # Generator model: the first cell's class is drawn, every other cell repeats it with probability q, else is
    # drawn afresh. Box-weighted majority fraction ~= sum_n c_n (1 + (n-1) q) / sum_n c_n n (n >= 2): solve for q.
    cm = cells[cells.index >= 2]
    num = majority_frac * float((cm * cm.index).sum()) - float(cm.sum())
    den = float((cm * (cm.index - 1)).sum())
    same_prob = float(np.clip(num / den, 0.0, 1.0))

    box_size = {}
    for cls, g in single.groupby("class"):
        q10, q50, q90 = np.quantile(g.s, [0.1, 0.5, 0.9])
        box_size[cls] = {"q10": _r(q10, 1), "q50": _r(q50, 1), "q90": _r(q90, 1)}
    log_aspect = np.log(single.w.clip(lower=1) / single.h.clip(lower=1))
    lo, hi = np.quantile(log_aspect, [0.01, 0.99])
    aspect_std = float(log_aspect[(log_aspect > lo) & (log_aspect < hi)].std())

    med1 = float(df[df.n == 1].s.median())
    size_by_cells = {}
    for n_cells, g in df.groupby("n"):
        size_by_cells[str(int(n_cells))] = _r(g.s.median() / med1, 3)

    # Centre of the single box relative to the 368 px image centre (184); robust spread (IQR / 1.349).
    off = ((single.x1 + single.x2) / 2 - REFERENCE_PX / 2).to_numpy()
    q25, q75 = np.quantile(off, [0.25, 0.75])

    neg = int(((df.x1 < 0) | (df.y1 < 0)).sum())
    name_ok = float(df.NAME.str.fullmatch(NAME_REGEX).mean())
    n_train_img, n_test_img = int(n_per_image.size), int(test.NAME.nunique())
    return {
        "about": "Aggregates of the real Cytologia train.csv/test.csv (Trustii 2024-25), made by "
        "scripts/make_synth_stats.py; box sizes are sqrt(w*h) in px of a ~368 px image.",
        "reference_px": REFERENCE_PX,
        "n_train_boxes": int(len(df)),
        "n_train_images": n_train_img,
        "n_test_boxes": int(len(test)),
        "n_test_images": n_test_img,
        "train_image_fraction": _r(n_train_img / (n_train_img + n_test_img)),
        "name_regex": NAME_REGEX,
        "name_regex_match_fraction": _r(name_ok),
        "class_counts": {k: int(v) for k, v in class_counts.items()},
        "class_multi_fraction": {k: _r(v) for k, v in multi_frac.items()},
        "cells_per_image": {str(int(k)): int(v) for k, v in cells.items()},
        "test_cells_per_image": {str(int(k)): int(v) for k, v in test_cells.items()},
        "multi_majority_fraction": _r(majority_frac),
        "multi_same_class_prob": _r(same_prob),
        "box_size_px": box_size,
        "box_log_aspect_std": _r(aspect_std),
        "size_by_cells": size_by_cells,
        "single_centre_offset_std_px": _r((q75 - q25) / 1.349, 2),
        "negative_corner_box_fraction": _r(neg / len(df), 5),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, default=DEFAULT_DATA / "train.csv")
    ap.add_argument("--test", type=Path, default=DEFAULT_DATA / "test.csv")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    train = pd.read_csv(args.train, keep_default_na=False)
    test = pd.read_csv(args.test, keep_default_na=False)
    stats = derive(train, test)
    if stats["name_regex_match_fraction"] < 1.0:
        bad = train.NAME[~train.NAME.str.fullmatch(NAME_REGEX)].head(3).tolist()
        print(f"note: some names do not match {NAME_REGEX}: {bad}")
    assert re.fullmatch(NAME_REGEX, "cf7734a2-b.jpg")
    args.out.write_text(json.dumps(stats, indent=1, sort_keys=False) + "\n")
    print(f"wrote {args.out} ({len(stats['class_counts'])} classes, {stats['n_train_boxes']} boxes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
