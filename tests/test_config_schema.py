"""One source of config values: the YAML files of configs/; the schema (cytologia.config) carries types only. Config
groups become library settings by field name (cytologia.config.settings_from), not by hand-written copies."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import get_type_hints

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from cytologia.config import TrainConfig, check_config, settings_from
from cytologia.detection.registry import TrainSettings
from cytologia.detection.stage import NOT_TRAIN_SETTINGS, train_settings
from cytologia.errors import CytologiaInputError
from cytologia.single_stage import NOT_SETTINGS, SingleStageSettings, settings_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _plain(cfg: DictConfig) -> DictConfig:
    """A writable, untyped copy (what the pipeline hands its stages)."""
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def _schema_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_fields(hints[f.name], f"{prefix}{f.name}.")


# ------------------------------------------------------------------------------------- one source of values
def test_schema_fields_carry_no_default_value() -> None:
    # A default here would be a second copy of a value the YAML files hold (they had drifted: see config.py).
    fields = dict(_schema_fields(TrainConfig))
    assert len(fields) > 90  # the walk reaches the nested groups (pipeline.single_stage.train_args, ...)
    written_twice = [
        key
        for key, f in fields.items()
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert not written_twice, f"config values belong in configs/*.yaml, not in config.py defaults: {written_twice}"


def test_a_key_without_a_value_is_an_error_naming_it() -> None:
    raw = _compose("+exp=demo")
    with open_dict(raw):
        del raw.pipeline.single_stage["clock"]
        del raw.trainer["select"]
    with pytest.raises(CytologiaInputError, match=r"without a value .*pipeline\.single_stage\.clock, trainer\.select"):
        check_config(raw)


# ------------------------------------------------------------------------------ settings from a config group
def test_detector_training_settings_are_the_detector_group_by_name() -> None:
    cfg = check_config(_compose("+exp=det_yoloxs_512", "seed=7"))
    det = cfg.detector
    settings = train_settings(cfg)
    from_run = {"seed": 7, "extra": OmegaConf.to_container(det.train_args)}
    for f in dataclasses.fields(TrainSettings):  # every field is set from the config, none left at its default
        assert getattr(settings, f.name) == from_run.get(f.name, det.get(f.name)), f.name
    assert isinstance(settings.extra["mosaic_scale"], list)  # plain containers, not OmegaConf nodes
    # every detector key is a training setting or declared as none (the partition is exact: no stale name either)
    setting_keys = {f.name for f in dataclasses.fields(TrainSettings)} - {"seed", "extra"} | {"train_args"}
    assert set(det) == setting_keys | set(NOT_TRAIN_SETTINGS) and not setting_keys & set(NOT_TRAIN_SETTINGS)


def test_a_detector_key_that_is_no_setting_is_an_error() -> None:
    cfg = _plain(check_config(_compose("+exp=det_smoke")))
    assert train_settings(cfg).epochs == 1 and train_settings(cfg).img_size == 128
    cfg.detector.new_knob = 3
    with pytest.raises(CytologiaInputError, match="detector key 'new_knob' is not a field of TrainSettings"):
        train_settings(cfg)


def test_single_stage_settings_are_the_pipeline_group_by_name() -> None:
    # What `cytologia single-stage` got from the pipeline's argv before: the group's keys, flipud 0.5 under the
    # experiment's train_args, the run's budget and resolved clock, workers 0; the rest its own defaults.
    demo = check_config(_compose("+exp=demo")).pipeline.single_stage
    settings = settings_from_config(demo, time_min=4.5, clock="cpu", workers=0)
    assert settings == SingleStageSettings(
        model="yolo11n",
        img_size=192,
        epochs=100,
        time_min=4.5,
        clock="cpu",
        batch_size=8,
        workers=0,
        extra={"flipud": 0.5, "nbs": 8, "warmup_epochs": 1},
    )
    default = check_config(_compose()).pipeline.single_stage
    settings = settings_from_config(default, time_min=float(default.time_min), clock="wall")
    assert (settings.model, settings.img_size, settings.epochs, settings.time_min) == ("yolo11s", 384, 100, 60.0)
    assert settings.batch_size == 16 and settings.extra == {"flipud": 0.5}
    group = {f.name for f in dataclasses.fields(SingleStageSettings)} & set(default) | {"train_args"}
    assert set(default) == group | set(NOT_SETTINGS)
    plain = _plain(check_config(_compose()))
    plain.pipeline.single_stage.warmup = 2
    with pytest.raises(CytologiaInputError, match="pipeline.single_stage key 'warmup' is not a field"):
        settings_from_config(plain.pipeline.single_stage, time_min=1.0, clock="wall")


def test_settings_from_checks_every_name() -> None:
    @dataclasses.dataclass
    class Settings:
        a: int = 1
        b: str = "x"
        extra: dict = dataclasses.field(default_factory=dict)

    record = OmegaConf.create({"a": 2, "args": {"k": [1, 2]}, "shown": True})
    made = settings_from(Settings, record, rename={"args": "extra"}, skip=("shown",), b="y")
    assert made == Settings(a=2, b="y", extra={"k": [1, 2]}) and type(made.extra["k"]) is list
    assert settings_from(Settings, {"a": 5}, a=6).a == 6  # given wins over the record
    with pytest.raises(CytologiaInputError, match="key 'shown' is not a field of Settings"):
        settings_from(Settings, record, rename={"args": "extra"})
    with pytest.raises(CytologiaInputError, match="Settings has no field"):
        settings_from(Settings, {"a": 1}, c=3)
    with pytest.raises(CytologiaInputError, match="no key.* gone"):
        settings_from(Settings, {"a": 1}, skip=("gone",))
