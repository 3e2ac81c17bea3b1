"""`cytologia baseline`: a valid submission for every test row, scored by `cytologia score` between 0 and 1."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cytologia.cli import main
from cytologia.data.io import read_submission, read_test
from cytologia.data.synthetic.generate import SynthConfig, generate


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, n_images=24, seed=3, config=SynthConfig(size=160))
    return out


def test_baseline_submission_is_valid_and_scores(tiny_set: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred = tiny_set / "baseline.csv"
    assert main(["baseline", "--data", str(tiny_set), "--out", str(pred)]) == 0
    test = read_test(tiny_set / "test.csv")
    sub = read_submission(pred, test=test)  # every trustii_id exactly once, valid class, numeric box
    assert len(sub) == len(test)
    train = pd.read_csv(tiny_set / "train.csv", keep_default_na=False)
    assert set(sub["class"]) == {train["class"].value_counts().idxmax()}
    capsys.readouterr()
    assert main(["score", "--truth", str(tiny_set / "test_labels.csv"), "--pred", str(pred), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 < result["score"] < 0.5  # a centred prior box overlaps most cells; one class everywhere is poor F1
    assert result["giou"] > 0.5


def test_baseline_missing_table_is_exit_2(tmp_path: Path) -> None:
    assert main(["baseline", "--data", str(tmp_path), "--out", str(tmp_path / "p.csv")]) == 2
