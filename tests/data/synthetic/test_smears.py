"""Smears of a generated set: every image in one smear, mixes that differ by profile, the rest of the set unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

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
