"""Smears of a generated set: every image in one smear, mixes that differ by profile, the rest of the set unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia.data.synthetic import generate as generate_module
from cytologia.data.synthetic.generate import SynthConfig, generate
from cytologia.data.synthetic.smears import BLAST_CLASSES, SMEARS_FILE, ensure_smears, smears_of_folder


def _digests(folder: Path) -> dict[str, str]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != SMEARS_FILE]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_smears_group_every_image_and_leave_the_set_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SynthConfig(size=96)
    generate(tmp_path / "with", 160, seed=5, config=cfg)
    monkeypatch.setattr(generate_module, "ensure_smears", lambda out_dir: None)  # the generator without smears
    generate(tmp_path / "without", 160, seed=5, config=cfg)
    assert not (tmp_path / "without" / SMEARS_FILE).exists()
    assert _digests(tmp_path / "with") == _digests(tmp_path / "without")  # smears change no other file

    smears = pd.read_csv(tmp_path / "with" / SMEARS_FILE, dtype=str)
    images = sorted(p.name for p in (tmp_path / "with" / "images").iterdir())
    assert sorted(smears["NAME"]) == images  # every image in exactly one smear
    # drawn again from the folder's own tables (a set generated before smears existed): the same
    pd.testing.assert_frame_equal(smears_of_folder(tmp_path / "with"), smears)
    ensure_smears(tmp_path / "without")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "without" / SMEARS_FILE, dtype=str), smears)

    # a smear holds one split's images, and blast-rich smears hold more blasts than normal ones
    train = pd.read_csv(tmp_path / "with" / "train.csv", dtype=str).assign(split="train")
    test = pd.read_csv(tmp_path / "with" / "test_labels.csv", dtype=str).assign(split="test")
    boxes = pd.concat([train, test]).merge(smears, on="NAME")
    assert (boxes.groupby("smear")["split"].nunique() == 1).all()
    share = boxes.assign(blast=boxes["class"].isin(BLAST_CLASSES)).groupby("profile")["blast"].mean()
    assert set(share.index) == {"normal", "blasts", "lymphoma"}
    assert share["blasts"] > 2 * share["normal"], share


def _smear_table_per_smear(boxes: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The first implementation, weight computed per smear (O(images x smears) in Python): the reference."""
    import math

    from cytologia.data.synthetic.smears import PROFILE_SHARES, SMEAR_COLUMNS, TARGET_CELLS, _affinity

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4,)))
    per_image = boxes.groupby("NAME", sort=True).agg(classes=("class", list), split=("split", "first"))
    profiles = list(PROFILE_SHARES)
    shares = np.array([PROFILE_SHARES[p] for p in profiles])
    rows, n_smears = [], 0
    for _split, group in per_image.groupby("split", sort=True):
        cells = int(group["classes"].map(len).sum())
        k = max(1, round(cells / TARGET_CELLS))
        kinds = [profiles[i] for i in rng.choice(len(profiles), size=k, p=shares)]
        if k >= len(profiles):
            kinds = [*profiles, *kinds[len(profiles) :]]
            kinds = [kinds[i] for i in rng.permutation(k)]
        room = np.full(k, math.ceil(cells / k), dtype=np.float64)
        ids = [f"S{n_smears + j + 1:03d}" for j in range(k)]
        n_smears += k
        for name in group.index[rng.permutation(len(group))]:
            classes = group.at[name, "classes"]
            weight = np.array([math.prod(_affinity(p, c) for c in classes) for p in kinds])
            weight = weight * (room >= len(classes)) if (room >= len(classes)).any() else weight
            j = int(rng.choice(k, p=weight / weight.sum()))
            room[j] -= len(classes)
            rows.append((str(name), ids[j], kinds[j]))
    return pd.DataFrame(sorted(rows), columns=list(SMEAR_COLUMNS))


def test_smear_draw_equals_the_per_smear_reference() -> None:
    from cytologia.data.schema import CLASSES
    from cytologia.data.synthetic.smears import smear_table

    rng = np.random.default_rng(3)
    n_images = 900
    counts = rng.integers(1, 4, size=n_images)
    names = np.repeat([f"img{i:04d}.jpg" for i in range(n_images)], counts)
    split = np.repeat(np.where(rng.random(n_images) < 0.3, "test", "train"), counts)
    boxes = pd.DataFrame({"NAME": names, "class": rng.choice(list(CLASSES), size=len(names)), "split": split})
    got = smear_table(boxes, seed=5)
    assert got["smear"].nunique() > 30  # many smears: the case where the per-profile weights are spread by index
    pd.testing.assert_frame_equal(got, _smear_table_per_smear(boxes, seed=5))
