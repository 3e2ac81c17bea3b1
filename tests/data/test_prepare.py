"""Shared data preparation: the generated data folder, folds made once and checked on reuse, bad fold tables."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cytologia.data.prepare import FOLDS_FILE, ensure_data, ensure_folds, read_folds, read_train
from cytologia.errors import CytologiaInputError, ValidationError


def _cfg(root: Path, k: int = 2, synthetic: bool = True):
    return OmegaConf.create(
        {
            "data": {"root": str(root), "synthetic": synthetic, "n_images": 16, "synth_seed": 1, "lenient": True},
            "folds": {"k": k, "mode": "stratified", "seed": 42, "near_threshold": 4},
        }
    )


def test_generate_then_folds_are_made_once_and_checked(tmp_path: Path) -> None:
    root = tmp_path / "synth"
    cfg = _cfg(root)
    assert ensure_data(cfg) == root and (root / "train.csv").is_file()
    table = read_train(cfg, root)
    folds = ensure_folds(cfg, table, root)
    assert set(folds["fold"]) == {0, 1} and set(table["NAME"]) <= set(folds["NAME"])
    mtime = (root / FOLDS_FILE).stat().st_mtime_ns
    assert ensure_folds(cfg, table, root).equals(folds)  # reused, not remade
    assert (root / FOLDS_FILE).stat().st_mtime_ns == mtime
    with pytest.raises(CytologiaInputError, match="delete"):
        ensure_folds(_cfg(root, k=3), table, root)  # made with k=2: stale for k=3


def test_real_data_absent_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CytologiaInputError, match="train.csv: no such file"):
        ensure_data(_cfg(tmp_path / "nowhere", synthetic=False))


def test_bad_fold_table_names_rows(tmp_path: Path) -> None:
    path = tmp_path / "folds.csv"
    path.write_text("NAME,fold\na.jpg,0\nb.jpg,x\na.jpg,1\n")
    with pytest.raises(ValidationError) as err:
        read_folds(path)
    assert "row 2" in str(err.value) and "row 3" in str(err.value)
