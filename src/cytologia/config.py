"""The schema of the training configuration: every group of ``configs/`` has a dataclass here -- types only.

Hydra composes ``configs/train.yaml`` with the chosen group options and experiment; :func:`check_config` then merges
the result into these dataclasses, so a misspelt or unknown key, a value of the wrong type, or a key that has no
value is an error that names the key -- never silently ignored (nanoGPT's habit).

One source of values: the YAML files. A field here carries a type and a comment, never a default value
(``tests/test_config_schema.py`` fails on one). Why the YAML and not the dataclasses (Hydra's ConfigStore): the
group files stay the documented list of every key a user can override on the command line (``detector.lr=...``
needs the key in the composed config), an experiment stays a short ``# @package _global_`` delta, and the composed
config written into each run folder is exactly what the files say -- with values in two places they had drifted
(``pipeline.single_stage`` was yolo11s/384 px/100 epochs/60 min in the YAML, yolo11n/256/30/3 here). Adding a config
option = a typed field here + its value (and comment) in the group's YAML file.

Code that turns a config group into the settings of a library function does it with :func:`settings_from`, by field
name, so a key added to a group reaches the settings (or is declared as not one of them) instead of being dropped by a
hand-written copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cytologia.errors import CytologiaInputError

STAGES: tuple[str, ...] = ("detector", "classifier", "pipeline")
FOLD_MODES: tuple[str, ...] = ("stratified", "group-source", "group-dataset")  # cytologia.data.folds.MODES
LOSSES: tuple[str, ...] = ("cross_entropy", "focal", "bce", "focal_multilabel")
# "auto": bf16 autocast where the GPU supports it, fp16 with loss scaling on other GPUs, fp32 on CPU.
PRECISIONS: tuple[str, ...] = ("auto", "32", "32-true", "bf16-mixed", "16-mixed")
# Which weights write the out-of-fold logits (and go into the ensemble): "last" = the last epoch's (EMA ones with
# trainer.ema), never looking at the held-out fold; "best_val" = the epoch of best macro-F1 on the held-out fold
# itself, which makes OOF scores and ensembles tuned on them optimistic (scripts/oof_optimism.py measures it).
SELECT_MODES: tuple[str, ...] = ("last", "best_val")


@dataclass
class DataConfig:
    root: str
    synthetic: bool
    n_images: int  # images to generate when the synthetic set is absent
    synth_seed: int
    lenient: bool
    # Crop classifiers on a combined folder (cytologia combine): data set -> weight of its share of the training
    # draws (classification.datamodule.sampling_weights; data sets not named keep their natural share). None: shuffle.
    sampling_weights: dict[str, float] | None


@dataclass
class FoldsConfig:
    k: int
    mode: str
    seed: int
    near_threshold: int


@dataclass
class DetectorConfig:
    """Single-class detector (see cytologia.detection). Ranges and names are checked by the detector stage."""

    backend: str
    model: str
    img_size: int
    weights: str | None  # init weights in models/ (checked against the manifest); None = random init
    epochs: int
    batch_size: int
    lr: float
    optimizer: str  # ultralytics names (SGD, AdamW, ...); its "auto" picks its own lr and ignores lr
    patience: int  # stop after this many epochs without a better box score; 0 = never stop early
    device: str  # "auto": first CUDA device, else cpu; or "cpu", "0", "0,1"
    workers: int  # data-loading processes
    amp: bool  # mixed precision on CUDA (its check runs offline, see ultralytics_backend)
    conf: float  # score floor of predicted boxes: low, known-count keeps the top-N whatever their score
    nms_iou: float  # class-agnostic NMS IoU, in validation and prediction
    max_det: int  # boxes kept per image after NMS (real images hold at most 11 cells)
    tta_flip: bool  # out-of-fold boxes also from the mirrored image (model name suffixed "+hflip")
    predict_batch: int
    train_args: dict  # extra ultralytics train arguments (augmentation, cache, ...)


@dataclass
class LossConfig:
    name: str
    label_smoothing: float
    gamma: float  # focal losses only
    alpha: list[float] | None  # focal losses: one weight per label (23, or 24 with background); None = 1


@dataclass
class AugmentConfig:
    hue_saturation: bool  # hue/saturation jitter (stain colour carries class information)
    bbox_aware_p: float  # probability of the bbox-aware transform (cell cropped, rotated, pasted back)
    strength: str  # light | default | strong: photometric and affine magnitudes
    mix_prob: float  # probability that a training batch is mixed (MixUp or CutMix); 0 disables both
    mixup_alpha: float  # Beta(alpha, alpha) of MixUp; 0 disables MixUp
    cutmix_alpha: float  # Beta(alpha, alpha) of CutMix; 0 disables CutMix


@dataclass
class ClassifierConfig:
    name: str
    img_size: int
    margin: int
    background: bool
    weights: str | None
    drop_path: float
    train_last_k: int | None  # train only the last k blocks (+ final norm and head; 0: those only); None: all
    multilabel: bool  # full-image multi-label model (ml_* experiments)
    boxes: str | None  # boxes table of detected out-of-fold boxes to crop; None = ground-truth boxes
    # With background: a CSV NAME,x1,y1,x2,y2,fold of cell-free crops (images in its folder's images/), trained as
    # the 24th label on the folds they are not held out in.
    background_table: str | None
    cache: str  # crop cache of the dataset (see cytologia.classification.crops)
    loss: LossConfig
    augment: AugmentConfig


@dataclass
class TrainerConfig:
    accelerator: str
    devices: int  # -1: every visible device
    strategy: str  # "ddp" for multi-GPU (one process per device)
    ddp_backend: str | None  # process group backend for ddp: None = the engine's choice (nccl on CUDA), "gloo"
    precision: str
    max_epochs: int
    batch_size: int  # per device
    lr: float
    min_lr_ratio: float  # the cosine ends at lr * min_lr_ratio
    weight_decay: float
    warmup_epochs: float  # linear warm-up over this many epochs (applied per optimizer step)
    num_workers: int
    ema: bool
    ema_decay: float
    accumulate_grad_batches: int
    grad_clip: float | None  # clip the gradient norm to this value
    resume: bool  # continue each fold from fold_<k>/checkpoints/last.ckpt of the run folder when present
    select: str  # checkpoint whose weights write the OOF logits: last | best_val (see SELECT_MODES)
    progress_bar: bool
    log_every_n_steps: int


@dataclass
class EnsembleConfig:
    method: str
    tta_flip: bool
    members: list[str]


@dataclass
class SingleStageConfig:
    enabled: bool
    model: str
    img_size: int
    epochs: int
    time_min: float  # budget of its training (ultralytics' `time`), minutes of `clock`
    # what time_min counts: wall, cpu (process CPU seconds: a busy machine does not change them), or auto (cpu without
    # a CUDA device, wall with one -- GPU work is not CPU time)
    clock: str
    # true: time_min is replaced by the time the two-stage pipeline spent training in this run (detector +
    # classifiers, stage_cpu_seconds.json or stage_times.json by clock): both approaches get the same budget
    match_budget: bool
    batch_size: int
    train_args: dict  # extra ultralytics train arguments (nbs, warmup_epochs, ...)
    weights: str | None  # initial weights: random | a catalog name (yolo11m) | a file in models/ (None: an error)


@dataclass
class PipelineConfig:
    """The whole-pipeline run (stage: pipeline, see cytologia.pipeline)."""

    # Each entry overrides keys of the `classifier` group for one ensemble member (name and img_size at least), plus
    # optional `exp` (the member's name: run folder cls_<exp>, OOF model; default its `name`), `trainer` (a dict
    # overriding keys of the `trainer` group for this member: lr, batch_size, max_epochs, ...) and `tta_flip`
    # (ensemble.tta_flip for this member: whether it writes flip-TTA logits).
    classifiers: list[dict]
    two_stage: bool  # false: no detector/classifiers -- the single-stage model is the run's submission (3rd place)
    # Overrides of the `detector` group for a second detector trained on the cleaned boxes; its out-of-fold boxes
    # (top-N per image, N = the image's box count) are what the crop classifiers train on (1st place's 640 px
    # detector). None: the classifiers crop the (cleaned) ground-truth boxes.
    crop_detector: dict | None
    # Member name (exp) -> relative blend weight, kept as given (normalised; the 1st place's fixed groups): only the
    # multi-label weight is tuned. None: every weight tuned on the OOF logits.
    member_weights: dict | None
    clean: bool  # clean the training boxes with the detector's OOF boxes before training classifiers
    cleaning_config: str | None  # settings YAML for `cytologia clean` (None: its built-in defaults)
    clean_min_kept: float  # below this share of boxes kept, cleaning is not applied (the detector is too weak)
    n_background: int  # cell-free images painted for classifiers with `background: true`
    runtime: str  # predict with ONNX Runtime or torch
    distill: bool  # distil the tuned ensemble into one student (the `distill` group) after the ensemble step
    pseudo_label: bool  # leak-aware pseudo-labelling rounds (the `pseudo_label` group) after the ensemble step
    single_stage: SingleStageConfig


@dataclass
class DistillConfig:
    """Distillation of the tuned ensemble into one student (cytologia.classification.distill)."""

    student: dict  # overrides of the `classifier` group for the student (name, img_size at least)
    trainer: dict  # overrides of the `trainer` group for the student ({}: the run's)
    temperature: float  # softening of teacher and student in the KL term
    kd_weight: float  # share of the KL term; 1 - kd_weight goes to the hard-label loss
    weights: str  # teacher blend weights per fold: heldout | tuned
    cv: bool  # also one student per fold (OOF logits, CV)
    final: bool  # one student on every training box (the deployable one, student.json)
    unlabelled: bool  # also learn from the test crops' per-fold teacher predictions
    detector_folds: int | None  # student.json's detector: the teacher's first N fold models (None: all)


@dataclass
class PseudoLabelConfig:
    """Leak-aware pseudo-labelling (cytologia.classification.pseudo)."""

    rounds: int
    precision: float  # OOF precision the confidence threshold must reach
    min_count: int  # OOF predictions that precision is measured over, at least
    allow_leak: bool  # full-ensemble labels for every fold (the leak, to measure it)
    stage2: bool  # each fold starts from the previous round's checkpoint of the same fold


@dataclass
class PathsConfig:
    data_dir: str
    output_dir: str
    models_dir: str
    cache_dir: str


@dataclass
class TrainConfig:
    data: DataConfig
    folds: FoldsConfig
    detector: DetectorConfig
    classifier: ClassifierConfig
    trainer: TrainerConfig
    ensemble: EnsembleConfig
    paths: PathsConfig
    pipeline: PipelineConfig
    distill: DistillConfig
    pseudo_label: PseudoLabelConfig
    exp_name: str  # names the run folder and the member's OOF logits
    stage: str  # what the run trains: one of STAGES
    fold: int | None  # train this fold only; None: every fold
    seed: int


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

    Raises :class:`CytologiaInputError` naming the offending key for unknown keys, missing keys, wrong types and bad
    choices.
    """
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]) if "hydra" in raw else raw
    try:
        typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
        OmegaConf.resolve(typed)
    except OmegaConfBaseException as err:
        raise CytologiaInputError(f"invalid config: {err}") from None
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:  # the schema has no defaults: every key takes its value from configs/ (or an override)
        raise CytologiaInputError(
            f"config key(s) without a value (add them to their configs/ group file): {', '.join(missing)}"
        )
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


S = TypeVar("S")


def settings_from(
    settings: type[S],
    record: Mapping[str, Any],
    *,
    rename: Mapping[str, str] | None = None,
    skip: tuple[str, ...] = (),
    source: str = "config",
    **given: Any,
) -> S:
    """Build the dataclass ``settings`` from a config group ``record`` (e.g. ``cfg.detector``), field by name.

    Each key of ``record`` becomes the field of the same name (or ``rename[key]``); ``skip`` lists the keys that are
    deliberately not settings (used elsewhere). ``given`` sets fields from outside the record and wins over it (e.g.
    ``seed=cfg.seed``, or a budget computed at run time). A record key that is neither a field nor skipped, or a
    ``rename``/``given`` name that is no field, or a ``skip``/``rename`` key the record lacks, is an error naming it:
    a key added to a group is never dropped silently. Fields that neither sets keep the settings' own defaults.
    Containers arrive as plain ``dict``/``list``.
    """
    if not is_dataclass(settings):
        raise TypeError(f"{settings!r} is not a dataclass")
    rename = dict(rename or {})
    known = {f.name for f in fields(settings)}
    wrong = sorted({*rename.values(), *given} - known)
    if wrong:
        raise CytologiaInputError(f"{settings.__name__} has no field(s) {', '.join(wrong)}")
    stale = sorted({*skip, *rename} - set(record))
    if stale:
        raise CytologiaInputError(f"{source} has no key(s) {', '.join(stale)} (named as skipped or renamed)")
    values: dict[str, Any] = {}
    for key in record:
        if key in skip:
            continue
        name = rename.get(key, key)
        if name not in known:
            raise CytologiaInputError(
                f"{source} key {key!r} is not a field of {settings.__name__} ({', '.join(sorted(known))}) nor "
                f"declared as skipped ({', '.join(skip) or 'none'})"
            )
        value = record[key]
        values[name] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return settings(**{**values, **given})
