"""The detector stage: ``run(cfg, run_dir)`` trains one fold (``fold=K``) or every fold, and writes out-of-fold boxes.

Steps: make sure the data exists (a synthetic set is generated on first use when ``data.synthetic``), read and
validate ``train.csv`` (lenient per ``data.lenient``), read ``folds.csv`` from the data folder or make it (the
convention the classifier stage follows too, so both stages share folds), then per fold::

    <run_dir>/fold_<k>/detector.pt         the selected checkpoint (best known-count box term on the held-out fold)
    <run_dir>/fold_<k>/ultralytics/        the backend's own run folder (args.yaml, results.csv, best.pt, last.pt)
    <run_dir>/fold_<k>/oof_boxes.csv       raw boxes of every held-out image (plain, and mirrored with tta_flip)
    <run_dir>/fold_<k>/metrics.json        selection, per-epoch history, timing, box term per model variant
    <run_dir>/oof_boxes.csv, metrics.json  the folds of this run together; folds.csv: the folds used

The box term reported is the challenge's (mean rescaled GIoU) under the known-count rule, scored against the
training labels of the held-out images (:func:`cytologia.detection.oof.known_count_giou`), for each model variant
alone (fusing the variants is :mod:`cytologia.detection.fusion`'s job).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cytologia.config import settings_from
from cytologia.data.prepare import FOLDS_FILE, ensure_data, ensure_folds, read_train
from cytologia.detection.base import MAX_STRIDE
from cytologia.detection.oof import OOF_COLUMNS, empty_boxes, known_count_giou, write_boxes
from cytologia.detection.registry import DetectionData, Detector, TrainResult, TrainSettings, create_detector
from cytologia.errors import CytologiaInputError
from cytologia.oof_names import flip_model_name

log = logging.getLogger(__name__)

OOF_FILE = "oof_boxes.csv"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "detector.pt"


# ------------------------------------------------------------------------------------------------------ config
def check_detector_config(det: DictConfig) -> None:
    """Ranges of the detector group (names are checked by the registry when the detector is created)."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise CytologiaInputError(f"config key detector.{key}={det[key]!r} {what}")

    need(
        det.img_size >= MAX_STRIDE and det.img_size % MAX_STRIDE == 0,
        "img_size",
        f"must be a positive multiple of {MAX_STRIDE}",
    )
    for key in ("epochs", "batch_size", "max_det", "predict_batch"):
        need(det[key] >= 1, key, "must be >= 1")
    for key in ("patience", "workers"):
        need(det[key] >= 0, key, "must be >= 0")
    need(det.lr > 0, "lr", "must be > 0")
    need(0.0 <= det.conf < 1.0, "conf", "must be in [0, 1)")
    need(0.0 < det.nms_iou <= 1.0, "nms_iou", "must be in (0, 1]")


def model_id(det: DictConfig) -> str:
    """The ``model`` value of this detector's boxes: architecture and input size, e.g. ``yolo11s_512``."""
    return f"{det.model}_{det.img_size}"


def init_weights(cfg: DictConfig) -> Path | None:
    """``detector.weights`` as a checked path (:func:`cytologia.weights_catalog.resolve_weights`): a catalog name
    (``yolox_s``: the official release file in ``paths.models_dir``), a file path, or a bare name in
    ``paths.models_dir``, whose sha256 must match the manifest of its folder. None for ``random``; null is an error
    (random weights are asked for explicitly)."""
    from cytologia.weights_catalog import resolve_weights

    return resolve_weights(cfg.detector.weights, cfg.paths.models_dir, key="detector.weights")


# keys of the detector group that are not training settings: the detector's name and init weights (create_detector)
# and the out-of-fold prediction's options (oof_boxes)
NOT_TRAIN_SETTINGS: tuple[str, ...] = ("backend", "model", "weights", "conf", "max_det", "tta_flip", "predict_batch")


def train_settings(cfg: DictConfig) -> TrainSettings:
    """The detector group as :class:`TrainSettings`, field by name (``train_args`` -> ``extra``, ``seed`` from the
    run): a detector key that is neither a setting nor in :data:`NOT_TRAIN_SETTINGS` is an error."""
    return settings_from(
        TrainSettings,
        cfg.detector,
        rename={"train_args": "extra"},
        skip=NOT_TRAIN_SETTINGS,
        source="detector",
        seed=int(cfg.seed),
    )


# ------------------------------------------------------------------------------------------------------- data
# ---------------------------------------------------------------------------------------------------- out-of-fold
def oof_boxes(
    detector: Detector, cfg: DictConfig, image_dir: Path, names: list[str], fold: int
) -> tuple[pd.DataFrame, float]:
    """Raw boxes of the held-out images ``names`` (plain pass, and mirrored pass with ``detector.tta_flip``) as an
    :data:`~cytologia.detection.oof.OOF_COLUMNS` table; returns it with the prediction wall time (s)."""
    det = cfg.detector
    start = time.perf_counter()
    pred = detector.predict(
        [image_dir / n for n in names],
        img_size=int(det.img_size),
        conf=float(det.conf),
        iou=float(det.nms_iou),
        max_det=int(det.max_det),
        tta_flip=bool(det.tta_flip),
        batch_size=int(det.predict_batch),
        device=str(det.device),
        names=names,
    )
    seconds = time.perf_counter() - start
    base = model_id(det)
    out = pred.drop(columns="tta")
    out["model"] = np.where(pred["tta"].to_numpy() == "hflip", flip_model_name(base), base)
    out["fold"] = np.int64(fold)
    return out[list(OOF_COLUMNS)], seconds


def box_scores(oof: pd.DataFrame, truth: pd.DataFrame, variants: list[str]) -> dict[str, float]:
    """Known-count box term of each model variant alone (a variant without any box scores its padding)."""
    out = {}
    for model in variants:
        boxes = oof.loc[oof["model"] == model]
        out[model] = known_count_giou(boxes if len(boxes) else empty_boxes(), truth)
    return out


def _fold_summary(
    result: TrainResult, scores: dict[str, float], n_held: int, predict_s: float, oof: pd.DataFrame
) -> dict[str, object]:
    kc = [row.get("metrics/known_count_giou", float("nan")) for row in result.history]
    epoch_s = result.epoch_seconds
    return {
        "checkpoint": str(result.weights),
        "selection": result.selection,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "selection_metric_per_epoch": kc,
        "final_metrics": result.metrics,
        "oof_known_count_giou": scores,
        "n_train_images": result.n_train_images,
        "n_val_images": result.n_val_images,
        "n_held_out_without_box": int(n_held - oof["NAME"].nunique()),
        "train_seconds": result.seconds,
        "epoch_train_seconds": epoch_s,
        "train_seconds_per_epoch_per_100_images": (
            float(np.mean(epoch_s)) * 100.0 / max(result.n_train_images, 1) if epoch_s else None
        ),
        "predict_seconds": predict_s,
        "predict_ms_per_image_pass": 1000.0 * predict_s / max(n_held * len(scores), 1),
        "history": result.history,
    }


def run(cfg: DictConfig, run_dir: Path) -> dict[str, object]:
    """Train the configured detector on one fold (``cfg.fold``) or every fold; write weights, OOF boxes, metrics."""
    det = cfg.detector
    check_detector_config(det)
    create_detector(det.backend, det.model)  # a misspelt backend/model fails before any data work
    weights = init_weights(cfg)  # so does a missing or altered weight file
    run_dir = Path(run_dir)
    root = ensure_data(cfg)
    table = read_train(cfg, root)
    folds = ensure_folds(cfg, table, root)
    run_dir.mkdir(parents=True, exist_ok=True)
    folds.to_csv(run_dir / FOLDS_FILE, index=False)
    fold_ids = [int(cfg.fold)] if cfg.fold is not None else list(range(int(cfg.folds.k)))
    settings = train_settings(cfg)
    cache = Path(cfg.paths.cache_dir) / "detector"
    variants = [model_id(det)] + ([flip_model_name(model_id(det))] if det.tta_flip else [])
    summaries: dict[str, object] = {}
    parts = []
    for k in fold_ids:
        fold_dir = run_dir / f"fold_{k}"
        detector = create_detector(det.backend, det.model, weights=weights)
        log.info("detector %s fold %d: training into %s", model_id(det), k, fold_dir)
        data = DetectionData(table=table, folds=folds, image_dir=root / "images", fold=k, cache_dir=cache)
        result = detector.train(data, fold_dir, settings)
        held = folds.loc[folds["fold"] == k, "NAME"].astype(str).tolist()
        oof, predict_s = oof_boxes(detector, cfg, root / "images", held, k)
        write_boxes(oof, fold_dir / OOF_FILE)
        scores = box_scores(oof, table.loc[table["NAME"].isin(held)], variants)
        summary = _fold_summary(result, scores, len(held), predict_s, oof)
        (fold_dir / METRICS_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        log.info("fold %d: best epoch %d, known-count box term %s", k, result.best_epoch, scores)
        summaries[str(k)] = {key: v for key, v in summary.items() if key != "history"}
        parts.append(oof)
    all_oof = pd.concat(parts, ignore_index=True) if parts else empty_boxes()
    oof_path = write_boxes(all_oof, run_dir / OOF_FILE)
    trained = [int(f) for f in summaries]
    held_all = folds.loc[folds["fold"].isin(trained), "NAME"]
    overall = box_scores(all_oof, table.loc[table["NAME"].isin(held_all)], variants)
    metrics = {"model": model_id(det), "folds": trained, "oof_known_count_giou": overall, "per_fold": summaries}
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    return {"folds": trained, "oof_boxes": str(oof_path), "oof_known_count_giou": overall}
