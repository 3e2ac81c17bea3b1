"""scripts/check_demo.py: a healthy demo summary passes; each broken stage is named and fails the check."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_demo.py"
spec = importlib.util.spec_from_file_location("check_demo", SCRIPT)
check_demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_demo)

HEALTHY = {
    "scores": {
        "two-stage": {"score": 0.61, "giou": 0.91, "f1": 0.53},
        "single-stage": {"score": 0.33, "giou": 0.91, "f1": 0.19},
        "null": {"score": 0.16, "giou": 0.78, "f1": 0.01},
    },
    "stage_cpu_seconds": {"data": 3.0, "detector": 400.0, "clean": 2.0, "classifier a": 150.0, "classifier b": 90.0},
    "single_stage": {"budget": {"clock": "cpu", "time_min": 10.67}, "train_cpu_seconds": 655.0},
}


def _broken(path: str, value: object) -> dict:
    out = copy.deepcopy(HEALTHY)
    *keys, last = path.split(".")
    node = out
    for k in keys:
        node = node[k]
    node[last] = value
    return out


def test_a_healthy_summary_passes() -> None:
    assert check_demo.check(HEALTHY) == []


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("scores.two-stage.giou", 0.70, "GIoU"),  # the detector finds no cell: null-box GIoU
        ("scores.two-stage.f1", 0.05, "macro-F1"),  # classifiers at chance
        ("scores.two-stage.score", 0.40, "two-stage score"),
        ("scores.single-stage.score", 0.58, "minus single-stage"),  # two-stage not clearly above the baseline
        ("scores.null.score", 0.45, "minus null"),
        ("single_stage.budget.clock", "wall", "clock"),  # budget counted on the wall clock again
        ("single_stage.train_cpu_seconds", 200.0, "budgets do not match"),
        ("scores.two-stage.score", float("nan"), "two-stage score"),
    ],
)
def test_each_broken_stage_fails_with_its_name(path: str, value: object, named: str) -> None:
    failures = check_demo.check(_broken(path, value))
    assert failures and any(named in f for f in failures), failures


def test_a_missing_step_fails() -> None:
    summary = copy.deepcopy(HEALTHY)
    del summary["scores"]["single-stage"]
    assert any("single-stage" in f for f in check_demo.check(summary))


def test_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "2026-01-01_00-00-00", tmp_path / "2026-01-02_00-00-00"
    for folder, summary in ((good, HEALTHY), (bad, _broken("scores.two-stage.f1", 0.0))):
        folder.mkdir()
        (folder / check_demo.SUMMARY_FILE).write_text(json.dumps(summary))
    assert check_demo.main([str(good)]) == 0
    assert check_demo.main(["--root", str(tmp_path)]) == 1  # the newest run is the broken one
    assert "FAIL: two-stage macro-F1" in capsys.readouterr().err
    assert check_demo.main([str(tmp_path / "absent")]) == 2
