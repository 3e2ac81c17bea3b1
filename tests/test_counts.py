"""Differential counts per smear: interval coverage on simulated smears, every cell counted once, smear keys, the
files, ``cytologia count``, and the generated sets' smears."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia.calibration import CAL_PROB_COLUMNS
from cytologia.cli import main
from cytologia.counts import (
    DEFAULT_RULES,
    count_cells,
    differential_counts,
    parse_rule,
    smear_keys,
    smear_posterior,
)
from cytologia.counts_sim import BLASTS, IDX, simulate_smear
from cytologia.data.schema import CLASSES
from cytologia.data.synthetic.stats import load_real_stats
from cytologia.errors import CytologiaInputError

PRIOR = np.array([load_real_stats().class_freq[c] for c in CLASSES])


def _coverage(use_prior: bool, n_smears: int = 30, n_cells: int = 150) -> tuple[float, float]:
    """Share of (smear, class) true shares inside the 95 % intervals, and of the smears' blast-group shares."""
    rng = np.random.default_rng(7)
    per_class, group = [], []
    blasts = [IDX[c] for c in BLASTS]
    for s in range(n_smears):
        sm = simulate_smear(rng, ("normal", "blasts", "lymphoma")[s % 3], n_cells, PRIOR)
        shares, _ = smear_posterior(sm.probs, PRIOR if use_prior else None, draws=300, seed=s)
        lo, hi = np.quantile(shares, [0.025, 0.975], axis=0)
        per_class.append((sm.shares >= lo) & (sm.shares <= hi))
        g = shares[:, blasts].sum(axis=1)
        group.append(np.quantile(g, 0.025) <= sm.shares[blasts].sum() <= np.quantile(g, 0.975))
    return float(np.mean(per_class)), float(np.mean(group))


def test_intervals_cover_the_true_share_of_simulated_smears() -> None:
    per_class, group = _coverage(use_prior=True)
    assert 0.88 <= per_class <= 0.99 and group >= 0.8, (per_class, group)
    # without the prior shift the probabilities keep the training mix: pathological smears are missed
    naive_class, naive_group = _coverage(use_prior=False)
    assert naive_class < per_class - 0.15 and naive_group < 0.6, (naive_class, naive_group)


def _cells(n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(len(CLASSES), 0.3), size=n)
    cells = pd.DataFrame(p, columns=list(CAL_PROB_COLUMNS))
    cells.insert(0, "NAME", [f"smear{int(i) % 4}_img{i:03d}.jpg" for i in range(n)])
    cells["refer"] = rng.random(n) < 0.2
    return cells


def test_every_cell_counted_once_and_shares_add_up() -> None:
    cells = _cells()
    keys = smear_keys(cells["NAME"], regex=r"^(smear\d+)_")
    result = differential_counts(cells, keys, prior=PRIOR, draws=200)
    s = result.smears.set_index("smear")
    assert s["n_cells"].sum() == len(cells)  # nobody lost
    assert (s["n_cells"] == keys.value_counts().reindex(s.index)).all()  # nobody double-counted
    assert (s["referred"] == cells.groupby(keys)["refer"].sum().reindex(s.index)).all()
    c = result.classes
    assert len(c) == 4 * len(CLASSES)
    sums = c.groupby("smear")[["expected_count", "argmax_count", "percent"]].sum()
    np.testing.assert_allclose(sums["expected_count"], s["n_cells"].reindex(sums.index), rtol=1e-9)
    assert (sums["argmax_count"] == s["n_cells"].reindex(sums.index)).all()
    np.testing.assert_allclose(sums["percent"], 100.0, rtol=1e-9)
    assert ((c["percent_lo"] <= c["percent"]) & (c["percent"] <= c["percent_hi"])).all()


def test_smear_keys_name_what_is_missing() -> None:
    names = pd.Series(["a_1.jpg", "b_2.jpg", "zzz.jpg"])
    with pytest.raises(CytologiaInputError, match=r"row 3 \(zzz.jpg\)"):
        smear_keys(names, regex=r"^([ab])_")
    keys = smear_keys(names, regex=r"^([ab])_", lenient=True)
    assert keys.tolist()[:2] == ["a", "b"] and pd.isna(keys.iat[2])
    table = pd.DataFrame({"NAME": ["a_1.jpg", "b_2.jpg"], "patient": ["P1", "P2"]})
    with pytest.raises(CytologiaInputError, match="no row in the smear table"):
        smear_keys(names, table=table, column="patient")
    with pytest.raises(CytologiaInputError, match="one of them"):
        smear_keys(names)
    rule = parse_rule("blasts=B+MBL:7.5")
    assert rule.classes == ("B", "MBL") and rule.threshold == pytest.approx(0.075)
    with pytest.raises(CytologiaInputError, match="unknown"):
        parse_rule("x=NOPE:5")


def test_count_command_writes_every_file_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cells = _cells(60)
    blast_cols = [f"pcal_{c}" for c in ("B", "MBL")]
    sure_blast = cells["NAME"].str.startswith("smear0")  # one smear made of confident blasts
    cells.loc[sure_blast, list(CAL_PROB_COLUMNS)] = 0.0
    cells.loc[sure_blast, blast_cols] = 0.5
    cells.to_csv(tmp_path / "cells.csv", index=False)
    smears = pd.DataFrame({"NAME": cells["NAME"], "smear": cells["NAME"].str[:6]})
    smears.to_csv(tmp_path / "smears.csv", index=False)
    out = tmp_path / "counts"
    argv = ["count", "--cells", str(tmp_path / "cells.csv"), "--smears", str(tmp_path / "smears.csv")]
    assert main([*argv, "--out", str(out), "--draws", "200"]) == 0
    printed = capsys.readouterr().out
    assert "60 of 60 cells in 4 smear(s)" in printed and "no class prior" in printed
    for name in ("counts.csv", "smears.csv", "counts.json", "index.html", "smear_smear0.png"):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "smears.csv", keep_default_na=False).set_index("smear")
    assert "blasts > 5 %" in table.at["smear0", "flags"]
    data = json.loads((out / "counts.json").read_text())
    assert data["settings"]["rules"][0]["name"] == DEFAULT_RULES[0].name and len(data["smears"]) == 4
    # truth beside the counts
    truth = pd.DataFrame({"NAME": cells["NAME"], "class": np.where(sure_blast, "B", "PNN")})
    done = count_cells(tmp_path / "cells.csv", tmp_path / "c2", smears=smears, truth=truth, draws=200, pictures=False)
    assert done.result.smears.set_index("smear").at["smear0", "true blasts %"] == pytest.approx(100.0)
    assert "covered" in done.result.classes.columns
    with pytest.raises(SystemExit):  # no smear key given: argparse refuses
        main([*argv[:3], "--out", str(out)])
