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
# "auto": bf16 autocast where the GPU supports it, fp16 with loss scaling on other GPUs, fp32 on CPU.
PRECISIONS: tuple[str, ...] = ("auto", "32", "32-true", "bf16-mixed", "16-mixed")
# Which weights write the out-of-fold logits (and go into the ensemble): "last" = the last epoch's (EMA ones with
# trainer.ema), never looking at the held-out fold; "best_val" = the epoch of best macro-F1 on the held-out fold
# itself, which makes OOF scores and ensembles tuned on them optimistic (scripts/oof_optimism.py measures it).
SELECT_MODES: tuple[str, ...] = ("last", "best_val")


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
    """Single-class detector (see cytologia.detection). Ranges and names are checked by the detector stage."""

    backend: str = "ultralytics"
    model: str = "yolo11n"
    img_size: int = 512
    weights: str | None = None  # init weights in models/ (checked against the manifest); None = random init
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "AdamW"  # ultralytics names (SGD, AdamW, ...); its "auto" picks its own lr and ignores lr
    patience: int = 0  # stop after this many epochs without a better box score; 0 = never stop early
    device: str = "auto"  # "auto": first CUDA device, else cpu; or "cpu", "0", "0,1"
    workers: int = 4  # data-loading processes
    amp: bool = True  # mixed precision on CUDA (its check runs offline, see ultralytics_backend)
    conf: float = 0.001  # score floor of predicted boxes: low, known-count keeps the top-N whatever their score
    nms_iou: float = 0.6  # class-agnostic NMS IoU, in validation and prediction
    max_det: int = 50  # boxes kept per image after NMS (real images hold at most 11 cells)
    tta_flip: bool = True  # out-of-fold boxes also from the mirrored image (model name suffixed "+hflip")
    predict_batch: int = 16
    train_args: dict = field(default_factory=dict)  # extra ultralytics train arguments (augmentation, cache, ...)


@dataclass
class LossConfig:
    name: str = "cross_entropy"
    label_smoothing: float = 0.1
    gamma: float = 2.0  # focal losses only
    alpha: list[float] | None = None  # focal losses: one weight per label (23, or 24 with background); None = 1


@dataclass
class AugmentConfig:
    hue_saturation: bool = False  # off by default: stain colour carries class information
    bbox_aware_p: float = 0.5  # probability of the bbox-aware transform (cell cropped, rotated, pasted back)
    strength: str = "default"  # light | default | strong: photometric and affine magnitudes
    mix_prob: float = 0.5  # probability that a training batch is mixed (MixUp or CutMix); 0 disables both
    mixup_alpha: float = 0.2  # Beta(alpha, alpha) of MixUp; 0 disables MixUp
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) of CutMix; 0 disables CutMix


@dataclass
class ClassifierConfig:
    name: str = "resnet18"
    img_size: int = 224
    margin: int = 16
    background: bool = False
    weights: str | None = None
    drop_path: float = 0.0
    train_last_k: int | None = None  # train only the last k blocks (+ final norm and head; 0: those only); None: all
    multilabel: bool = False  # full-image multi-label model (ml_* experiments)
    boxes: str | None = None  # boxes table of detected out-of-fold boxes to crop; None = ground-truth boxes
    # With background: a CSV NAME,x1,y1,x2,y2,fold of cell-free crops (images in its folder's images/), trained as
    # the 24th label on the folds they are not held out in.
    background_table: str | None = None
    cache: str = "none"  # crop cache of the dataset (see cytologia.classification.crops)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: int = 1  # -1: every visible device
    strategy: str = "auto"  # "ddp" for multi-GPU (one process per device)
    ddp_backend: str | None = None  # process group backend for ddp: None = the engine's choice (nccl on CUDA), "gloo"
    precision: str = "auto"
    max_epochs: int = 32
    batch_size: int = 32  # per device
    lr: float = 3e-4
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # linear warm-up over this many epochs (applied per optimizer step)
    num_workers: int = 4
    ema: bool = False
    ema_decay: float = 0.999
    accumulate_grad_batches: int = 1
    grad_clip: float | None = None  # clip the gradient norm to this value
    resume: bool = False  # continue each fold from fold_<k>/checkpoints/last.ckpt of the run folder when present
    select: str = "last"  # checkpoint whose weights write the OOF logits: last | best_val (see SELECT_MODES)
    progress_bar: bool = True
    log_every_n_steps: int = 50


@dataclass
class EnsembleConfig:
    method: str = "logit_mean"
    tta_flip: bool = True
    members: list[str] = field(default_factory=list)


@dataclass
class SingleStageConfig:
    enabled: bool = True
    model: str = "yolo11n"
    img_size: int = 256
    epochs: int = 30
    time_min: float = 3.0  # budget of its training (ultralytics' `time`), minutes of `clock`
    # what time_min counts: wall, cpu (process CPU seconds: a busy machine does not change them), or auto (cpu without
    # a CUDA device, wall with one -- GPU work is not CPU time)
    clock: str = "auto"
    # true: time_min is replaced by the time the two-stage pipeline spent training in this run (detector +
    # classifiers, stage_cpu_seconds.json or stage_times.json by clock): both approaches get the same budget
    match_budget: bool = False
    batch_size: int = 16
    train_args: dict = field(default_factory=dict)  # extra ultralytics train arguments (nbs, warmup_epochs, ...)


@dataclass
class PipelineConfig:
    """The whole-pipeline run (stage: pipeline, see cytologia.pipeline)."""

    # Each entry overrides keys of the `classifier` group for one ensemble member (name and img_size at least).
    classifiers: list[dict] = field(default_factory=list)
    clean: bool = True  # clean the training boxes with the detector's OOF boxes before training classifiers
    cleaning_config: str | None = None  # settings YAML for `cytologia clean` (None: its built-in defaults)
    clean_min_kept: float = 0.8  # below this share of boxes kept, cleaning is not applied (the detector is too weak)
    n_background: int = 0  # cell-free images painted for classifiers with `background: true`
    runtime: str = "onnx"  # predict with ONNX Runtime or torch
    single_stage: SingleStageConfig = field(default_factory=SingleStageConfig)


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
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    exp_name: str = "default"
    stage: str = "classifier"
    fold: int | None = None
    seed: int = 42


def _choice(value: str, valid: tuple[str, ...], key: str) -> None:
    if value not in valid:
        raise CytologiaInputError(f"config key {key}={value!r} is not one of: {', '.join(valid)}")


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise CytologiaInputError(f"config key {key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _check_classifier_trainer(typed: DictConfig) -> None:
    """Ranges and choices of the classifier and trainer groups (the stage checks what needs the model registry)."""
    c, t = typed.classifier, typed.trainer
    _choice(t.precision, PRECISIONS, "trainer.precision")
    _choice(t.select, SELECT_MODES, "trainer.select")
    for key in ("img_size", "margin"):
        _positive(c[key], f"classifier.{key}", allow_zero=key == "margin")
    for key in ("max_epochs", "batch_size", "accumulate_grad_batches", "log_every_n_steps", "lr"):
        _positive(t[key], f"trainer.{key}")
    for key in ("num_workers", "warmup_epochs", "weight_decay", "min_lr_ratio"):
        _positive(t[key], f"trainer.{key}", allow_zero=True)
    if t.devices == 0 or t.devices < -1:
        raise CytologiaInputError(f"config key trainer.devices={t.devices} must be >= 1, or -1 for every device")
    if not 0.0 < t.ema_decay < 1.0:
        raise CytologiaInputError(f"config key trainer.ema_decay={t.ema_decay} must be in (0, 1)")
    for key in ("bbox_aware_p", "mix_prob"):
        if not 0.0 <= c.augment[key] <= 1.0:
            raise CytologiaInputError(f"config key classifier.augment.{key}={c.augment[key]} must be in [0, 1]")
    if c.train_last_k is not None:
        _positive(c.train_last_k, "classifier.train_last_k", allow_zero=True)


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
    _check_classifier_trainer(typed)
    if typed.folds.k < 2:
        raise CytologiaInputError(f"config key folds.k={typed.folds.k} must be >= 2")
    if typed.fold is not None and not 0 <= typed.fold < typed.folds.k:
        raise CytologiaInputError(f"config key fold={typed.fold} must be in 0..{typed.folds.k - 1} (or null)")
    OmegaConf.set_readonly(typed, True)
    return typed
