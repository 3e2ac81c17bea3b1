"""The schema of the training configuration: every group of ``configs/`` has a dataclass here.

Hydra composes ``configs/train.yaml`` with the chosen group options and experiment; :func:`check_config` then merges
the result into these dataclasses, so a misspelt or unknown key, or a value of the wrong type, is an error that
names the key -- never silently ignored (nanoGPT's habit). Adding a config option = adding a field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cytologia.data.errors import CytologiaInputError

STAGES: tuple[str, ...] = ("detector", "classifier", "pipeline")
FOLD_MODES: tuple[str, ...] = ("stratified", "group-source")
LOSSES: tuple[str, ...] = ("cross_entropy", "focal", "bce", "focal_multilabel")


@dataclass
class DataConfig:
    root: str = "data/synthetic"
    synthetic: bool = True
    n_images: int = 400  # images to generate when the synthetic set is absent
    synth_seed: int = 0
    lenient: bool = True


@dataclass
class FoldsConfig:
    k: int = 4
    mode: str = "stratified"
    seed: int = 42
    near_threshold: int = 4


@dataclass
class DetectorConfig:
    backend: str = "ultralytics"
    model: str = "yolo11n"
    img_size: int = 512
    weights: str | None = None
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3


@dataclass
class LossConfig:
    name: str = "cross_entropy"
    label_smoothing: float = 0.1
    gamma: float = 2.0


@dataclass
class ClassifierConfig:
    name: str = "resnet18"
    img_size: int = 224
    margin: int = 16
    background: bool = False
    weights: str | None = None
    drop_path: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "auto"
    max_epochs: int = 32
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    num_workers: int = 4
    ema: bool = False
    accumulate_grad_batches: int = 1


@dataclass
class EnsembleConfig:
    method: str = "logit_mean"
    tta_flip: bool = True
    members: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    data_dir: str = "data"
    output_dir: str = "outputs"
    models_dir: str = "models"
    cache_dir: str = "cache"


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    exp_name: str = "default"
    stage: str = "classifier"
    fold: int | None = None
    seed: int = 42


def _choice(value: str, valid: tuple[str, ...], key: str) -> None:
    if value not in valid:
        raise CytologiaInputError(f"config key {key}={value!r} is not one of: {', '.join(valid)}")


def check_config(cfg: DictConfig | dict) -> DictConfig:
    """Validate a composed config against :class:`TrainConfig`; return it typed, resolved and read-only.

    Raises :class:`CytologiaInputError` naming the offending key for unknown keys, wrong types and bad choices.
    """
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]) if "hydra" in raw else raw
    try:
        typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
        OmegaConf.resolve(typed)
    except OmegaConfBaseException as err:
        raise CytologiaInputError(f"invalid config: {err}") from None
    _choice(typed.stage, STAGES, "stage")
    _choice(typed.folds.mode, FOLD_MODES, "folds.mode")
    _choice(typed.classifier.loss.name, LOSSES, "classifier.loss.name")
    if typed.folds.k < 2:
        raise CytologiaInputError(f"config key folds.k={typed.folds.k} must be >= 2")
    if typed.fold is not None and not 0 <= typed.fold < typed.folds.k:
        raise CytologiaInputError(f"config key fold={typed.fold} must be in 0..{typed.folds.k - 1} (or null)")
    OmegaConf.set_readonly(typed, True)
    return typed
