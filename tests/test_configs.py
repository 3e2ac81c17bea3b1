"""Every experiment config composes and validates; unknown keys are errors; a run records config + provenance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cytologia.train
from cytologia.config import STAGES as STAGE_CHOICES
from cytologia.config import check_config
from cytologia.errors import CytologiaInputError
from cytologia.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "exp").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_there_are_experiments() -> None:
    assert {"vitl224", "det_yolo11s_512", "smoke"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_and_validates(exp: str) -> None:
    cfg = check_config(_compose(f"+exp={exp}"))
    assert cfg.exp_name == exp, "an experiment must set exp_name to its file name (run folders are named by it)"
    text = (CONFIGS / "exp" / f"{exp}.yaml").read_text()
    assert text.startswith("# @package _global_"), f"{exp}.yaml must be a # @package _global_ delta"
    assert len([ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]) <= 15


def test_every_group_option_validates() -> None:
    for group in ("data", "folds", "detector", "classifier", "trainer", "ensemble", "paths"):
        for option in sorted((CONFIGS / group).glob("*.yaml")):
            check_config(_compose(f"{group}={option.stem}"))


def test_unknown_key_is_an_error_naming_it() -> None:
    cfg = _compose("+classifier.lr_typo=1")
    with pytest.raises(CytologiaInputError, match="lr_typo"):
        check_config(cfg)


def test_wrong_type_and_bad_choice_are_errors() -> None:
    with pytest.raises(CytologiaInputError, match="img_size"):
        check_config(_compose("classifier.img_size=big"))
    with pytest.raises(CytologiaInputError, match="stage"):
        check_config(_compose("stage=everything"))
    with pytest.raises(CytologiaInputError, match="fold"):
        check_config(_compose("fold=7"))


def test_train_writes_resolved_config_and_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # train() validates and records the config before the stage runs (a stand-in stage here: nothing is trained).
    seen: list[tuple[str, bool]] = []

    def stage(cfg, run_dir: Path) -> dict[str, object]:
        seen.append((cfg.stage, (run_dir / "config.yaml").is_file() and (run_dir / "provenance.json").is_file()))
        return {"stand_in": True}

    monkeypatch.setattr(cytologia.train, "stage_function", lambda name: stage)
    result = train(_compose("+exp=smoke"), run_dir=tmp_path / "run")
    assert result["trained"] is True and result["stand_in"] is True and seen == [("classifier", True)]
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.exp_name == "smoke" and saved.classifier.img_size == 64
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["stage"] == "classifier"
    assert "torch" in prov["environment"]["packages"]
    assert len(prov["git"]["sha"] or "x" * 40) == 40


def test_every_valid_stage_has_a_function() -> None:
    # The config's stage choices are train's stages, and each one's function imports: a stage that validates runs.
    assert STAGE_CHOICES == tuple(cytologia.train.STAGES)
    for name in STAGE_CHOICES:
        assert callable(cytologia.train.stage_function(name)), name
    with pytest.raises(CytologiaInputError, match="unknown stage 'everything'; stages: detector, classifier, pipeline"):
        cytologia.train.stage_function("everything")


def test_train_py_entry_point(tmp_path: Path) -> None:
    # vitl224 starts from pretrained weights, absent from this run's models folder: the run records its config, then
    # stops with the command that gets them -- no traceback, non-zero exit, before any data work.
    models = f"paths.models_dir={tmp_path / 'models'}"
    base = [sys.executable, str(ROOT / "train.py"), "+exp=vitl224", models, "fold=0"]
    out = subprocess.run(
        [*base, f"paths.output_dir={tmp_path / 'no_weights'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr
    assert "cytologia weights pull vit_large_patch16_224.augreg_in21k_ft_in1k" in out.stderr, out.stderr
    assert "classifier.weights=random" in out.stderr, out.stderr  # the override that trains from random weights
    assert "Traceback" not in out.stderr
    # random weights asked for explicitly: it goes on to the real data folder (data/cytologia), absent here, and
    # stops with a clear error naming the missing file.
    out = subprocess.run(
        [*base, "classifier.weights=random", f"paths.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr
    assert "train.csv: no such file" in out.stderr and "Traceback" not in out.stderr
    (run,) = list((tmp_path / "vitl224").iterdir())
    assert (run / "config.yaml").is_file() and (run / "provenance.json").is_file()
    assert "vit_large_patch16_224" in (run / "config.yaml").read_text()
    assert f"resolved config in {run / 'config.yaml'}" in out.stdout  # one line names it; the config is not printed
    assert "vit_large_patch16_224" not in out.stdout
    bad = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "+exp=vitl224", "+trainer.epochz=3", f"paths.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert bad.returncode != 0 and "epochz" in bad.stderr
