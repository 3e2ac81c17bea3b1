"""Smears (patients) of a generated set: groups of images whose class mixes differ, some pathological.

A real smear is one patient's slide, scanned by one centre, and the Cytologia tables do not name it. The generated
set gets one (``smears.csv``: ``NAME,smear,profile``; like ``sources.csv``, known truth for evaluation) by grouping
the images it already drew -- no image, box or class of the set changes, so every existing seed gives the same
files as before, plus this one:

- images are grouped per split (a smear is counted on one split's predictions); a split of ``C`` cells makes
  ``max(1, round(C / TARGET_CELLS))`` smears, each with a profile -- normal, blast-rich, lymphoma-rich: each of
  the three once when there are three smears or more, the others drawn from :data:`PROFILE_SHARES`. (A real smear
  also comes from one centre; the generated sets are too small to group by source as well: a source holds a dozen
  test cells in the demo, one smear's worth, and its mix would be the source's, not a profile's.)
- the images, in a random order, join a smear with probability proportional to the product over their cells of the
  profile's affinity for the cell's class (:data:`AFFINITY`: a blast-rich smear draws blasts 20x more readily, a
  normal smear takes abnormal cells 20x less readily) times whether the smear has room left (an even share of the
  group's cells), so blast-rich smears collect the blasts.

The draw uses its own stream ``SeedSequence(seed, spawn_key=(4,))`` of the set's seed.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

SMEARS_FILE = "smears.csv"
SMEAR_COLUMNS: tuple[str, ...] = ("NAME", "smear", "profile")
TARGET_CELLS = 40  # cells per smear (the demo's test split holds ~130 cells: a few smears per source)
PROFILE_SHARES: dict[str, float] = {"normal": 0.5, "blasts": 0.25, "lymphoma": 0.25}
BLAST_CLASSES: tuple[str, ...] = ("B", "MBL", "LyB", "MoB")
LYMPHOMA_CLASSES: tuple[str, ...] = ("LF", "LLC", "LM", "LZMG", "SS")
ABNORMAL_CLASSES: tuple[str, ...] = (*BLAST_CLASSES, *LYMPHOMA_CLASSES, "LAM3")
AFFINITY = 20.0  # how much more (or less) readily a profile takes a cell of its kind


def _affinity(profile: str, cls: str) -> float:
    if profile == "normal":
        return 1.0 / AFFINITY if cls in ABNORMAL_CLASSES else 1.0
    kind = BLAST_CLASSES if profile == "blasts" else LYMPHOMA_CLASSES
    return AFFINITY if cls in kind else 1.0


def smear_table(boxes: pd.DataFrame, seed: int) -> pd.DataFrame:
    """``NAME,smear,profile`` of every image of ``boxes`` (``NAME, class, split``: one row per box); see the module
    docstring."""
    missing = [c for c in ("NAME", "class", "split") if c not in boxes.columns]
    if missing:
        raise CytologiaInputError(f"boxes table: missing column(s) {', '.join(missing)}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4,)))
    per_image = (
        boxes.astype({"NAME": str}).groupby("NAME", sort=True).agg(classes=("class", list), split=("split", "first"))
    )
    profiles = list(PROFILE_SHARES)
    shares = np.array([PROFILE_SHARES[p] for p in profiles])
    rows: list[tuple[str, str, str]] = []
    n_smears = 0
    for _split, group in per_image.groupby("split", sort=True):
        cells = int(group["classes"].map(len).sum())
        k = max(1, round(cells / TARGET_CELLS))
        kinds = [profiles[i] for i in rng.choice(len(profiles), size=k, p=shares)]
        if k >= len(profiles):  # each profile at least once
            kinds = [*profiles, *kinds[len(profiles) :]]
            kinds = [kinds[i] for i in rng.permutation(k)]
        room = np.full(k, math.ceil(cells / k), dtype=np.float64)
        ids = [f"S{n_smears + j + 1:03d}" for j in range(k)]
        n_smears += k
        # an image's affinity depends on the smear's profile only: computed once per profile, then spread over the k
        # smears by index (k grows with the set: per smear it was O(images x smears) in Python, ~150 s at full size)
        kind_of = np.array([profiles.index(p) for p in kinds])
        for name in group.index[rng.permutation(len(group))]:
            classes = group.at[name, "classes"]
            weight = np.array([math.prod(_affinity(p, c) for c in classes) for p in profiles])[kind_of]
            fits = room >= len(classes)
            weight = weight * fits if fits.any() else weight
            j = int(rng.choice(k, p=weight / weight.sum()))
            room[j] -= len(classes)
            rows.append((str(name), ids[j], kinds[j]))
    return pd.DataFrame(sorted(rows), columns=list(SMEAR_COLUMNS))


def smears_of_folder(root: str | Path) -> pd.DataFrame:
    """:func:`smear_table` of a generated data folder (``train.csv``, ``test_labels.csv`` and the seed in
    ``synth.json``): what :func:`cytologia.data.synthetic.generate.generate` writes as ``smears.csv``."""
    root = Path(root)
    need = [root / f for f in ("train.csv", "test_labels.csv", "synth.json")]
    lacking = [p.name for p in need if not p.is_file()]
    if lacking:
        raise CytologiaInputError(f"{root}: not a generated set (missing {', '.join(lacking)}): no smears to draw")
    seed = int(json.loads((root / "synth.json").read_text())["seed"])
    read = lambda p: pd.read_csv(p, dtype={"NAME": str}, keep_default_na=False)  # noqa: E731
    train, test = read(root / "train.csv"), read(root / "test_labels.csv")
    boxes = pd.concat([train.assign(split="train"), test.assign(split="test")], ignore_index=True)
    return smear_table(boxes[["NAME", "class", "split"]], seed)


def ensure_smears(root: str | Path) -> Path:
    """``root/smears.csv``, drawn from the generated set's own tables when it is not there yet (a set generated
    before smears existed); returns its path."""
    path = Path(root) / SMEARS_FILE
    if not path.is_file():
        table = smears_of_folder(root)
        table.to_csv(path, index=False, lineterminator="\n")
        log.info("wrote %s: %d images in %d smears", path, len(table), table["smear"].nunique())
    return path
