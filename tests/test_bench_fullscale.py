"""scripts/bench_fullscale.py: the growth exponent, and (benchmark) every step at a toy fraction, twice, through the
table with its exponents: ``pytest -m bench tests/test_bench_fullscale.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_fullscale.py"
_spec = importlib.util.spec_from_file_location("bench_fullscale", SCRIPT)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_fullscale"] = bench
_spec.loader.exec_module(bench)


def test_growth_exponent() -> None:
    n = [1000.0, 2000.0, 4000.0, 8000.0]
    assert bench.growth(n, [3.0 * x for x in n]) == pytest.approx(1.0)
    assert bench.growth(n, [x**2 / 7 for x in n]) == pytest.approx(2.0)
    assert bench.growth(n, [5.0, 5.0, 5.0, 5.0]) == pytest.approx(0.0)
    assert bench.growth(n[:1], [1.0]) is None and bench.growth(n, [None, None, 1.0, None]) is None


@pytest.mark.bench
def test_every_step_at_two_toy_fractions(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--fraction", "0.002", "0.004", "--root", str(tmp_path), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "fullscale.json").read_text())
    for fraction in ("0.002", "0.004"):
        assert set(results[fraction]) == set(bench.STEPS)
        bad = {s: r["error"] for s, r in results[fraction].items() if "error" in r}
        assert not bad, bad
        assert all(r["cpu_s"] >= 0 and r["peak_rss_mb"] > 0 for r in results[fraction].values())
    assert results["0.004"]["synth"]["extra"]["images"] == round(69168 * 0.004)
    assert results["0.004"]["predict"]["extra"]["test_images"] > 0
    check_table((out / "fullscale.md").read_text(), n_fractions=2)


def check_table(text: str, n_fractions: int) -> None:
    """The table: a header, a separator, one row per step with a cell per fraction, and the exponents of the steps
    whose CPU time is never zero (at toy sizes fixed costs dominate: an exponent may be anything, but not missing)."""
    lines = text.splitlines()
    assert lines[1].startswith("|---")
    rows = [line for line in lines if line.startswith("| ")]
    assert len(rows) == 1 + len(bench.STEPS)
    split = [[c.strip() for c in row.strip()[1:-1].split("|")] for row in rows[1:]]
    cells = {parts[0].split(" (")[0]: parts[1:] for parts in split}
    assert list(cells) == list(bench.STEPS)
    assert all(len(c) == n_fractions + 2 for c in cells.values())
    for step in ("synth", "validate_lenient_jpeg", "duplicates", "folds", "tune", "predict"):
        float(cells[step][-2])


def test_table_layout() -> None:
    one = {"wall_s": 2.0, "cpu_s": 1.0, "peak_rss_mb": 100.0, "baseline_rss_mb": 70.0}
    two = {"wall_s": 4.0, "cpu_s": 2.0, "peak_rss_mb": 190.0, "baseline_rss_mb": 70.0}
    results = {
        "0.1": dict.fromkeys(bench.STEPS, one),
        "0.2": {**dict.fromkeys(bench.STEPS, two), "score": {"error": "x"}},
    }
    text = bench.table(results)
    check_table(text, n_fractions=2)
    row = next(line for line in text.splitlines() if line.startswith("| synth "))
    assert row.endswith("| 1.00 | 2.00 |")  # images x2: CPU x2 (linear), memory above the baseline 30 -> 120 MB (x4)
    assert "| error |" in next(line for line in text.splitlines() if line.startswith("| score "))
