"""Experiments as recipes: compose ``configs/exp/*.yaml`` without running them, and list the weights they start from.

Used by ``train`` (a run whose named weights are absent stops before any data work, naming ``cytologia weights pull``),
``cytologia weights list`` (per recipe: present / missing) and ``cytologia plan``. The weights a config names:

- stage ``classifier``: ``classifier.weights``;
- stage ``detector``: ``detector.weights``;
- stage ``pipeline``: ``detector.weights`` (with ``pipeline.two_stage``), ``pipeline.crop_detector.weights`` when a
  crop detector is configured, every ``pipeline.classifiers`` member's ``weights`` (a member that does not set it
  takes ``classifier.weights``), and ``pipeline.single_stage.weights`` when the single-stage model is enabled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from cytologia.errors import CytologiaInputError
from cytologia.paths import project_root
from cytologia.weights_catalog import CATALOG, RANDOM, pull_command, resolve_weights

WHOLE_PIPELINE_RECIPES: tuple[str, ...] = ("first_place", "second_place", "third_place")


def configs_dir() -> Path:
    """The checkout's ``configs/`` folder (an installed package has none: the error says so)."""
    root = project_root()
    if root is None or not (root / "configs").is_dir():
        raise CytologiaInputError("cytologia is installed, not run from a checkout: there is no configs/ folder")
    return root / "configs"


def experiments() -> list[str]:
    """The experiment names of ``configs/exp/``."""
    return sorted(p.stem for p in (configs_dir() / "exp").glob("*.yaml"))


def compose_experiment(exp: str | None, overrides: Sequence[str] = ()) -> DictConfig:
    """The composed, validated config of ``+exp=<exp>`` plus ``overrides`` (as ``train.py`` would run it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cytologia.config import check_config

    if exp is not None and exp not in experiments():
        raise CytologiaInputError(f"unknown experiment {exp!r}; configs/exp has: {', '.join(experiments())}")
    args = ([f"+exp={exp}"] if exp else []) + list(overrides)
    if GlobalHydra.instance().is_initialized():  # e.g. called from inside a Hydra app
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        return check_config(compose(config_name="train", overrides=args))


@dataclass(frozen=True)
class NamedWeights:
    """One config key that names initial weights, and its value."""

    key: str  # e.g. pipeline.classifiers[2].weights
    value: str | None  # "random", a catalog name, a file; None = not set (an error at run time)
    model: str  # what it initialises (architecture)

    @property
    def catalog(self) -> bool:
        return self.value in CATALOG


def named_weights(cfg: DictConfig) -> list[NamedWeights]:
    """Every config key of ``cfg`` that names initial weights for what its stage trains (see the module docstring)."""
    out: list[NamedWeights] = []
    stage = str(cfg.stage)
    if stage == "classifier":
        out.append(NamedWeights("classifier.weights", cfg.classifier.weights, str(cfg.classifier.name)))
    elif stage == "detector":
        out.append(NamedWeights("detector.weights", cfg.detector.weights, str(cfg.detector.model)))
    elif stage == "pipeline":
        p = cfg.pipeline
        if p.two_stage:
            out.append(NamedWeights("detector.weights", cfg.detector.weights, str(cfg.detector.model)))
            if p.crop_detector is not None:
                crop = p.crop_detector
                model = str(crop.get("model", cfg.detector.model))
                out.append(
                    NamedWeights("pipeline.crop_detector.weights", crop.get("weights", cfg.detector.weights), model)
                )
            for i, member in enumerate(p.classifiers):
                value = member.get("weights", cfg.classifier.weights)
                out.append(NamedWeights(f"pipeline.classifiers[{i}].weights", value, str(member.get("name"))))
        if p.single_stage.enabled:
            ss = p.single_stage
            out.append(NamedWeights("pipeline.single_stage.weights", ss.weights, str(ss.model)))
    return out


def missing_weights(cfg: DictConfig) -> list[NamedWeights]:
    """The catalog weights ``cfg`` names whose file is not in ``paths.models_dir``."""
    folder = Path(cfg.paths.models_dir)
    return [w for w in named_weights(cfg) if w.catalog and not (folder / CATALOG[str(w.value)].file).is_file()]


def check_weights(cfg: DictConfig) -> None:
    """Before any work: every weight ``cfg`` names is ``random`` or a present, manifest-verified file. Absent catalog
    weights are one error naming the pull command for all of them; a key left null is an error asking for a name or
    ``random``; a listed file with another hash is the manifest's error."""
    absent = missing_weights(cfg)
    if absent:
        keys = ", ".join(f"{w.key}={w.value}" for w in absent)
        raise CytologiaInputError(
            f"{cfg.exp_name}: pretrained weights absent from {cfg.paths.models_dir}/ ({keys}). Get them where there "
            f"is network with `{pull_command(str(w.value) for w in absent)}` (see docs/weights_and_recipes.md for "
            f"placing files by hand), or train from random weights on purpose with "
            + " ".join(f"{w.key}={RANDOM}" for w in absent)
        )
    for w in named_weights(cfg):
        resolve_weights(w.value, cfg.paths.models_dir, key=w.key)
