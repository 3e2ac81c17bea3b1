"""The whole pipeline (`+exp=demo` at toy sizes): every step runs, writes its file, and a rerun resumes; its steps
call the library functions behind the commands, with the settings the commands built."""

from __future__ import annotations

import argparse
import ast
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cytologia.data.io import read_submission, read_test
from cytologia.pipeline import CPU_TIMES_FILE, SUMMARY_FILE, TIMES_FILE
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


def _stub_single_stage(
    monkeypatch: pytest.MonkeyPatch, seen: list[tuple[Any, dict[str, Any]]], submission: Path | None
) -> None:
    """Replace :func:`cytologia.single_stage.run_single_stage` (a YOLO training) by a stub that records its settings
    and keyword arguments and returns what its printed summary needs; with ``submission``, that file becomes the
    run's submission.csv."""
    from cytologia import single_stage

    def fake(data_dir: Path, out_dir: Path, settings: Any, **kwargs: Any) -> dict[str, Any]:
        seen.append((settings, kwargs))
        if submission is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(submission, Path(out_dir) / "submission.csv")
        return {
            "settings": asdict(settings),
            "times_s": {"train": 0.0},
            "epochs_run": 1,
            "best_epoch": 1,
            "predict_ms_per_image": 0.0,
        }

    monkeypatch.setattr(single_stage, "run_single_stage", fake)


@pytest.mark.ultralytics
def test_toy_pipeline_end_to_end_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TOY, f"paths.data_dir={tmp_path / 'data'}"])
    run_dir = tmp_path / "run"
    result = train(cfg, run_dir=run_dir)
    assert result["trained"] is True
    data = tmp_path / "data" / "demo"
    for path in (
        "detector/oof_boxes.csv",
        "clean/cleaning_report.csv",
        "ensemble/ensemble.json",
        "predict/submission.csv",
        "predict/submission_calibrated.csv",  # calibrated probabilities, refer flags (issue 17)
        "counts/counts.json",  # differential counts per smear of the generated test set
        "report/reliability.png",
        "report/risk_coverage.png",
        "report/counts/index.html",
        "baselines/null_submission.csv",
        "report/index.html",
    ):
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

    # The single-stage baseline joins the same run (every other step resumes; its YOLO training is stubbed, see
    # tests/test_single_stage.py): its settings come from pipeline.single_stage with this run's budget -- the
    # two-stage training time (match_budget in +exp=demo) on the resolved clock -- and workers 0.
    from cytologia.pipeline import resolve_clock

    seen: list[tuple[Any, dict[str, Any]]] = []
    _stub_single_stage(monkeypatch, seen, run_dir / "baselines" / "null_submission.csv")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        with_ss = [o for o in TOY if not o.startswith("pipeline.single_stage.enabled")]
        cfg_ss = compose(config_name="train", overrides=[*with_ss, f"paths.data_dir={tmp_path / 'data'}"])
    result = train(cfg_ss, run_dir=run_dir)
    ((settings, kwargs),) = seen
    clock = resolve_clock("auto", str(cfg_ss.detector.device))
    spent = json.loads((run_dir / (CPU_TIMES_FILE if clock == "cpu" else TIMES_FILE)).read_text())
    trained = sum(v for k, v in spent.items() if k == "detector" or k.startswith("classifier "))
    assert trained > 0 and settings.clock == clock and settings.time_min == pytest.approx(round(trained / 60, 3))
    ss = cfg_ss.pipeline.single_stage
    assert (settings.model, settings.img_size, settings.epochs, settings.batch_size, settings.workers) == (
        ss.model,
        ss.img_size,
        ss.epochs,
        ss.batch_size,
        0,
    )
    assert settings.extra == {"flipud": 0.5, **ss.train_args} and kwargs["folds_k"] == cfg_ss.folds.k
    assert set(result["scores"]) == {"two-stage", "null", "single-stage"}


def test_single_stage_budget_matches_the_two_stage_training_time() -> None:
    from cytologia.pipeline import single_stage_budget

    times = {"data": 5.0, "detector": 120.0, "clean": 1.0, "classifier a": 60.0, "classifier b": 30.0, "predict": 9.0}
    assert single_stage_budget(times, 3.0, match=True) == pytest.approx(3.5)  # (120 + 60 + 30) s, nothing else
    assert single_stage_budget(times, 3.0, match=False) == 3.0
    assert single_stage_budget({"data": 5.0}, 3.0, match=True) == 3.0  # nothing trained recorded: the configured one


def test_single_stage_clock_resolves_to_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cytologia.errors import CytologiaInputError
    from cytologia.pipeline import resolve_clock

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_clock("auto") == "cpu" and resolve_clock("wall") == "wall"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_clock("auto") == "wall" and resolve_clock("cpu") == "cpu"
    assert resolve_clock("auto", "cpu") == "cpu"  # a CPU run on a GPU machine (the demo: detector.device=cpu)
    with pytest.raises(CytologiaInputError, match="clock"):
        resolve_clock("gpu")


def test_cleaning_config_resolves_from_the_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cytologia.errors import CytologiaInputError
    from cytologia.pipeline import cleaning_config_path

    monkeypatch.chdir(tmp_path)  # not the project root: the relative name resolves against the project
    assert cleaning_config_path("configs/cleaning/short_cpu.yaml") == CONFIGS / "cleaning" / "short_cpu.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("confirm_score: 0.1\n")
    assert cleaning_config_path("mine.yaml") == Path("mine.yaml")  # a file where you run from wins
    with pytest.raises(CytologiaInputError, match="pipeline.cleaning_config='nope.yaml': no such file"):
        cleaning_config_path("nope.yaml")


@pytest.mark.parametrize("exp", [[], ["+exp=demo"]], ids=["default", "demo"])
def test_single_stage_settings_are_the_ones_the_command_built(exp: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """pipeline.single_stage becomes the settings directly (no argv): the same settings `cytologia single-stage`
    builds from the argv the pipeline passed it before (model, epochs, budget, clock, input size, batch, workers 0,
    train_args over the default extra arguments)."""
    from cytologia.commands import single_stage as command
    from cytologia.pipeline import single_stage_settings

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=exp)
    ss = cfg.pipeline.single_stage
    budget, clock = 3.25, "cpu"
    train_args = [a for k, v in ss.train_args.items() for a in ("--train-arg", f"{k}={v}")]
    argv = [
        "--data",
        "data",
        "--out",
        "out",
        "--model",
        ss.model,
        "--epochs",
        ss.epochs,
        "--time-min",
        budget,
        "--clock",
        clock,
        "--img-size",
        ss.img_size,
        "--batch-size",
        ss.batch_size,
        "--workers",
        0,
        "--folds-k",
        cfg.folds.k,
        *train_args,
    ]
    seen: list[tuple[Any, dict[str, Any]]] = []
    _stub_single_stage(monkeypatch, seen, None)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args([str(a) for a in argv])) == 0
    ((built, _),) = seen
    assert single_stage_settings(OmegaConf.to_container(ss, resolve=True), budget, clock) == built
    assert (built.time_min, built.clock, built.workers) == (budget, clock, 0)


def test_pipeline_calls_library_functions_not_the_command_line() -> None:
    """No argv strings: the pipeline imports neither cytologia.cli nor a command module."""
    import cytologia.pipeline as pipeline

    tree = ast.parse(Path(pipeline.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {"cytologia.detection.cleaning", "cytologia.ensemble.runs", "cytologia.predict"} <= imported
    assert not {m for m in imported if m == "cytologia.cli" or m.startswith("cytologia.commands")}
