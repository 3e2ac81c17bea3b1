"""The single-stage baseline -- the 3rd place's approach: ONE ultralytics YOLO that finds *and* classifies the cells
(23 classes in its head), against which the two-stage pipeline (single-class detector + classifiers) is measured.

- Data: the same validated annotations and the same folds as the two-stage stages (``DATA/folds.csv``); the model
  trains on every fold but ``fold`` and selects its checkpoint on ``fold``. The ultralytics dataset is the detector
  stage's (:func:`cytologia.detection.ultralytics_backend.write_yolo_dataset`, here with ``class_names=CLASSES``), and
  so is the offline handling (stand-in fonts, the AMP check without a download, NMS without its time limit).
- Budget: ``epochs``, or a time limit ``time_min`` (ultralytics' ``time`` argument: it re-plans the number of
  epochs, and the learning-rate schedule with it, after each epoch, and stops when the time is spent), counted on
  ``clock``: ``wall`` time, or ``cpu``, the process CPU time (:mod:`cytologia.clock`), which another job on the same
  cores does not change -- the pipeline matches the two-stage training's CPU time with it.
- Checkpoint selection: each epoch the validator scores the held-out fold with the challenge score itself (known-count
  boxes with their classes, :func:`cytologia.metrics.score`) and ultralytics keeps the best epoch as ``best.pt``.
- Prediction (known-count, as the two-stage path): class-agnostic NMS where each box keeps its best class; per image
  the top-N boxes by score, N from ``test.csv``; missing boxes are padded by :func:`cytologia.detection.fusion.
  known_count` (same pads as the two-stage path) with the most frequent training class. The submission is validated
  by :func:`cytologia.data.io.write_submission` and scored when the truth (``test_labels.csv``) is there.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from copy import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cytologia.clock import CLOCKS, cpu_seconds, module_clock
from cytologia.data.schema import BOX_COLUMNS, CLASSES, SUBMISSION_COLUMNS
from cytologia.detection.base import MAX_STRIDE
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "single_stage.pt"
SUBMISSION_FILE = "submission.csv"
SCORE_FILE = "score.json"
METRICS_FILE = "metrics.json"
BOXES_FILE = "boxes.csv"
FOLDS_FILE = "folds.csv"
MODEL_TAG = "single_stage"  # ``model`` value of the boxes handed to the known-count rule
SCORE_METRIC = "metrics/cytologia_score"  # keys of the selection metric (and its parts) in ultralytics' results
GIOU_METRIC = "metrics/cytologia_giou"
F1_METRIC = "metrics/cytologia_f1"


@dataclass
class SingleStageSettings:
    """What the single-stage model trains and predicts with. ``time_min`` (minutes of training, validation
    included) replaces ``epochs`` as the budget when set; ``extra`` goes to ultralytics' trainer as it is."""

    model: str = "yolo11n"
    img_size: int = 384  # the 3rd place's input size
    epochs: int = 30
    time_min: float | None = None
    clock: str = "wall"  # what time_min counts: wall (elapsed) or cpu (process CPU seconds, see cytologia.clock)
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "AdamW"  # ultralytics' "auto" would ignore lr
    patience: int = 0  # epochs without a better score before stopping; 0 = never stop early
    device: str = "auto"
    workers: int = 2  # data-loading processes
    amp: bool = True  # mixed precision on CUDA only (offline check, see ultralytics_backend)
    seed: int = 42
    conf: float = 0.001  # score floor: known-count keeps the top-N whatever their score
    nms_iou: float = 0.6
    max_det: int = 50
    predict_batch: int = 16
    weights: str | None = None  # init weights (a file checked against its folder's manifest); None = random init
    # cells have no up or down: vertical flips are as valid as the default horizontal ones (as the detector config)
    extra: dict[str, Any] = field(default_factory=lambda: {"flipud": 0.5})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "single-stage settings") -> SingleStageSettings:
        """Settings from a config mapping (e.g. a Hydra group); an unknown key is an error naming the valid ones."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise CytologiaInputError(
                f"{source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        return cls(**{k: (dict(v) if k == "extra" else v) for k, v in values.items()})

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise CytologiaInputError(f"single-stage setting {key}={getattr(self, key)!r} {what}")

        need(
            self.img_size >= MAX_STRIDE and self.img_size % MAX_STRIDE == 0,
            "img_size",
            f"must be a multiple of {MAX_STRIDE}",
        )
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.time_min is None or self.time_min > 0, "time_min", "must be > 0 (or None)")
        need(self.clock in CLOCKS, "clock", f"must be one of {', '.join(CLOCKS)}")
        for key in ("batch_size", "max_det", "predict_batch"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.patience >= 0 and self.workers >= 0, "patience", "and workers must be >= 0")
        need(self.lr > 0, "lr", "must be > 0")
        need(0.0 <= self.conf < 1.0, "conf", "must be in [0, 1)")
        need(0.0 < self.nms_iou <= 1.0, "nms_iou", "must be in (0, 1]")


# keys of the config group pipeline.single_stage that are not settings: whether it runs, and how the pipeline sets
# the budget (time_min itself is passed in, see settings_from_config)
NOT_SETTINGS: tuple[str, ...] = ("enabled", "match_budget")


def settings_from_config(
    record: Mapping[str, Any], *, time_min: float | None, clock: str, **given: Any
) -> SingleStageSettings:
    """The config group ``pipeline.single_stage`` as :class:`SingleStageSettings`, field by name
    (:func:`cytologia.config.settings_from`; ``train_args`` -> ``extra``). ``time_min`` and ``clock`` are the run's:
    the budget (the group's ``time_min``, or the two-stage training time with ``match_budget``) and the clock that
    ``auto`` resolved to; ``given`` sets further fields (e.g. ``workers``, ``seed``). A key of the group that is
    neither a setting nor in :data:`NOT_SETTINGS` is an error."""
    from cytologia.config import settings_from
    from cytologia.weights_catalog import RANDOM

    if "weights" not in given and record.get("weights") == RANDOM:  # random init asked for explicitly: no file
        given["weights"] = None
    return settings_from(
        SingleStageSettings,
        record,
        rename={"train_args": "extra"},
        skip=NOT_SETTINGS,
        source="pipeline.single_stage",
        time_min=time_min,
        clock=clock,
        **given,
    )


@dataclass
class SingleStageTrainResult:
    """What training left: the selected weights and how they were chosen."""

    weights: Path
    best_epoch: int  # 1-based
    epochs_run: int
    best_score: float  # the held-out fold's challenge score at the selected epoch (NaN without validation boxes)
    history: list[dict[str, float]]
    seconds: float  # the whole call: dataset, epochs with their validation, final evaluation
    cpu_seconds: float  # the same span in process CPU time
    epoch_seconds: list[float]  # the training pass of each epoch (no validation)
    n_train_images: int
    n_val_images: int


# ---------------------------------------------------------------------------------------------- known count
def prior_class(table: pd.DataFrame) -> str:
    """The most frequent class of an annotations table (ties: the first in :data:`CLASSES` order): the class of a pad
    box, which has no detection to take a class from."""
    counts = table["class"].astype(str).value_counts()
    if counts.empty:
        raise CytologiaInputError("no annotated box to take a prior class from")
    top = counts[counts == counts.max()].index
    return next((c for c in CLASSES if c in top), str(top[0]))


def known_count_submission(
    boxes: pd.DataFrame,
    test: pd.DataFrame,
    image_sizes: pd.DataFrame | Mapping[str, tuple[int, int]],
    pad_class: str,
    class_names: Sequence[str] = CLASSES,
) -> pd.DataFrame:
    """A submission (one row per ``test`` row, in its order) from class-carrying boxes under the known-count rule.

    ``boxes``: ``NAME, x1, y1, x2, y2, score, cls`` (``cls`` an index into ``class_names``). Per image, the top-N
    boxes by score (N = its rows in ``test``), padded by :func:`cytologia.detection.fusion.known_count` when fewer were
    found; a pad gets ``pad_class``. Which kept box takes which ``trustii_id`` of its image does not matter to the
    score (each truth box takes the best-GIoU prediction of its image); here the highest score takes the first id.
    """
    from cytologia.detection.fusion import known_count

    if pad_class not in class_names:
        raise CytologiaInputError(f"pad class {pad_class!r} is not one of {', '.join(class_names)}")
    missing = [c for c in ("NAME", *BOX_COLUMNS, "score", "cls") if c not in boxes.columns]
    if missing:
        raise CytologiaInputError(f"boxes table lacks column(s) {', '.join(missing)}")
    cls = boxes["cls"].to_numpy(np.int64)
    if len(cls) and (cls.min() < 0 or cls.max() >= len(class_names)):
        raise CytologiaInputError(f"class index outside 0..{len(class_names) - 1} in the boxes table")
    table = boxes[["NAME", *BOX_COLUMNS, "score"]].copy()
    table["model"] = MODEL_TAG
    # known_count keeps only its own columns but carries ``fold`` through (pads get -1): the row index rides there,
    # so each kept box finds its class again.
    table["fold"] = np.arange(len(table), dtype=np.int64)
    test = test[["trustii_id", "NAME"]].copy()
    test["NAME"] = test["NAME"].astype(str)
    counts = test.groupby("NAME", sort=False).size()
    kept = known_count(table, counts, image_sizes, source="single-stage boxes")
    row = kept["fold"].to_numpy(np.int64)
    names = np.asarray(class_names, dtype=object)
    kept["class"] = np.where(row >= 0, names[cls[np.maximum(row, 0)]] if len(cls) else pad_class, pad_class)
    kept["rank"] = kept.groupby("NAME", sort=False).cumcount()
    test["rank"] = test.groupby("NAME", sort=False).cumcount()
    out = test.merge(kept[["NAME", "rank", *BOX_COLUMNS, "class"]], on=["NAME", "rank"], how="left", validate="1:1")
    if out["class"].isna().any():  # known_count returns exactly N rows per image: this would be a bug there
        raise CytologiaInputError("known-count selection left test rows without a box")
    return out[list(SUBMISSION_COLUMNS)]


# ------------------------------------------------------------------------------------ training: the selection
def _trainer_class(pad_class: str) -> type:
    """ultralytics trainer whose validator selects checkpoints on the challenge score, padding with ``pad_class``
    (built lazily: importing this module does not import ultralytics)."""
    from ultralytics.utils.nms import non_max_suppression

    from cytologia.detection.ultralytics_backend import KnownCountTrainer, KnownCountValidator, gather_on_rank0
    from cytologia.metrics import score

    class ScoreValidator(KnownCountValidator):
        """The detector's known-count validator, plus the classes: the held-out fold is scored with the challenge
        score (known-count boxes with their classes) and that is the ``fitness`` ultralytics selects on."""

        def init_metrics(self, model: torch.nn.Module) -> None:
            super().init_metrics(model)
            self._classes: list[tuple[np.ndarray, np.ndarray]] = []

        def postprocess(self, preds: torch.Tensor) -> list[dict[str, torch.Tensor]]:
            """NMS as prediction runs it: class-agnostic, one best class per box, no time limit."""
            outputs = non_max_suppression(
                preds,
                self.args.conf,
                self.args.iou,
                nc=0,
                multi_label=False,
                agnostic=True,
                max_det=self.args.max_det,
                max_time_img=float("inf"),
            )
            return [{"bboxes": x[:, :4], "conf": x[:, 4], "cls": x[:, 5], "extra": x[:, 6:]} for x in outputs]

        def update_metrics(self, preds: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> None:
            super().update_metrics(preds, batch)  # appends (file, truth boxes, boxes, size) per image to self._kc
            for si, pred in enumerate(preds):
                truth_cls = self._prepare_batch(si, batch)["cls"]
                self._classes.append(
                    (truth_cls.detach().cpu().numpy().astype(np.int64), pred["cls"].detach().cpu().numpy())
                )

        def gather_stats(self) -> None:
            super().gather_stats()
            self._classes = gather_on_rank0(self._classes)

        def challenge_score(self) -> Any:
            """The :class:`~cytologia.metrics.ScoreResult` of the images seen since :meth:`init_metrics` (None
            without truth boxes)."""
            truth_rows, box_rows, sizes = [], [], {}
            for (path, truth, det, size), (t_cls, d_cls) in zip(self._kc, self._classes):
                name = Path(path).name
                sizes[name] = size
                truth_rows += [(name, *t, CLASSES[int(c)]) for t, c in zip(truth.tolist(), t_cls.tolist())]
                box_rows += [(name, *d, int(c)) for d, c in zip(det.tolist(), d_cls.tolist())]
            if not truth_rows:
                return None
            truth_table = pd.DataFrame(truth_rows, columns=["NAME", *BOX_COLUMNS, "class"])
            truth_table.insert(0, "trustii_id", np.arange(len(truth_table)))
            boxes = pd.DataFrame(box_rows, columns=["NAME", *BOX_COLUMNS, "score", "cls"])
            pred = known_count_submission(boxes, truth_table, sizes, pad_class)
            return score(truth_table, pred)

        def get_stats(self) -> dict[str, Any]:
            stats = super().get_stats()
            result = self.challenge_score()
            if result is not None:
                stats[SCORE_METRIC], stats[GIOU_METRIC], stats[F1_METRIC] = result.score, result.giou, result.f1
                stats["fitness"] = result.score
            return stats

    class ScoreTrainer(KnownCountTrainer):
        def get_validator(self) -> ScoreValidator:
            return ScoreValidator(
                self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks
            )

    return ScoreTrainer


# ------------------------------------------------------------------------------------------------ training
def train_single_stage(
    table: pd.DataFrame,
    folds: pd.DataFrame,
    image_dir: str | Path,
    out_dir: str | Path,
    settings: SingleStageSettings,
    *,
    fold: int = 0,
    cache_dir: str | Path | None = None,
    repaired_dir: str | Path | None = None,
) -> SingleStageTrainResult:
    """Train the 23-class YOLO on every fold but ``fold`` (``table``: annotations with ``class``; ``folds``:
    ``NAME,fold``) and select its checkpoint on ``fold``; the selected weights are copied to
    ``out_dir/single_stage.pt``, ultralytics' own run folder is ``out_dir/ultralytics``."""
    from cytologia.detection.registry import DetectionData, require_optional

    require_optional("ultralytics")  # the baseline IS an ultralytics YOLO: say how to install it when absent
    from cytologia.detection.ultralytics_backend import (
        UltralyticsDetector,
        _amp_check_offline,
        best_of_run,
        epoch_timer,
        keep_torch_threads,
        train_args,
        write_yolo_dataset,
    )

    start, cpu_start = time.perf_counter(), cpu_seconds()
    out_dir = Path(out_dir)
    owned = sorted(
        {"data", "project", "name", "exist_ok", "single_cls", "model", "task", "mode", "resume", "time"}
        & set(settings.extra)
    )
    if owned:
        raise CytologiaInputError(f"single-stage extra arguments may not set {', '.join(owned)} (set here)")
    cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    data = DetectionData(
        table=table,
        folds=folds,
        image_dir=Path(image_dir),
        fold=int(fold),
        cache_dir=cache,
        repaired_dir=Path(repaired_dir) if repaired_dir is not None else None,
    )
    data_yaml, counts = write_yolo_dataset(data, class_names=CLASSES)
    trained_on = table["NAME"].isin(folds.loc[folds["fold"] != fold, "NAME"])
    pad_class = prior_class(table[trained_on] if trained_on.any() else table)
    if counts["val_boxes"] == 0:
        log.warning("held-out fold %d has no box: the checkpoint is the last epoch's", fold)
    detector = UltralyticsDetector(settings.model, weights=settings.weights)
    if settings.model not in detector.models():
        raise CytologiaInputError(f"unknown YOLO model {settings.model!r}; available: {', '.join(detector.models())}")
    yolo = detector._new_model()  # architecture yaml (+ checked local weights); the head is built for 23 classes
    # conf: the validator's score floor, so that the checkpoint is selected as prediction will run
    args = train_args(settings, data_yaml, out_dir, single_cls=False, conf=settings.conf)
    if settings.time_min is not None:
        args["time"] = settings.time_min / 60.0  # ultralytics counts hours; it then overrides epochs
    epoch_seconds = epoch_timer(yolo)
    if settings.clock == "cpu" and settings.time_min is not None and int(args["workers"]) > 0:
        log.warning(
            "cpu clock with %s data-loading workers: their CPU time counts only when they exit (each "
            "epoch); workers=0 makes the budget exact",
            args["workers"],
        )
    import ultralytics.engine.trainer as ul_trainer

    # ultralytics plans its `time` budget with time.time() in its trainer module: on the cpu clock that reads
    # process CPU seconds, so re-planned epochs, schedule and stop all follow the compute spent, not the wall time
    with _amp_check_offline(), keep_torch_threads(yolo, int(args["workers"])), module_clock(ul_trainer, settings.clock):
        yolo.train(trainer=_trainer_class(pad_class), **args)
    run = best_of_run(Path(yolo.trainer.save_dir), SCORE_METRIC)
    target = out_dir / WEIGHTS_FILE
    shutil.copyfile(run.checkpoint, target)
    return SingleStageTrainResult(
        weights=target,
        best_epoch=run.epoch,
        epochs_run=len(run.history),
        best_score=run.score,
        history=run.history,
        seconds=time.perf_counter() - start,
        cpu_seconds=cpu_seconds() - cpu_start,
        epoch_seconds=epoch_seconds,
        n_train_images=counts["train_images"],
        n_val_images=counts["val_images"],
    )


# ---------------------------------------------------------------------------------------------- prediction
def predict_boxes(
    checkpoint: str | Path,
    image_paths: Sequence[str | Path],
    names: Sequence[str] | None = None,
    *,
    img_size: int,
    conf: float = 0.001,
    iou: float = 0.6,
    max_det: int = 50,
    batch_size: int = 16,
    device: str = "auto",
) -> pd.DataFrame:
    """Boxes with their class (``NAME, x1, y1, x2, y2, score, cls``) of a single-stage checkpoint, in each image's
    own pixels: class-agnostic NMS, each box with its best class. The checkpoint must name the 23 classes."""
    from cytologia.detection.registry import load_detector
    from cytologia.detection.ultralytics_backend import detect_with_classes

    detector = load_detector(checkpoint)
    net = detector.network(device)
    names_of = getattr(net, "names", {})
    found = tuple(str(names_of[i]) for i in sorted(names_of)) if isinstance(names_of, dict) else tuple(names_of)
    if found != CLASSES:
        raise CytologiaInputError(f"{checkpoint}: not a single-stage checkpoint of the 23 classes (names {found})")
    table = detect_with_classes(
        detector.forward_fn(device),
        image_paths,
        names,
        img_size=img_size,
        conf=conf,
        iou=iou,
        max_det=max_det,
        batch_size=batch_size,
    )
    return table.drop(columns="tta")


def predict_submission(
    checkpoint: str | Path,
    test: pd.DataFrame,
    image_dir: str | Path,
    settings: SingleStageSettings,
    pad_class: str,
) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Known-count submission of ``test`` (``trustii_id,NAME``) from a single-stage checkpoint; returns the
    submission, the raw boxes and the prediction wall time (s)."""
    image_dir = Path(image_dir)
    names = list(pd.unique(test["NAME"].astype(str)))
    start = time.perf_counter()
    boxes = predict_boxes(
        checkpoint,
        [image_dir / n for n in names],
        names,
        img_size=settings.img_size,
        conf=settings.conf,
        iou=settings.nms_iou,
        max_det=settings.max_det,
        batch_size=settings.predict_batch,
        device=settings.device,
    )
    seconds = time.perf_counter() - start
    return known_count_submission(boxes, test, _image_sizes(image_dir, names), pad_class), boxes, seconds


def _image_sizes(image_dir: Path, names: Sequence[str]) -> pd.DataFrame:
    """``NAME, img_w, img_h`` from the image headers; an unreadable image is an error naming it."""
    from cytologia.data.images import image_sizes

    wh, errors = image_sizes([image_dir / n for n in names])
    bad = [f"{n}: {e}" for n, e in zip(names, errors) if e is not None]
    if bad:
        raise CytologiaInputError(f"{len(bad)} image(s) cannot be read: " + "; ".join(bad[:10]))
    return pd.DataFrame({"NAME": list(names), "img_w": wh[:, 0], "img_h": wh[:, 1]})


# -------------------------------------------------------------------------------------------- the whole run
def run_single_stage(
    data_dir: str | Path,
    out_dir: str | Path,
    settings: SingleStageSettings,
    *,
    fold: int = 0,
    folds: pd.DataFrame | None = None,
    folds_k: int = 4,
    cache_dir: str | Path | None = None,
    lenient: bool = True,
) -> dict[str, Any]:
    """Train on ``data_dir`` (``train.csv``, ``test.csv``, ``images/``), predict its test set, write the
    submission, and score it when ``test_labels.csv`` is there.

    Folds: ``folds`` when given, else ``data_dir/folds.csv`` (the two-stage stages' folds), else made there with the
    default fold settings and ``folds_k``. Writes into ``out_dir``: ``single_stage.pt``, ``submission.csv``,
    ``boxes.csv`` (raw boxes with classes), ``folds.csv``, ``metrics.json`` (settings, budget, history, times) and
    ``score.json``. Returns the metrics dict (with ``score`` when scored).
    """
    from omegaconf import OmegaConf

    from cytologia.data.io import read_annotations, read_test, write_csv, write_submission
    from cytologia.data.prepare import ensure_folds

    t0 = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    image_dir = data_dir / "images"
    for need in (data_dir / "train.csv", data_dir / "test.csv", image_dir):
        if not need.exists():
            raise CytologiaInputError(f"{need}: no such file or folder (the single-stage baseline needs it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    table, report = read_annotations(data_dir / "train.csv", image_dir, lenient=lenient)
    log.info("%s", report.summary())
    if table.empty:
        raise CytologiaInputError(f"{data_dir / 'train.csv'}: no usable box left after validation")
    if folds is None:
        # `cytologia folds`' defaults (configs/folds/stratified.yaml) with folds_k folds
        cfg = OmegaConf.create({"folds": {"k": folds_k, "mode": "stratified", "seed": 42, "near_threshold": 4}})
        folds = ensure_folds(cfg, table, data_dir)  # reads data_dir/folds.csv when it exists
    folds = folds[["NAME", "fold"]]
    write_csv(folds, out_dir / FOLDS_FILE)
    test = read_test(data_dir / "test.csv", image_dir)
    pad_class = prior_class(table)
    times: dict[str, float] = {"prepare": time.perf_counter() - t0}

    result = train_single_stage(table, folds, image_dir, out_dir, settings, fold=fold, cache_dir=cache_dir)
    times["train"] = result.seconds
    sub, boxes, times["predict"] = predict_submission(result.weights, test, image_dir, settings, pad_class)
    names = list(pd.unique(test["NAME"].astype(str)))
    write_submission(sub, out_dir / SUBMISSION_FILE, test=test, image_sizes=_image_sizes(image_dir, names))
    write_csv(boxes, out_dir / BOXES_FILE)
    n_test_images = len(names)
    metrics: dict[str, Any] = {
        "approach": "single-stage: one YOLO with the 23 classes (box and class in one model), known-count top-N",
        "settings": asdict(settings),
        "budget": {
            "epochs": settings.epochs,
            "time_min": settings.time_min,
            "clock": settings.clock,
            "device": settings.device,
        },
        "train_cpu_seconds": result.cpu_seconds,
        "fold": int(fold),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "val_score_at_best": result.best_score,
        "n_train_images": result.n_train_images,
        "n_val_images": result.n_val_images,
        "n_test_images": n_test_images,
        "pad_class": pad_class,
        "n_pads": _count_pads(boxes, test),
        "times_s": times,
        "predict_ms_per_image": 1000.0 * times["predict"] / max(n_test_images, 1),
        "epoch_train_seconds": result.epoch_seconds,
        "history": result.history,
    }
    labels = data_dir / "test_labels.csv"
    if labels.is_file():
        from cytologia.metrics import read_predictions, read_truth, score

        scored = score(read_truth(labels), read_predictions(out_dir / SUBMISSION_FILE))
        (out_dir / SCORE_FILE).write_text(json.dumps(scored.as_dict(), indent=1) + "\n")
        metrics.update(score=scored.score, giou=scored.giou, f1=scored.f1)
    else:
        log.warning("%s: no such file; the submission is not scored", labels)
    times["total"] = time.perf_counter() - t0
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    return metrics


def _count_pads(boxes: pd.DataFrame, test: pd.DataFrame) -> int:
    """Rows of the known-count submission that are pads: expected boxes beyond those found, per image."""
    need = test.groupby(test["NAME"].astype(str)).size()
    found = boxes.groupby("NAME").size().reindex(need.index, fill_value=0)
    return int((need - found).clip(lower=0).sum())


def summary_lines(metrics: Mapping[str, Any], out_dir: str | Path) -> list[str]:
    """What ``cytologia single-stage`` prints about a run: model, budget, epochs, times, the submission written to
    ``out_dir`` and, when scored, the score (a line, then the same as JSON). ``metrics``: :func:`run_single_stage`'s
    result."""
    s, times = metrics["settings"], metrics["times_s"]
    budget = f"{s['time_min']:g} {s['clock']} min" if s["time_min"] is not None else f"{s['epochs']} epochs"
    lines = [
        f"single-stage {s['model']} @ {s['img_size']} px, budget {budget}: {metrics['epochs_run']} epochs, "
        f"best {metrics['best_epoch']}; train {times['train']:.0f} s, predict {metrics['predict_ms_per_image']:.1f} "
        f"ms/image; wrote {Path(out_dir) / SUBMISSION_FILE}"
    ]
    if "score" in metrics:
        lines.append(f"score {metrics['score']:.4f} (giou {metrics['giou']:.4f}, f1 {metrics['f1']:.4f})")
        lines.append(json.dumps({k: metrics[k] for k in ("score", "giou", "f1")}))
    return lines
