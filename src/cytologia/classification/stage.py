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
    <run_dir>/fold_<k>/oof_logits.csv          logits of the held-out boxes from the best checkpoint
    <run_dir>/fold_<k>/result.json             what the fold did (scores, steps, timing)
    <run_dir>/oof_logits.csv, summary.json     every fold trained in this run folder together

Resuming after a kill: run the same experiment into the same folder with ``trainer.resume=true``
(``python train.py +exp=NAME hydra.run.dir=outputs/NAME/<timestamp> trainer.resume=true``): finished folds are
kept, a fold with ``last.ckpt`` continues from it (optimizer, schedule, EMA and step counter included), the rest
start. Without ``trainer.resume`` a fold folder that already holds checkpoints is an error, never overwritten.

Under DDP (``trainer.strategy=ddp``) the engine starts one process per device that re-runs the whole command; the
data and folds exist by then, and only rank 0 writes outputs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from cytologia.classification.datamodule import CropDataModule, CropSource
from cytologia.classification.module import (
    ClassifierModule,
    checkpoint_callbacks,
    load_checkpoint,
    predict_logits,
    resolve_precision,
    score_logits,
)
from cytologia.classification.oof import FILE_NAME as OOF_FILE
from cytologia.classification.oof import logits_of, make_oof_table, read_oof, write_oof
from cytologia.data.errors import CytologiaInputError, ValidationError
from cytologia.data.schema import BACKGROUND, BOX_COLUMNS, CLASSES, labels

log = logging.getLogger(__name__)

FOLDS_FILE = "folds.csv"
FOLDS_REPORT = "folds_report.json"
RESULT_FILE = "result.json"


@dataclass
class FoldResult:
    """What training one fold did."""

    fold: int
    fold_dir: str
    best_checkpoint: str
    last_checkpoint: str
    best_val_macro_f1: float | None  # the engine's best validation macro-F1 (None: validation never ran)
    oof_macro_f1: float  # recomputed from the best checkpoint's out-of-fold logits (plain view)
    oof_accuracy: float
    epochs: int  # epochs finished
    global_step: int  # optimizer steps
    n_train: int  # training crops
    n_val: int  # held-out crops (rows of the OOF table per model)
    train_seconds: float  # wall time of this (re)start's fit, validation included
    ms_per_step: float | None  # mean training batch time (forward, backward, optimizer), first batches excluded
    resumed_from: str | None


# ------------------------------------------------------------------------------------------------------- data
def ensure_data(cfg: DictConfig) -> Path:
    """The data folder, holding ``train.csv`` and ``images/``; a synthetic set is generated there when configured
    and absent."""
    root = Path(cfg.data.root)
    train_csv = root / "train.csv"
    if not train_csv.is_file():
        if not cfg.data.synthetic:
            raise CytologiaInputError(
                f"{train_csv}: no such file (data.root={cfg.data.root}); place the Cytologia data there "
                "(train.csv + images/) or use data=synthetic"
            )
        if cfg.data.n_images < 1:
            raise CytologiaInputError(f"config key data.n_images={cfg.data.n_images} must be >= 1 to generate data")
        from cytologia.data.synthetic.generate import generate

        workers = max(1, min(4, (os.cpu_count() or 1)))
        log.info("generating %d synthetic images into %s (seed %d)", cfg.data.n_images, root, cfg.data.synth_seed)
        generate(root, cfg.data.n_images, seed=cfg.data.synth_seed, workers=workers)
    if not (root / "images").is_dir():
        raise CytologiaInputError(f"{root / 'images'}: no such folder (the images of {train_csv})")
    return root


def read_train(cfg: DictConfig, root: Path) -> pd.DataFrame:
    """The validated annotations table of ``root/train.csv`` (lenient per ``data.lenient``; the report is logged)."""
    from cytologia.data.io import read_annotations

    table, report = read_annotations(root / "train.csv", root / "images", lenient=cfg.data.lenient)
    log.info("%s", report.summary())
    if table.empty:
        raise CytologiaInputError(f"{root / 'train.csv'}: no usable box left after validation")
    return table


def read_folds(path: Path) -> pd.DataFrame:
    """A ``NAME,fold`` table; bad rows raise :class:`ValidationError` naming the file and rows."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("NAME", "fold") if c not in raw.columns]
    if missing:
        raise ValidationError(path, [(None, f"missing column(s) {', '.join(missing)}")])
    fold = pd.to_numeric(raw["fold"], errors="coerce")
    bad = np.flatnonzero(fold.isna().to_numpy() | (fold < 0).to_numpy() | (fold != fold.round()).to_numpy())
    dup = np.flatnonzero(raw["NAME"].duplicated().to_numpy())
    problems = [(int(i) + 1, f"fold={raw['fold'].iat[i]!r} is not a non-negative integer") for i in bad[:20]]
    problems += [(int(i) + 1, f"NAME {raw['NAME'].iat[i]} repeats") for i in dup[:20]]
    if problems:
        raise ValidationError(path, problems, total=len(bad) + len(dup))
    return pd.DataFrame({"NAME": raw["NAME"], "fold": fold.astype(np.int64)})


def _write_text(path: Path, text: str) -> None:
    """Write a file atomically (temporary file, then rename): a killed run never leaves half a table."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ensure_folds(cfg: DictConfig, table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """``root/folds.csv`` when it exists (checked against the config and the table), else made and written."""
    path = root / FOLDS_FILE
    k = int(cfg.folds.k)
    if path.is_file():
        folds = read_folds(path)
        report_path = root / FOLDS_REPORT
        if report_path.is_file():
            made = json.loads(report_path.read_text())
            wanted = {"k": k, "seed": int(cfg.folds.seed), "mode": str(cfg.folds.mode)}
            differ = {key: made.get(key) for key in wanted if made.get(key) != wanted[key]}
            if differ:
                raise CytologiaInputError(
                    f"{path} was made with {differ} but the config asks for {wanted}: delete {path} (and "
                    f"{report_path}) to remake the folds, or change the folds config"
                )
        found = sorted(set(folds["fold"].tolist()))
        if found != list(range(k)):
            raise CytologiaInputError(f"{path} holds folds {found}, the config asks for folds.k={k}")
    else:
        from cytologia.data.folds import make_folds

        dup_groups = None
        try:
            from cytologia.data.hygiene import find_duplicates

            names = list(pd.unique(table["NAME"]))
            dups = find_duplicates(root / "images", names, near_threshold=cfg.folds.near_threshold)
            dup_groups = dups.set_index("NAME")["dup_group"]
        except ModuleNotFoundError as err:  # hygiene is optional for folds: without it duplicates are not grouped
            log.warning("duplicate images not grouped for the folds: %s", err)
        folds, report = make_folds(
            table, k=k, seed=int(cfg.folds.seed), mode=str(cfg.folds.mode), image_dir=root / "images",
            dup_groups=dup_groups,
        )  # fmt: skip
        _write_text(root / FOLDS_REPORT, json.dumps(report.to_dict(), indent=1, default=str) + "\n")
        _write_text(path, folds.to_csv(index=False))  # last: folds.csv present means its report is too
        log.info("%s\nwrote %s", report.summary(), path)
    lost = ~table["NAME"].isin(folds["NAME"])
    if lost.any():
        first = ", ".join(table.loc[lost, "NAME"].astype(str).unique()[:5])
        raise CytologiaInputError(
            f"{path}: {int(lost.sum())} box(es) of train.csv belong to images without a fold (e.g. {first}); the "
            f"folds are stale: delete {path} to remake them"
        )
    return folds


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


def label_index(boxes: pd.DataFrame, label_names: list[str]) -> np.ndarray:
    """Label index of every box (-1 when its class is empty or not a label of the model)."""
    lookup = {name: i for i, name in enumerate(label_names)}
    return boxes["class"].astype(str).map(lookup).fillna(-1).astype(np.int64).to_numpy()


# --------------------------------------------------------------------------------------------------- checks
def check_supported(cfg: DictConfig) -> None:
    """Refuse configurations this stage cannot train yet, with the reason (never silently something else)."""
    c = cfg.classifier
    if c.multilabel:
        raise CytologiaInputError(
            "classifier.multilabel=true (the full-image multi-label model of the ml_* experiments) is not implemented "
            "yet: its dataset (whole images with 24-label presence targets) and blend rule are issue #5/#6 follow-ups; "
            "nothing was trained"
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
    differ = [k for k in ("model_name", "label_names", "img_size") if saved.get(k) != hparams[k]]
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


def train_fold(
    cfg: DictConfig,
    boxes: pd.DataFrame,
    fold: int,
    fold_dir: Path,
    image_dir: Path,
    label_names: list[str],
    callbacks: list[Any] | None = None,
    background: CropSource | None = None,
) -> FoldResult | None:
    """Train on every fold but ``fold``, validate on ``fold``, write the fold's outputs (rank 0 only; other DDP
    ranks return None). ``background``: extra training crops (their folds other than ``fold``). ``callbacks``:
    extra Lightning callbacks (tests)."""
    t, c = cfg.trainer, cfg.classifier
    fold_dir = Path(fold_dir)
    result_path = fold_dir / RESULT_FILE
    last = fold_dir / "checkpoints" / "last.ckpt"
    if result_path.is_file() and cfg.trainer.resume:
        done = json.loads(result_path.read_text())
        if done["epochs"] >= t.max_epochs:
            log.info("fold %d: already trained for %d epochs in %s, kept", fold, done["epochs"], fold_dir)
            return FoldResult(**done)
    if last.is_file() and not t.resume:
        raise CytologiaInputError(
            f"{fold_dir} already holds checkpoints: set trainer.resume=true to continue them, or use a new run folder"
        )

    L.seed_everything(int(cfg.seed) + fold, workers=True, verbose=False)
    known = label_index(boxes, label_names) >= 0
    in_fold = (boxes["fold"] == fold).to_numpy()
    train_table = boxes[~in_fold & known].reset_index(drop=True)
    val_table = boxes[in_fold].reset_index(drop=True)
    if (~in_fold & ~known).any():
        log.warning("fold %d: %d training box(es) without a known label left out", fold, int((~in_fold & ~known).sum()))
    if train_table.empty or val_table.empty:
        raise CytologiaInputError(f"fold {fold}: {len(train_table)} training and {len(val_table)} held-out boxes")

    augment = OmegaConf.to_container(c.augment, resolve=True)
    sources = [CropSource(train_table, image_dir)]
    if background is not None:
        bg = background.table[background.table["fold"] != fold].reset_index(drop=True)
        sources.append(CropSource(bg, background.image_dir))
        log.info("fold %d: %d background crops added to training", fold, len(bg))
    data = CropDataModule(
        sources, CropSource(val_table, image_dir), label_names, c.img_size,
        margin=c.margin, batch_size=t.batch_size, num_workers=t.num_workers, augment=augment, cache=c.cache,
    )  # fmt: skip
    module = ClassifierModule(
        c.name, label_names, c.img_size, weights=c.weights, drop_path=c.drop_path, train_last_k=c.train_last_k,
        loss=OmegaConf.to_container(c.loss, resolve=True), lr=t.lr, weight_decay=t.weight_decay,
        warmup_epochs=t.warmup_epochs, min_lr_ratio=t.min_lr_ratio,
        mix={k: augment[k] for k in ("mix_prob", "mixup_alpha", "cutmix_alpha")},
    )  # fmt: skip
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
    trainer = L.Trainer(
        accelerator=accelerator, devices=t.devices, strategy=strategy, precision=precision, max_epochs=t.max_epochs,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.grad_clip,
        callbacks=extra + list(callbacks or []), logger=_loggers(fold_dir),
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=t.progress_bar, default_root_dir=fold_dir,
        enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    seconds = time.perf_counter() - start
    if trainer.global_rank != 0:
        return None

    best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else last
    module.load_state_dict(load_checkpoint(best)["state_dict"])
    device = trainer.strategy.root_device
    plain, flipped, index = predict_logits(
        module.model, data.predict_loader(), device, hflip=cfg.ensemble.tta_flip, precision=precision
    )
    if not np.array_equal(index, np.arange(len(val_table))):
        raise RuntimeError(f"fold {fold}: the prediction loader returned {len(index)} rows out of table order")
    names, box_ids = val_table["NAME"].to_numpy(), val_table["box_id"].to_numpy()
    tables = [make_oof_table(names, box_ids, fold, cfg.exp_name, plain)]
    if cfg.ensemble.tta_flip:
        tables.append(make_oof_table(names, box_ids, fold, f"{cfg.exp_name}+hflip", (plain + flipped) / 2))
    write_oof(pd.concat(tables, ignore_index=True), fold_dir / OOF_FILE)
    f1, acc = score_logits(plain, label_index(val_table, label_names), label_names, module.n_cell_classes)
    _merge_metrics(fold_dir)
    best_score = checkpoint.best_model_score
    result = FoldResult(
        fold=fold, fold_dir=str(fold_dir), best_checkpoint=str(best), last_checkpoint=str(last),
        best_val_macro_f1=None if best_score is None else float(best_score), oof_macro_f1=f1, oof_accuracy=acc,
        epochs=int(trainer.current_epoch), global_step=int(trainer.global_step), n_train=len(train_table),
        n_val=len(val_table), train_seconds=round(seconds, 3), ms_per_step=timer.ms_per_step,
        resumed_from=resume_from,
    )  # fmt: skip
    _write_text(result_path, json.dumps(asdict(result), indent=1) + "\n")
    log.info("fold %d: best val macro-F1 %s, OOF macro-F1 %.4f (%s)", fold, result.best_val_macro_f1, f1, fold_dir)
    return result


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
    label_names = list(labels(cfg.classifier.background))
    background = read_background(cfg)
    to_train = [int(cfg.fold)] if cfg.fold is not None else list(range(int(cfg.folds.k)))
    results = []
    for fold in to_train:
        result = train_fold(
            cfg, boxes, fold, run_dir / f"fold_{fold}", root / "images", label_names, background=background
        )
        if result is not None:
            results.append(result)
    if not results:  # a DDP rank > 0: rank 0 writes the summary
        return {"folds": to_train}
    return summarize(cfg, run_dir, boxes, results, label_names)


def summarize(
    cfg: DictConfig, run_dir: Path, boxes: pd.DataFrame, results: list[FoldResult], label_names: list[str]
) -> dict[str, object]:
    """Concatenate the folds' OOF logits, score them together, write ``oof_logits.csv`` and ``summary.json``."""
    oof = pd.concat([read_oof(Path(r.fold_dir) / OOF_FILE) for r in results], ignore_index=True)
    write_oof(oof, run_dir / OOF_FILE)
    plain = oof[oof["model"] == cfg.exp_name]
    truth = boxes.set_index(["NAME", "box_id"])["class"]
    classes = truth.reindex(pd.MultiIndex.from_frame(plain[["NAME", "box_id"]])).fillna("")
    y = label_index(pd.DataFrame({"class": classes.to_numpy()}), label_names)
    f1, acc = score_logits(logits_of(plain), y, label_names, len(CLASSES))
    summary = {
        "exp_name": cfg.exp_name,
        "run_dir": str(run_dir),
        "folds_trained": [r.fold for r in results],
        "per_fold_macro_f1": {r.fold: r.oof_macro_f1 for r in results},
        "oof_macro_f1": f1,
        "oof_accuracy": acc,
        "n_oof_boxes": len(plain),
        "folds": [asdict(r) for r in results],
    }
    _write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    log.info("OOF macro-F1 over fold(s) %s: %.4f", summary["folds_trained"], f1)
    return {k: summary[k] for k in ("folds_trained", "per_fold_macro_f1", "oof_macro_f1", "oof_accuracy")}
