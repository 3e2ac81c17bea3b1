"""The classifier stage: ``run(cfg, run_dir)`` trains one fold (``fold=K``) or every fold of an experiment.

Steps: make sure the data exists (a synthetic set is generated on first use when ``data.synthetic``), read and
validate ``train.csv`` (lenient per ``data.lenient``), read ``folds.csv`` from the data folder or make it (same
k, seed and mode as the config, checked against ``folds_report.json``), pick the boxes to crop (ground truth, or
the detector's out-of-fold boxes from ``classifier.boxes`` labelled from the truth by best GIoU; with
``classifier.background`` the cell-free crops of ``classifier.background_table`` join training as a 24th label), then
per fold:

    <run_dir>/fold_<k>/checkpoints/best.ckpt   best validation macro-F1 (EMA weights when trainer.ema)
    <run_dir>/fold_<k>/checkpoints/last.ckpt   end of the last finished epoch: what a resume continues from
    <run_dir>/fold_<k>/logs/version_<n>/       the engine's CSV log of each (re)start (tb/: TensorBoard, if installed)
    <run_dir>/fold_<k>/metrics.csv             those logs merged: one table per fold
    <run_dir>/fold_<k>/oof_logits.csv          logits of the held-out boxes from the selected checkpoint (below)
    <run_dir>/fold_<k>/result.json             what the fold did (scores, steps, timing, select, oof_checkpoint)
    <run_dir>/oof_logits.csv, summary.json     every fold trained in this run folder together (summary: select too)

Which weights write the OOF logits -- and so which ones ``cytologia tune`` blends and puts in the ensemble
(``oof_checkpoint`` of ``result.json``) -- is ``trainer.select`` (:func:`select_checkpoint`): ``last`` (the default)
takes the last epoch's (``last.ckpt``; EMA weights when ``trainer.ema``), chosen without looking at the held-out
fold; ``best_val`` takes ``best.ckpt``, the epoch of best macro-F1 on the held-out fold itself -- the fold whose
logits it then writes, so its OOF macro-F1, and the gain of an ensemble tuned on those logits, are optimistic
(``scripts/oof_optimism.py`` measures by how much). Validation on the held-out fold still runs every epoch in both
modes (the metrics and ``best.ckpt``); with ``last`` it only watches.

Resuming after a kill: run the same experiment into the same folder with ``trainer.resume=true``
(``python train.py +exp=NAME hydra.run.dir=outputs/NAME/<timestamp> trainer.resume=true``): finished folds are
kept, a fold with ``last.ckpt`` continues from it (optimizer, schedule, EMA and step counter included), the rest
start. Without ``trainer.resume`` a fold folder that already holds checkpoints is an error, never overwritten.

Under DDP (``trainer.strategy=ddp``) the engine starts one process per device that re-runs the whole command; the
data and folds exist by then, and only rank 0 writes outputs.

Multi-label full-image model (``classifier.multilabel=true``, experiment ``ml_effnetv2m512_bg``): the same folds,
engine, checkpoints and files, but one item per *image* (:mod:`cytologia.classification.fullimage`: the whole image
letterboxed to ``img_size``, a multi-hot target of the classes of its ground-truth boxes) and a sigmoid loss
(``bce`` or ``focal_multilabel``). With ``classifier.background`` (which needs ``classifier.background_table``) the
background images of the table's training folds join training with the 24th label "background" as their only
positive; without it the model has the 23 class labels only. The held-out fold's annotated images are validated:
``val/macro_f1`` (the checkpoint metric) is the macro-F1 of the argmax over the 23 classes on the single-cell images,
``val/mean_ap`` the macro average precision over all of them. Its ``oof_logits.csv`` holds one row per held-out box
(ground-truth boxes, or those of ``classifier.boxes``) with its image's logits, under the model names
``ml:<exp>`` / ``ml:<exp>+hflip`` (see :mod:`cytologia.classification.oof`); ``result.json`` says ``kind:
multilabel``, ``n_train`` / ``n_val`` count images there.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from cytologia.classification.datamodule import CropDataModule, CropSource, FullImageDataModule
from cytologia.classification.module import (
    MULTILABEL_LOSSES,
    ClassifierModule,
    checkpoint_callbacks,
    load_checkpoint,
    mean_average_precision,
    predict_logits,
    resolve_precision,
    score_logits,
)
from cytologia.classification.oof import FILE_NAME as OOF_FILE
from cytologia.classification.oof import logits_of, make_oof_table, read_oof, write_oof
from cytologia.config import SELECT_MODES
from cytologia.data.prepare import ensure_data, ensure_folds, read_train, write_text_atomic
from cytologia.data.schema import BACKGROUND, BOX_COLUMNS, CLASSES, labels
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.oof_names import flip_model_name, multilabel_model_name

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


@dataclass
class FoldResult:
    """What training one fold did."""

    fold: int
    fold_dir: str
    best_checkpoint: str
    last_checkpoint: str
    best_val_macro_f1: float | None  # the engine's best validation macro-F1 (None: validation never ran)
    oof_macro_f1: float  # recomputed from the selected checkpoint's out-of-fold logits (plain view)
    oof_accuracy: float
    epochs: int  # epochs finished
    global_step: int  # optimizer steps
    n_train: int  # training crops (multi-label model: training images, background images included)
    n_val: int  # held-out crops = rows of the OOF table per model (multi-label model: held-out images)
    train_seconds: float  # wall time of this (re)start's fit, validation included
    ms_per_step: float | None  # mean training batch time (forward, backward, optimizer), first batches excluded
    resumed_from: str | None
    kind: str = "cell"  # "cell": a crop model; "multilabel": the full-image multi-label model
    oof_mean_ap: float | None = None  # multi-label model: macro average precision over the held-out images
    # trainer.select that chose the weights of oof_logits.csv; results written before the option were best_val
    select: str = "best_val"
    oof_checkpoint: str | None = None  # the checkpoint whose weights wrote oof_logits.csv (None: best_checkpoint)

    def __post_init__(self) -> None:
        if self.oof_checkpoint is None:  # a result.json from before trainer.select: its OOF came from best.ckpt
            self.oof_checkpoint = self.best_checkpoint


# ------------------------------------------------------------------------------------------------------- data
def read_box_table(path: Path, key: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """A ``NAME,x1,y1,x2,y2`` (+ ``extra``) CSV read as text, coordinates made float, ``box_id`` = 0-based row;
    missing columns and coordinates that are not finite numbers raise :class:`ValidationError` naming the rows."""
    if not path.is_file():
        raise CytologiaInputError(f"config key {key}: {path}: no such file")
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("NAME", *BOX_COLUMNS, *extra) if c not in raw.columns]
    if missing:
        raise ValidationError(path, [(None, f"missing column(s) {', '.join(missing)}; header {list(raw.columns)}")])
    coords = raw[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(coords).all(axis=1) | (raw["NAME"].str.len() == 0).to_numpy())
    if len(bad):
        problems = [
            (int(i) + 1, f"NAME or box {raw.loc[i, list(BOX_COLUMNS)].tolist()} is not valid") for i in bad[:20]
        ]
        raise ValidationError(path, problems, total=len(bad))
    raw[list(BOX_COLUMNS)] = coords
    raw.insert(1, "box_id", np.arange(len(raw), dtype=np.int64))
    return raw


def crop_boxes(cfg: DictConfig, table: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """The boxes to crop, one row each: ``NAME, box_id, x1..y2, class, fold``.

    Ground-truth boxes (``box_id`` from the annotations table), or, with ``classifier.boxes``, the detector's
    out-of-fold boxes (``box_id`` = 0-based row of that table) whose class is the truth box of best GIoU in the same
    image (empty when none matches: such boxes get logits but are not trained on).
    """
    fold_of = folds.set_index("NAME")["fold"]
    if cfg.classifier.boxes is None:
        boxes = table[["NAME", "box_id", *BOX_COLUMNS, "class"]].copy()
    else:
        from cytologia.classification.crops import label_boxes_from_truth

        path = Path(cfg.classifier.boxes)
        detected = read_box_table(path, "classifier.boxes")
        models = sorted(detected["model"].unique()) if "model" in detected.columns else []
        if len(models) > 1:
            raise CytologiaInputError(
                f"{path}: boxes of {len(models)} models ({', '.join(models[:5])}); give one table of fused boxes"
            )
        boxes = label_boxes_from_truth(detected[["NAME", "box_id", *BOX_COLUMNS]], table)
        unknown = ~boxes["NAME"].isin(fold_of.index)
        if unknown.any():
            raise CytologiaInputError(
                f"{path}: {int(unknown.sum())} box(es) on images that are not in train.csv/folds (e.g. "
                f"{boxes.loc[unknown, 'NAME'].iat[0]})"
            )
    boxes["fold"] = boxes["NAME"].map(fold_of).astype(np.int64)
    return boxes.reset_index(drop=True)


def read_background(cfg: DictConfig) -> CropSource | None:
    """The background crops of ``classifier.background_table`` (class "background", ``box_id`` = row), or None."""
    if cfg.classifier.background_table is None:
        return None
    path = Path(cfg.classifier.background_table)
    raw = read_box_table(path, "classifier.background_table", ("fold",))
    fold = pd.to_numeric(raw["fold"], errors="coerce")
    bad = np.flatnonzero(fold.isna().to_numpy() | (fold < 0).to_numpy() | (fold >= cfg.folds.k).to_numpy())
    if len(bad):
        problems = [(int(i) + 1, f"fold={raw['fold'].iat[i]!r} is not in 0..{cfg.folds.k - 1}") for i in bad[:20]]
        raise ValidationError(path, problems, total=len(bad))
    table = raw[["NAME", "box_id", *BOX_COLUMNS]].copy()
    table["class"] = BACKGROUND
    table["fold"] = fold.astype(np.int64)
    return CropSource(table, path.parent / "images")


def dataset_column(cfg: DictConfig, root: Path, boxes: pd.DataFrame) -> np.ndarray:
    """The data set of every box (``sources.csv`` of a combined folder), for ``data.sampling_weights``."""
    from cytologia.data.combine import read_datasets

    if cfg.classifier.multilabel:
        raise CytologiaInputError("data.sampling_weights applies to crop classifiers; the multi-label model has none")
    datasets = read_datasets(root)
    if datasets is None:
        raise CytologiaInputError(
            f"data.sampling_weights is set but {root / 'sources.csv'} has no dataset column: combine the data sets "
            "first (cytologia combine NAME=DIR ... --out DIR)"
        )
    unknown = sorted(set(cfg.data.sampling_weights) - set(datasets))
    if unknown:
        raise CytologiaInputError(
            f"data.sampling_weights names data set(s) {', '.join(unknown)} that {root} does not hold "
            f"({', '.join(sorted(set(datasets)))})"
        )
    return boxes["NAME"].map(datasets).fillna("").astype(str).to_numpy()


def label_index(boxes: pd.DataFrame, label_names: list[str]) -> np.ndarray:
    """Label index of every box (-1 when its class is empty or not a label of the model)."""
    lookup = {name: i for i, name in enumerate(label_names)}
    return boxes["class"].astype(str).map(lookup).fillna(-1).astype(np.int64).to_numpy()


# --------------------------------------------------------------------------------------------------- checks
def check_supported(cfg: DictConfig) -> None:
    """Refuse configurations this stage cannot train yet, with the reason (never silently something else)."""
    c = cfg.classifier
    if c.multilabel and c.loss.name not in MULTILABEL_LOSSES:
        raise CytologiaInputError(
            f"classifier.multilabel=true needs a sigmoid loss (classifier.loss.name one of "
            f"{', '.join(MULTILABEL_LOSSES)}), not {c.loss.name!r}: a softmax over a multi-hot target is not a "
            "distribution; nothing was trained"
        )
    if c.background and c.background_table is None:
        raise CytologiaInputError(
            "classifier.background=true needs background crops: set classifier.background_table to a CSV "
            "NAME,x1,y1,x2,y2,fold of cell-free images (their files in the table's folder, images/), e.g. made by the "
            "detector stage's background step; nothing was trained"
        )
    if c.background_table is not None and not c.background:
        raise CytologiaInputError("classifier.background_table is set but classifier.background=false")
    if c.loss.alpha is not None and len(c.loss.alpha) != len(labels(c.background)):
        raise CytologiaInputError(
            f"config key classifier.loss.alpha has {len(c.loss.alpha)} values, the model has "
            f"{len(labels(c.background))} labels"
        )


def _accelerator(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("cuda", "gpu") and not torch.cuda.is_available():
        raise CytologiaInputError(f"config key trainer.accelerator={name}: no CUDA device is available")
    return name


def _check_resumable(ckpt: Path, hparams: dict[str, Any]) -> None:
    """A checkpoint resumes only into the same architecture and label set."""
    saved = load_checkpoint(ckpt).get("hyper_parameters", {})
    defaults = {"multilabel": False}  # checkpoints of crop models written before the multi-label option
    keys = ("model_name", "label_names", "img_size", "multilabel")
    differ = [k for k in keys if saved.get(k, defaults.get(k)) != hparams.get(k, defaults.get(k))]
    if differ:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {hparams[k]!r}" for k in differ)
        raise CytologiaInputError(f"{ckpt} cannot be resumed with this config ({detail})")


# --------------------------------------------------------------------------------------------------- one fold
class StepTimer(L.Callback):
    """Mean wall time of a training batch (data wait excluded), the first ``skip`` batches (warm-up) excluded."""

    def __init__(self, skip: int = 2) -> None:
        self.skip, self.seen, self.total, self.start = skip, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seen += 1
        if self.seen > self.skip:
            self.total += time.perf_counter() - self.start

    @property
    def ms_per_step(self) -> float | None:
        n = self.seen - self.skip
        return 1000.0 * self.total / n if n > 0 else None


def _loggers(fold_dir: Path) -> list[Any]:
    """CSV logs always (``logs/version_<n>/metrics.csv``, one version per (re)start); TensorBoard logs as well
    (``tb/version_<n>``) when the tensorboard package is installed -- it is not a dependency."""
    loggers: list[Any] = [CSVLogger(save_dir=fold_dir, name="logs")]
    if importlib.util.find_spec("tensorboard") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=fold_dir, name="tb"))
    return loggers


def _merge_metrics(fold_dir: Path) -> None:
    """``fold_dir/metrics.csv``: the CSV logs of every (re)start of the fold, in order."""
    parts = []
    for version in sorted((fold_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        part = pd.read_csv(version)
        part.insert(0, "restart", int(version.parent.name[8:]))
        parts.append(part)
    if parts:
        pd.concat(parts, ignore_index=True).to_csv(fold_dir / "metrics.csv", index=False)


def _finished_fold(cfg: DictConfig, fold: int, fold_dir: Path) -> FoldResult | None:
    """The fold's result when it was already trained for ``trainer.max_epochs`` and ``trainer.resume`` is on; an error
    when its folder holds checkpoints and ``trainer.resume`` is off; else None (train it)."""
    result_path = fold_dir / RESULT_FILE
    if result_path.is_file() and cfg.trainer.resume:
        done = FoldResult(**json.loads(result_path.read_text()))
        if done.epochs >= cfg.trainer.max_epochs:
            if done.select != cfg.trainer.select:
                raise CytologiaInputError(
                    f"{result_path}: fold {fold} was finished with trainer.select={done.select}, this run asks for "
                    f"trainer.select={cfg.trainer.select}: the run's OOF logits would mix two checkpoint choices; "
                    f"resume with trainer.select={done.select}, or train into a new run folder"
                )
            log.info("fold %d: already trained for %d epochs in %s, kept", fold, done.epochs, fold_dir)
            return done
    if (fold_dir / "checkpoints" / "last.ckpt").is_file() and not cfg.trainer.resume:
        raise CytologiaInputError(
            f"{fold_dir} already holds checkpoints: set trainer.resume=true to continue them, or use a new run folder"
        )
    return None


def classifier_module(
    cfg: DictConfig, label_names: list[str], augment: dict[str, Any], **extra: Any
) -> ClassifierModule:
    """The LightningModule of the configured classifier (crop or multi-label); ``extra``: more of its arguments
    (``distill``: a student, :mod:`cytologia.classification.distill`)."""
    t, c = cfg.trainer, cfg.classifier
    return ClassifierModule(
        c.name,
        label_names,
        c.img_size,
        weights=c.weights,
        drop_path=c.drop_path,
        train_last_k=c.train_last_k,
        loss=OmegaConf.to_container(c.loss, resolve=True),
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup_epochs=t.warmup_epochs,
        min_lr_ratio=t.min_lr_ratio,
        mix={k: augment[k] for k in ("mix_prob", "mixup_alpha", "cutmix_alpha")},
        multilabel=c.multilabel,
        **extra,
    )


@dataclass
class _Fit:
    """What :func:`_fit` leaves for the fold's outputs (rank 0)."""

    trainer: L.Trainer
    best: Path  # best.ckpt (last.ckpt when validation never ran)
    chosen: Path  # the checkpoint whose weights the module now holds (trainer.select)
    select: str
    best_score: float | None
    timer: StepTimer
    seconds: float
    precision: str
    resume_from: str | None


def _fit(
    cfg: DictConfig,
    module: ClassifierModule,
    data: L.LightningDataModule,
    fold: int,
    fold_dir: Path,
    callbacks: list[Any] | None,
) -> _Fit | None:
    """Fit ``module`` on ``data`` with the configured engine (resuming from ``last.ckpt`` when present), then load the
    weights of the checkpoint ``trainer.select`` chooses into it. None on DDP ranks other than 0."""
    t = cfg.trainer
    last = fold_dir / "checkpoints" / "last.ckpt"
    resume_from = None
    if last.is_file():
        _check_resumable(last, dict(module.hparams))
        resume_from = str(last)
        log.info("fold %d: resuming from %s", fold, last)

    accelerator = _accelerator(t.accelerator)
    precision = resolve_precision(t.precision, accelerator)
    strategy: Any = t.strategy
    if t.strategy == "ddp" and t.ddp_backend is not None:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend=t.ddp_backend)
    checkpoint, last_checkpoint = checkpoint_callbacks(fold_dir / "checkpoints")
    timer = StepTimer()
    extra: list[Any] = [checkpoint, last_checkpoint, LearningRateMonitor(logging_interval="step"), timer]
    if t.ema:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        extra.append(EMAWeightAveraging(decay=t.ema_decay))
    if t.progress_bar:
        extra.append(TQDMProgressBar(refresh_rate=max(1, min(20, t.log_every_n_steps))))
    from cytologia.device import lightning_num_nodes

    trainer = L.Trainer(
        accelerator=accelerator,
        devices=t.devices,
        num_nodes=lightning_num_nodes(),  # > 1 under a multi-node torchrun / SLURM launch (docs/multi_gpu.md)
        strategy=strategy,
        precision=precision,
        max_epochs=t.max_epochs,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.grad_clip,
        callbacks=extra + list(callbacks or []),
        logger=_loggers(fold_dir),
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        default_root_dir=fold_dir,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    seconds = time.perf_counter() - start
    if trainer.global_rank != 0:
        return None
    best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    chosen = select_checkpoint(t.select, best, last)
    module.load_state_dict(load_checkpoint(chosen)["state_dict"])
    score = checkpoint.best_model_score
    return _Fit(
        trainer,
        best or last,
        chosen,
        t.select,
        None if score is None else float(score),
        timer,
        seconds,
        precision,
        resume_from,
    )


def select_checkpoint(mode: str, best: Path | None, last: Path) -> Path:
    """The checkpoint whose weights write a fold's OOF logits: ``last`` for ``"last"`` (the last finished epoch; its
    ``state_dict`` holds the EMA weights when ``trainer.ema``), ``best`` for ``"best_val"`` (best macro-F1 on the
    held-out fold itself: optimistic OOF), or ``last`` when validation never saved a best one."""
    if mode not in SELECT_MODES:
        raise CytologiaInputError(f"config key trainer.select={mode!r} is not one of: {', '.join(SELECT_MODES)}")
    chosen = best if mode == "best_val" and best is not None else last
    if not Path(chosen).is_file():
        raise CytologiaInputError(f"{chosen}: no such checkpoint (trainer.select={mode})")
    return Path(chosen)


def _fold_result(
    fit: _Fit, fold: int, fold_dir: Path, f1: float, acc: float, n_train: int, n_val: int, **extra: Any
) -> FoldResult:
    """The fold's :class:`FoldResult`, written to ``result.json`` (with the merged metrics)."""
    _merge_metrics(fold_dir)
    result = FoldResult(
        fold=fold,
        fold_dir=str(fold_dir),
        best_checkpoint=str(fit.best),
        last_checkpoint=str(fold_dir / "checkpoints" / "last.ckpt"),
        best_val_macro_f1=fit.best_score,
        oof_macro_f1=f1,
        oof_accuracy=acc,
        epochs=int(fit.trainer.current_epoch),
        global_step=int(fit.trainer.global_step),
        n_train=n_train,
        n_val=n_val,
        train_seconds=round(fit.seconds, 3),
        ms_per_step=fit.timer.ms_per_step,
        resumed_from=fit.resume_from,
        select=fit.select,
        oof_checkpoint=str(Path(fit.chosen).resolve()),
        **extra,
    )
    write_text_atomic(fold_dir / RESULT_FILE, json.dumps(asdict(result), indent=1) + "\n")
    log.info(
        "fold %d: best val macro-F1 %s, OOF macro-F1 %.4f from %s (trainer.select=%s)",
        fold,
        result.best_val_macro_f1,
        f1,
        fit.chosen,
        fit.select,
    )
    return result


# ------------------------------------------------------------------------- what one item is: a crop or an image
@dataclass
class CropItems:
    """A crop model's items: one per box of ``boxes`` (:func:`crop_boxes`), trained on its known label.

    A strategy: a subclass changes which items a fold trains on (:meth:`split`), what a batch carries
    (``datamodule_class``) and the module (:meth:`module`) -- a distilled student or a pseudo-labelled member
    (:mod:`cytologia.classification.distill`, :mod:`cytologia.classification.pseudo`) -- the trainer stays."""

    datamodule_class: ClassVar[type[CropDataModule]] = CropDataModule
    boxes: pd.DataFrame
    kind: str = "cell"
    unit: str = "box"

    def split(self, fold: int, label_names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Training items (other folds, known label) and held-out items (``fold``, every box: each gets logits)."""
        known = label_index(self.boxes, label_names) >= 0
        in_fold = (self.boxes["fold"] == fold).to_numpy()
        if (~in_fold & ~known).any():
            log.warning(
                "fold %d: %d training box(es) without a known label left out", fold, int((~in_fold & ~known).sum())
            )
        return self.boxes[~in_fold & known].reset_index(drop=True), self.boxes[in_fold].reset_index(drop=True)

    def datamodule(
        self, cfg: DictConfig, train: list[CropSource], val: CropSource, label_names: list[str], augment: dict
    ) -> CropDataModule:
        t, c = cfg.trainer, cfg.classifier
        return self.datamodule_class(
            train,
            val,
            label_names,
            c.img_size,
            margin=c.margin,
            batch_size=t.batch_size,
            num_workers=t.num_workers,
            augment=augment,
            cache=c.cache,
            sampling=None if cfg.data.sampling_weights is None else dict(cfg.data.sampling_weights),
        )

    def module(self, cfg: DictConfig, label_names: list[str], augment: dict[str, Any], fold: int) -> Any:
        """The fold's LightningModule (:func:`classifier_module`)."""
        return classifier_module(cfg, label_names, augment)

    def model_name(self, exp_name: str) -> str:
        return exp_name

    def oof_rows(self, val: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, np.ndarray]:
        """The boxes that get an OOF row and, per row, the index of its logits among the held-out items."""
        return val, np.arange(len(val))

    def n_train(self, sources: list[CropSource]) -> int:
        return len(sources[0].table)  # the annotated crops (background crops are logged apart)

    def scores(
        self, data: CropDataModule, plain: np.ndarray, val: pd.DataFrame, label_names: list[str], n_cells: int
    ) -> tuple[float, float, dict[str, Any]]:
        f1, acc = score_logits(plain, label_index(val, label_names), label_names, n_cells)
        return f1, acc, {}


@dataclass
class ImageItems(CropItems):
    """The multi-label full-image model's items: one per image of ``images``
    (:func:`cytologia.classification.fullimage.image_table`); ``boxes`` are the boxes the OOF table gets a row for
    (:func:`crop_boxes`), each given its image's logits."""

    images: pd.DataFrame = field(default_factory=pd.DataFrame)
    kind: str = "multilabel"
    unit: str = "image"

    def split(self, fold: int, label_names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        in_fold = (self.images["fold"] == fold).to_numpy()
        return self.images[~in_fold].reset_index(drop=True), self.images[in_fold].reset_index(drop=True)

    def datamodule(
        self, cfg: DictConfig, train: list[CropSource], val: CropSource, label_names: list[str], augment: dict
    ) -> CropDataModule:
        t, c = cfg.trainer, cfg.classifier
        return FullImageDataModule(
            train,
            val,
            label_names,
            c.img_size,
            batch_size=t.batch_size,
            num_workers=t.num_workers,
            augment=augment,
            cache=c.cache,
        )

    def model_name(self, exp_name: str) -> str:
        return multilabel_model_name(exp_name)

    def oof_rows(self, val: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, np.ndarray]:
        held = self.boxes[self.boxes["fold"] == fold].reset_index(drop=True)
        at = pd.Series(np.arange(len(val)), index=val["NAME"]).reindex(held["NAME"].astype(str)).to_numpy()
        lost = np.isnan(at.astype(np.float64))
        if lost.any():  # detected boxes on an image whose truth boxes were all dropped by validation: not an image here
            log.warning("fold %d: %d box(es) on images without a ground-truth box get no logits", fold, int(lost.sum()))
            held, at = held[~lost].reset_index(drop=True), at[~lost]
        return held, at.astype(np.int64)

    def n_train(self, sources: list[CropSource]) -> int:
        return sum(len(s.table) for s in sources)  # background images included

    def scores(
        self, data: CropDataModule, plain: np.ndarray, val: pd.DataFrame, label_names: list[str], n_cells: int
    ) -> tuple[float, float, dict[str, Any]]:
        val_set = data.val_set
        f1, acc = score_logits(plain, val_set.cell_labels, label_names, n_cells)  # type: ignore[union-attr]
        return f1, acc, {"kind": self.kind, "oof_mean_ap": mean_average_precision(plain, val_set.targets)}  # type: ignore[union-attr]


def train_fold(
    cfg: DictConfig,
    items: CropItems,
    fold: int,
    fold_dir: Path,
    image_dir: Path,
    label_names: list[str],
    callbacks: list[Any] | None = None,
    background: CropSource | None = None,
) -> FoldResult | None:
    """Train on the ``items`` of every fold but ``fold`` (crops: :class:`CropItems`; whole images for the multi-label
    model: :class:`ImageItems`), validate on ``fold``, write the fold's outputs (rank 0 only; other DDP ranks return
    None). ``background``: extra training items (their folds other than ``fold``). ``callbacks``: extra Lightning
    callbacks (tests)."""
    fold_dir = Path(fold_dir)
    done = _finished_fold(cfg, fold, fold_dir)
    if done is not None:
        return done

    L.seed_everything(int(cfg.seed) + fold, workers=True, verbose=False)
    train_table, val_table = items.split(fold, label_names)
    if train_table.empty or val_table.empty:
        raise CytologiaInputError(
            f"fold {fold}: {len(train_table)} training and {len(val_table)} held-out {items.unit}(s)"
        )
    augment = OmegaConf.to_container(cfg.classifier.augment, resolve=True)
    sources = [CropSource(train_table, image_dir)]
    if background is not None:
        bg = background.table[background.table["fold"] != fold].reset_index(drop=True)
        sources.append(CropSource(bg, background.image_dir))
        log.info("fold %d: %d background %s(s) added to training", fold, len(bg), items.unit)
    data = items.datamodule(cfg, sources, CropSource(val_table, image_dir), label_names, augment)
    module = items.module(cfg, label_names, augment, fold)
    fit = _fit(cfg, module, data, fold, fold_dir, callbacks)
    if fit is None:
        return None

    device = fit.trainer.strategy.root_device
    plain, flipped, index = predict_logits(
        module.model, data.predict_loader(), device, hflip=cfg.ensemble.tta_flip, precision=fit.precision
    )
    if not np.array_equal(index, np.arange(len(val_table))):
        raise RuntimeError(f"fold {fold}: the prediction loader returned {len(index)} rows out of table order")
    held, at = items.oof_rows(val_table, fold)
    model = items.model_name(cfg.exp_name)
    names, box_ids = held["NAME"].to_numpy(), held["box_id"].to_numpy()
    tables = [make_oof_table(names, box_ids, fold, model, plain[at])]
    if cfg.ensemble.tta_flip:
        tables.append(make_oof_table(names, box_ids, fold, flip_model_name(model), ((plain + flipped) / 2)[at]))
    write_oof(pd.concat(tables, ignore_index=True), fold_dir / OOF_FILE)
    f1, acc, extra = items.scores(data, plain, val_table, label_names, module.n_cell_classes)
    n_train = items.n_train(sources)
    return _fold_result(fit, fold, fold_dir, f1, acc, n_train=n_train, n_val=len(val_table), **extra)


# --------------------------------------------------------------------------------------------------- the stage
def run(cfg: DictConfig, run_dir: Path) -> dict[str, object]:
    """Train the configured fold (``cfg.fold``) or every fold; returns the summary (also written to
    ``run_dir/summary.json`` with the OOF logits of every trained fold in ``run_dir/oof_logits.csv``)."""
    check_supported(cfg)
    run_dir = Path(run_dir)
    root = ensure_data(cfg)
    table = read_train(cfg, root)
    folds = ensure_folds(cfg, table, root)
    boxes = crop_boxes(cfg, table, folds)
    if cfg.data.sampling_weights:
        boxes["dataset"] = dataset_column(cfg, root, boxes)
    label_names = list(labels(cfg.classifier.background))
    background = read_background(cfg)
    images = None
    if cfg.classifier.multilabel:
        from cytologia.classification.fullimage import background_image_table, image_table

        images = image_table(multilabel_truth(table, folds), str(root / "train.csv"))
        if background is not None:
            source = str(cfg.classifier.background_table)
            background = CropSource(background_image_table(background.table, source), background.image_dir)
    items = CropItems(boxes) if images is None else ImageItems(boxes, images=images)
    to_train = [int(cfg.fold)] if cfg.fold is not None else list(range(int(cfg.folds.k)))
    results = []
    for fold in to_train:
        fold_dir = run_dir / f"fold_{fold}"
        result = train_fold(cfg, items, fold, fold_dir, root / "images", label_names, background=background)
        if result is not None:
            results.append(result)
    if not results:  # a DDP rank > 0: rank 0 writes the summary
        return {"folds": to_train}
    return summarize(cfg, run_dir, boxes, results, label_names, images=images)


def multilabel_truth(table: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """``NAME, class, fold`` of every ground-truth box: what the multi-label targets are made from (also when the
    OOF rows are detected boxes)."""
    fold_of = folds.set_index("NAME")["fold"]
    return pd.DataFrame(
        {
            "NAME": table["NAME"].to_numpy(),
            "class": table["class"].to_numpy(),
            "fold": table["NAME"].map(fold_of).to_numpy(),
        }
    )


def summarize(
    cfg: DictConfig,
    run_dir: Path,
    boxes: pd.DataFrame,
    results: list[FoldResult],
    label_names: list[str],
    images: pd.DataFrame | None = None,
) -> dict[str, object]:
    """Concatenate the folds' OOF logits, score them together, write ``oof_logits.csv`` and ``summary.json``.

    Crop models are scored on every OOF box against its class; the multi-label model (``images``: its image table)
    once per image, on the single-cell images (argmax over the 23 classes against the class of the only box)."""
    oof = pd.concat([read_oof(Path(r.fold_dir) / OOF_FILE) for r in results], ignore_index=True)
    write_oof(oof, run_dir / OOF_FILE)
    if images is None:
        model = cfg.exp_name
        plain = oof[oof["model"] == model]
        truth = boxes.set_index(["NAME", "box_id"])["class"]
        classes = truth.reindex(pd.MultiIndex.from_frame(plain[["NAME", "box_id"]])).fillna("")
        scored = plain
    else:
        model = multilabel_model_name(cfg.exp_name)
        plain = oof[oof["model"] == model]
        scored = plain.drop_duplicates("NAME")
        classes = images.set_index("NAME")["cell_class"].reindex(scored["NAME"]).fillna("")
    y = label_index(pd.DataFrame({"class": classes.to_numpy()}), label_names)
    f1, acc = score_logits(logits_of(scored), y, label_names, len(CLASSES))
    summary = {
        "exp_name": cfg.exp_name,
        "run_dir": str(run_dir),
        "kind": "multilabel" if images is not None else "cell",
        "oof_model": model,
        "folds_trained": [r.fold for r in results],
        "select": ",".join(sorted({r.select for r in results})),  # trainer.select of the folds' OOF logits
        "per_fold_macro_f1": {r.fold: r.oof_macro_f1 for r in results},
        "oof_macro_f1": f1,
        "oof_accuracy": acc,
        "n_oof_boxes": len(plain),
        "folds": [asdict(r) for r in results],
    }
    if images is not None:
        summary["n_scored_single_cell_images"] = int((y >= 0).sum())
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    log.info("OOF macro-F1 over fold(s) %s: %.4f (trainer.select=%s)", summary["folds_trained"], f1, summary["select"])
    keys = ("kind", "oof_model", "folds_trained", "select", "per_fold_macro_f1", "oof_macro_f1", "oof_accuracy")
    return {k: summary[k] for k in keys}
