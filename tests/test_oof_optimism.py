"""scripts/oof_optimism.py at toy size (a benchmark: ``pytest -m bench tests/test_oof_optimism.py``): each mode's
members come from the checkpoints that mode selects, the training is the same in every mode, and the tables are
written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "oof_optimism.py"
spec = importlib.util.spec_from_file_location("oof_optimism", SCRIPT)
oof_optimism = importlib.util.module_from_spec(spec)
spec.loader.exec_module(oof_optimism)


@pytest.mark.bench
def test_toy_run_writes_both_modes(tmp_path: Path) -> None:
    out = oof_optimism.main(
        [
            "--out",
            str(tmp_path),
            "--images",
            "40",
            "--synth-size",
            "96",
            "--members",
            "test_convnext,resnet10t",
            "--img-size",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--bootstrap",
            "20",
        ]
    )
    assert json.loads((tmp_path / "oof_optimism.json").read_text()) == out
    text = (tmp_path / "oof_optimism.md").read_text()
    assert "| last | resnet10t |" in text and "| best_val |" in text and "Selection's own optimism" in text
    assert out["same_training"] is True  # only the selection differs between the modes
    for mode, ckpt in (("last", "last.ckpt"), ("best_val", "best.ckpt")):
        result = out["results"]["0"][mode]
        assert set(result["ensemble"]["checkpoint_selection"].values()) == {mode}
        for member in result["members"].values():
            assert member["select"] == mode and member["checkpoints"] == [ckpt, ckpt]
            assert -1.0 <= member["gap"] <= 1.0 and 0.0 <= member["test_f1"] <= 1.0
    with pytest.raises(SystemExit):
        oof_optimism.parse_args(["--modes", "last,peek"])
