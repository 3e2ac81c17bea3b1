"""The whole pipeline (`+exp=demo` at toy sizes): every step runs, writes its file, and a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from cytologia.data.io import read_submission, read_test
from cytologia.pipeline import SUMMARY_FILE, TIMES_FILE
from cytologia.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TOY = [
    "+exp=demo",
    "data.n_images=24",
    "detector.img_size=64",
    "detector.epochs=1",
    "detector.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.batch_size=8",
    "trainer.progress_bar=false",
    "pipeline.classifiers=[{name: resnet10t, img_size: 32}, {name: test_convnext, img_size: 32}]",
    "pipeline.single_stage.enabled=false",
]


@pytest.mark.ultralytics
def test_toy_pipeline_end_to_end_and_resume(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TOY, f"paths.data_dir={tmp_path / 'data'}"])
    run_dir = tmp_path / "run"
    result = train(cfg, run_dir=run_dir)
    assert result["trained"] is True
    data = tmp_path / "data" / "demo"
    for path in ("detector/oof_boxes.csv", "clean/cleaning_report.csv", "ensemble/ensemble.json",
                 "predict/submission.csv", "baselines/null_submission.csv", "report/index.html"):  # fmt: skip
        assert (run_dir / path).is_file(), path
    sub = read_submission(run_dir / "predict" / "submission.csv", test=read_test(data / "test.csv"))
    assert len(sub) == len(pd.read_csv(data / "test.csv"))
    scores = result["scores"]
    assert set(scores) == {"two-stage", "null"} and all(0.0 <= s["score"] <= 1.0 for s in scores.values())
    times = json.loads((run_dir / TIMES_FILE).read_text())
    assert {"data", "detector", "ensemble", "predict"} <= set(times)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())  # what scripts/check_demo.py reads
    assert summary["scores"] == scores and set(summary["stage_cpu_seconds"]) == set(times)
    assert summary["stage_cpu_seconds"]["detector"] > 0
    # a rerun finds every step's file and skips it
    before = (run_dir / "predict" / "submission.csv").stat().st_mtime_ns
    train(cfg, run_dir=run_dir)
    assert (run_dir / "predict" / "submission.csv").stat().st_mtime_ns == before


def test_single_stage_budget_matches_the_two_stage_training_time() -> None:
    from cytologia.pipeline import single_stage_budget

    times = {"data": 5.0, "detector": 120.0, "clean": 1.0, "classifier a": 60.0, "classifier b": 30.0, "predict": 9.0}
    assert single_stage_budget(times, 3.0, match=True) == pytest.approx(3.5)  # (120 + 60 + 30) s, nothing else
    assert single_stage_budget(times, 3.0, match=False) == 3.0
    assert single_stage_budget({"data": 5.0}, 3.0, match=True) == 3.0  # nothing trained recorded: the configured one


def test_single_stage_clock_resolves_to_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cytologia.data.errors import CytologiaInputError
    from cytologia.pipeline import resolve_clock

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_clock("auto") == "cpu" and resolve_clock("wall") == "wall"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_clock("auto") == "wall" and resolve_clock("cpu") == "cpu"
    with pytest.raises(CytologiaInputError, match="clock"):
        resolve_clock("gpu")


def test_cleaning_config_resolves_from_the_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cytologia.data.errors import CytologiaInputError
    from cytologia.pipeline import cleaning_config_path

    monkeypatch.chdir(tmp_path)  # not the project root: the relative name resolves against the project
    assert cleaning_config_path("configs/cleaning/short_cpu.yaml") == CONFIGS / "cleaning" / "short_cpu.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("confirm_score: 0.1\n")
    assert cleaning_config_path("mine.yaml") == Path("mine.yaml")  # a file where you run from wins
    with pytest.raises(CytologiaInputError, match="pipeline.cleaning_config='nope.yaml': no such file"):
        cleaning_config_path("nope.yaml")
