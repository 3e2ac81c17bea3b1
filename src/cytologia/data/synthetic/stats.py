"""Statistics of the real data set (``real_stats.json``) and the class draw built on them.

The JSON is made by ``scripts/make_synth_stats.py`` from the real ``train.csv``/``test.csv``; only aggregates are
stored. The generator reads it for class frequencies, cells per image, which classes come in multi-cell images,
box sizes per class and how boxes shrink when an image holds many cells.

Class draw (:func:`class_quotas`, :func:`assign_classes`): each split gets an exact *quota* per class, the real
frequency times its number of boxes (stochastically rounded), with a floor of ``min_per_class`` boxes per class
(lowered to what fits when a split has fewer than ``23 * min_per_class`` boxes). A stratified draw rather than i.i.d.
sampling: frequencies match the real ones as closely as integers allow, and the rarest class (SS, 1.35 % of the real
boxes) still appears in small sets, which an i.i.d. draw would miss about half the time in 50 boxes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from cytologia.data.schema import CLASSES


@dataclass(frozen=True)
class RealStats:
    """The parts of ``real_stats.json`` the generator uses (see the JSON's ``about``)."""

    reference_px: int
    train_image_fraction: float
    name_regex: str
    class_freq: dict[str, float]  # share of all boxes
    class_multi_fraction: dict[str, float]  # share of a class's boxes that sit in multi-cell images
    cells_per_image: dict[int, float]  # probability of n boxes per image
    multi_same_class_prob: float  # P(another cell of a multi-cell image repeats the first cell's class)
    box_size_px: dict[str, tuple[float, float, float]]  # q10, q50, q90 of sqrt(w*h) in single-cell images
    box_log_aspect_std: float
    size_by_cells: dict[int, float]  # median box size relative to single-cell images
    single_centre_offset_std_px: float
    negative_corner_box_fraction: float


@lru_cache(maxsize=1)
def load_real_stats() -> RealStats:
    """Read the packaged ``real_stats.json``."""
    raw = json.loads(resources.files("cytologia.data.synthetic").joinpath("real_stats.json").read_text())
    counts = raw["class_counts"]
    missing = set(CLASSES) - set(counts)
    if missing:
        raise RuntimeError(f"real_stats.json lacks classes {sorted(missing)}; re-run scripts/make_synth_stats.py")
    total = sum(counts[c] for c in CLASSES)
    cells = {int(k): v for k, v in raw["cells_per_image"].items()}
    n_img = sum(cells.values())
    return RealStats(
        reference_px=int(raw["reference_px"]),
        train_image_fraction=float(raw["train_image_fraction"]),
        name_regex=raw["name_regex"],
        class_freq={c: counts[c] / total for c in CLASSES},
        class_multi_fraction={c: float(raw["class_multi_fraction"][c]) for c in CLASSES},
        cells_per_image={k: v / n_img for k, v in sorted(cells.items())},
        multi_same_class_prob=float(raw["multi_same_class_prob"]),
        box_size_px={c: (v["q10"], v["q50"], v["q90"]) for c, v in raw["box_size_px"].items()},
        box_log_aspect_std=float(raw["box_log_aspect_std"]),
        size_by_cells={int(k): float(v) for k, v in raw["size_by_cells"].items()},
        single_centre_offset_std_px=float(raw["single_centre_offset_std_px"]),
        negative_corner_box_fraction=float(raw["negative_corner_box_fraction"]),
    )


def draw_cells_per_image(rng: np.random.Generator, n_images: int, stats: RealStats, max_cells: int = 11) -> np.ndarray:
    """Number of boxes of each image, i.i.d. from the real distribution (93 % single, at most ``max_cells``)."""
    ks = np.array([k for k in stats.cells_per_image if k <= max_cells])
    p = np.array([stats.cells_per_image[k] for k in ks])
    return rng.choice(ks, size=n_images, p=p / p.sum())


def class_quotas(rng: np.random.Generator, n_boxes: int, stats: RealStats, min_per_class: int = 3) -> np.ndarray:
    """Exact number of boxes per class (in ``CLASSES`` order) for a split of ``n_boxes`` boxes.

    Real frequency times ``n_boxes``, stochastically rounded so the total is exact, then every class raised to
    ``min(min_per_class, n_boxes // 23)`` by taking boxes from the classes with the largest quotas.
    """
    p = np.array([stats.class_freq[c] for c in CLASSES])
    base = p * n_boxes
    quota = np.floor(base).astype(int)
    short = n_boxes - int(quota.sum())
    if short > 0:
        frac = base - quota
        extra = rng.choice(len(CLASSES), size=short, replace=False, p=frac / frac.sum())
        quota[extra] += 1
    floor = min(min_per_class, n_boxes // len(CLASSES))
    while (quota < floor).any():
        low = int(np.argmin(quota))
        quota[low] += 1
        quota[int(np.argmax(quota))] -= 1
    return quota


def assign_classes(rng: np.random.Generator, cells: np.ndarray, quota: np.ndarray, stats: RealStats) -> list[list[str]]:
    """Class of every box of every image, using up ``quota`` exactly (``quota.sum() == cells.sum()``).

    Multi-cell images are filled first: the first cell's class is drawn in proportion to the remaining quota times
    the class's real share of boxes in multi-cell images (LF, MoB, LLC come in groups; SS, BA almost never), each
    further cell repeats it with the real probability, else is drawn the same way. Single-cell images take what
    is left, shuffled.
    """
    if int(quota.sum()) != int(cells.sum()):
        raise ValueError(f"quota total {int(quota.sum())} != number of boxes {int(cells.sum())}")
    left = quota.astype(float).copy()
    multi_w = np.array([stats.class_multi_fraction[c] for c in CLASSES]) + 1e-3
    out: list[list[str]] = [[] for _ in range(len(cells))]

    def draw() -> int:
        w = left * multi_w
        k = int(rng.choice(len(CLASSES), p=w / w.sum()))
        left[k] -= 1
        return k

    for i in np.flatnonzero(cells > 1):
        first = draw()
        ks = [first]
        for _ in range(int(cells[i]) - 1):
            if left[first] > 0 and rng.random() < stats.multi_same_class_prob:
                left[first] -= 1
                ks.append(first)
            else:
                ks.append(draw())
        out[i] = [CLASSES[k] for k in ks]
    pool = np.repeat(np.arange(len(CLASSES)), left.astype(int))
    rng.shuffle(pool)
    for i, k in zip(np.flatnonzero(cells == 1), pool):
        out[i] = [CLASSES[int(k)]]
    return out


def draw_box_size(rng: np.random.Generator, cls: str, stats: RealStats) -> float:
    """A box side (sqrt of area, px at the reference size) for a single-cell image: log-normal through the real
    median with the real q10-q90 spread (upper tail capped at 1.5x the real q90)."""
    q10, q50, q90 = stats.box_size_px[cls]
    sigma = (np.log(q90) - np.log(q10)) / (2 * 1.2816)  # q10..q90 spans +-1.2816 sd of a normal
    return float(min(np.exp(rng.normal(np.log(q50), sigma)), 1.5 * q90))
