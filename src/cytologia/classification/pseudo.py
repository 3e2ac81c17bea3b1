"""Pseudo-labelling as an explicit, leak-aware step (the pipeline's ``pseudo_label`` step).

Confident test-set predictions join the classifiers' training: score = detector box score x the blended probability
of the predicted class, kept above a threshold chosen on the out-of-fold predictions of the training set
(:func:`choose_threshold`: the lowest score at which the OOF predictions above it are right at least
``precision`` of the time).

Where the leak is, and how this step avoids it
----------------------------------------------
A fold's CV estimates how its model does on images it never learnt from. The 1st place labelled the test set with
its full ensemble -- models trained on *every* fold -- and added those labels to every fold's training. The fold-``k``
model then learns from predictions of models that were fit to fold ``k``'s validation labels: what they learnt there
(near-duplicate cells, an acquisition source's stain) comes back through the test crops, and fold ``k``'s CV rises
without the model being better on unseen data. Here:

1. **per-fold teachers** -- the pseudo-labels fold ``k`` trains on are predicted by the fold-``k`` models only (the
   fold-``k`` detector and the fold-``k`` model of every member, blended with the ensemble's weights:
   :func:`fold_ensemble`); those models trained on every fold but ``k``, i.e. on exactly the images fold ``k``'s
   student may learn from anyway. (A fold's own model could not label it: it is the model being trained.)
2. **never a validation image** -- a pseudo-labelled crop on one of fold ``k``'s validation images is refused
   (:func:`cytologia.classification.distill.check_not_validation`); test images never are, the check guards a
   misuse (unlabelled training images passed as "test").
3. the full ensemble's labels (``teacher_fold = -1``, what the 1st place did) only when asked for (``allow_leak``:
   the benchmark's "with the leak" arm, to measure the optimism it gives the CV); every fold then trains on them.

The threshold is chosen on OOF predictions, so it saw every training label; it is one number picked on precision, not
on the CV it is judged by. Rounds: round ``r``'s teacher is round ``r - 1``'s retrained ensemble (re-tuned on its
new OOF logits). ``stage2``: each fold's model starts from the previous round's checkpoint of the same fold (the 1st
place's stage-2 fine-tuning) instead of from scratch -- that checkpoint never saw the fold's validation images either.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from cytologia.classification.distill import TEACHER_FOLD, TeacherLeakError, absolute_detector, check_not_validation
from cytologia.classification.module import ClassifierModule, load_checkpoint
from cytologia.classification.stage import CropItems
from cytologia.data.schema import BOX_COLUMNS, CLASSES
from cytologia.ensemble import Ensemble
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

PSEUDO_BOX_ID_START = 10_000_000  # box ids of pseudo-labelled crops: above any row number of a train.csv
PSEUDO_FILE = "pseudo_labels.csv"


# ------------------------------------------------------------------------------------------------ teachers
def fold_ensemble(ensemble: Ensemble, fold: int) -> Ensemble:
    """The fold-``fold`` models of ``ensemble``: each member's and the detector's ``fold``-th checkpoint / ONNX file
    (the files are listed fold by fold, as ``cytologia tune`` writes them). Every list must hold one per fold."""

    def pick(paths: list[str], what: str) -> list[str]:
        if not paths:
            return []
        if fold >= len(paths):
            raise CytologiaInputError(f"{what}: {len(paths)} file(s), no fold {fold} (one file per fold is needed)")
        chosen = paths[fold]
        if f"fold_{fold}" not in chosen and any(f"fold_{k}" in p for k, p in enumerate(paths)):
            raise CytologiaInputError(f"{what}: file {fold} is {chosen}, not a fold_{fold} model")
        return [str(ensemble.resolve(chosen))]

    members = [
        replace(m, checkpoints=pick(m.checkpoints, m.name), onnx=pick(m.onnx, f"{m.name} onnx"))
        for m in ensemble.members
    ]
    det = ensemble.detector
    if det is not None:
        det = replace(det, checkpoints=pick(det.checkpoints, "detector"), onnx=pick(det.onnx, "detector onnx"))
    return Ensemble(members, ensemble.blend, det, dict(ensemble.tuning), base_dir=ensemble.base_dir)


def teacher_predictions(
    data: str | Path, ensemble: Ensemble, folds: Sequence[int], *, full: bool = False, runtime: str = "onnx"
) -> pd.DataFrame:
    """The known-count predictions of the test folder ``data`` by the fold-``k`` models of ``ensemble`` for each
    ``k`` of ``folds`` (``teacher_fold = k``) and, with ``full``, by the whole ensemble (``teacher_fold = -1``):
    ``NAME, x1..y2, score, class, p_<class>..., teacher_fold``."""
    from cytologia.predict import predict_folder

    parts = []
    for k in [*folds, *([-1] if full else [])]:
        ens = ensemble if k < 0 else fold_ensemble(ensemble, k)
        boxes = predict_folder(data, ens, None, runtime=runtime).boxes.copy()
        boxes[TEACHER_FOLD] = k
        parts.append(boxes)
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------------------------------ threshold
def oof_confidence(targets: pd.DataFrame, truth: pd.DataFrame, detections: pd.DataFrame) -> pd.DataFrame:
    """Per training box of ``targets`` (:func:`cytologia.classification.distill.teacher_targets`): its OOF
    ``confidence`` (the OOF detector score of the detected box that overlaps it most, 0 below IoU 0.5, times the
    blended probability of the predicted class) and whether that class is ``correct``. ``truth``: ``NAME, box_id,
    x1..y2, class``; ``detections``: the detector's out-of-fold boxes (``NAME, x1..y2, score``)."""
    from cytologia.boxes import pairwise_iou
    from cytologia.classification.distill import TEACHER_COLUMNS

    t = targets.merge(truth[["NAME", "box_id", *BOX_COLUMNS, "class"]], on=["NAME", "box_id"], how="inner")
    if len(t) < len(targets):
        raise CytologiaInputError(f"{len(targets) - len(t)} teacher row(s) have no truth box (NAME, box_id)")
    logp = t[list(TEACHER_COLUMNS)].to_numpy(np.float64)
    pred = logp.argmax(axis=1)
    p_max = np.exp(logp.max(axis=1))
    det_score = np.zeros(len(t))
    if "model" in detections.columns:  # the plain pass only (a flip-TTA view repeats the same boxes)
        from cytologia.oof_names import is_flip_model

        detections = detections[[not is_flip_model(str(m)) for m in detections["model"]]]
    by_image = {name: part for name, part in detections.groupby("NAME")}
    for name, rows in t.groupby("NAME").groups.items():
        found = by_image.get(name)
        if found is None:
            continue
        overlap = pairwise_iou(t.loc[rows, list(BOX_COLUMNS)].to_numpy(np.float64), found[list(BOX_COLUMNS)].to_numpy())
        best = overlap.argmax(axis=1)
        ok = overlap.max(axis=1) >= 0.5  # a box the detector did not find (IoU < 0.5) would not be a pseudo-label
        det_score[t.index.get_indexer(rows)] = np.where(ok, found["score"].to_numpy(np.float64)[best], 0.0)
    classes = np.asarray(CLASSES, dtype=object)
    return pd.DataFrame(
        {
            "NAME": t["NAME"].to_numpy(),
            "class": t["class"].to_numpy(),
            "predicted": classes[pred],
            "confidence": det_score * p_max,
            "correct": classes[pred] == t["class"].to_numpy(dtype=object),
        }
    )


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, precision: float, min_count: int = 10) -> float:
    """The lowest confidence ``c`` such that the predictions with confidence >= ``c`` are right at least
    ``precision`` of the time (over at least ``min_count`` of them); ``inf`` (nothing kept) when none reaches it."""
    if not 0.0 < precision <= 1.0:
        raise CytologiaInputError(f"pseudo-label precision={precision}: must be in (0, 1]")
    order = np.argsort(-np.asarray(confidence, np.float64), kind="mergesort")
    c = np.asarray(confidence, np.float64)[order]
    hits = np.cumsum(np.asarray(correct, bool)[order])
    n = np.arange(1, len(c) + 1)
    ok = (hits / n >= precision) & (n >= min_count)
    last = np.r_[c[1:] != c[:-1], True]  # a threshold keeps every tie: only the last row of a tie group counts
    ok &= last
    return float(c[np.flatnonzero(ok)[-1]]) if ok.any() else float("inf")


def select_pseudo_labels(predictions: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The predictions whose confidence (box score x probability of the predicted class) is >= ``threshold``, as
    crops to train on: ``NAME, box_id, x1..y2, class, confidence, teacher_fold``."""
    from cytologia.runtime.inference import PROB_COLUMNS

    p_max = predictions[list(PROB_COLUMNS)].to_numpy(np.float64).max(axis=1)
    conf = predictions["score"].to_numpy(np.float64) * p_max
    kept = predictions[conf >= threshold].copy()
    kept["confidence"] = conf[conf >= threshold]
    kept = kept[["NAME", *BOX_COLUMNS, "class", "confidence", TEACHER_FOLD]].reset_index(drop=True)
    kept.insert(1, "box_id", PSEUDO_BOX_ID_START + np.arange(len(kept), dtype=np.int64))
    return kept


def count_table(pseudo: pd.DataFrame) -> pd.DataFrame:
    """Pseudo-labels per class (rows) and teacher fold (columns), every class listed."""
    counts = pd.crosstab(pseudo["class"], pseudo[TEACHER_FOLD]).reindex(list(CLASSES), fill_value=0)
    counts.columns = [f"fold_{c}" if c >= 0 else "full" for c in counts.columns]
    return counts


# ------------------------------------------------------------------------------------------------ items
@dataclass
class PseudoLabelItems(CropItems):
    """Crop items plus pseudo-labelled crops: fold ``k`` trains on the rows with ``teacher_fold == k`` -- or, only
    with ``allow_leak``, on the full ensemble's rows (``teacher_fold == -1``); none may lie on a validation image of
    the fold. ``init_from``: fold -> checkpoint whose weights the fold's model starts from (stage-2 fine-tuning)."""

    pseudo: pd.DataFrame = field(default_factory=pd.DataFrame)
    allow_leak: bool = False
    init_from: dict[int, Path] = field(default_factory=dict)

    def split(self, fold: int, label_names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        train, val = super().split(fold, label_names)
        if self.pseudo.empty:
            return train, val
        teacher = self.pseudo[TEACHER_FOLD].to_numpy(np.int64)
        if (teacher == -1).any() and not self.allow_leak:
            raise TeacherLeakError(
                f"fold {fold}: {int((teacher == -1).sum())} pseudo-label(s) come from the full ensemble, whose models "
                f"trained on fold {fold}'s validation images; use per-fold teachers (or allow_leak to measure the leak)"
            )
        mine = self.pseudo[teacher == (-1 if self.allow_leak else fold)]
        check_not_validation(mine, val, fold, "pseudo-labelled crop(s)")
        mine = mine.assign(fold=-1).reset_index(drop=True)  # fold -1: never held out
        log.info("fold %d: %d pseudo-labelled crop(s) added to training", fold, len(mine))
        return pd.concat([train, mine[[c for c in train.columns if c in mine.columns]]], ignore_index=True), val

    def module(self, cfg: DictConfig, label_names: list[str], augment: dict[str, Any], fold: int) -> ClassifierModule:
        from cytologia.classification.stage import classifier_module

        module = classifier_module(cfg, label_names, augment)
        start = self.init_from.get(fold)
        if start is not None:
            module.load_state_dict(load_checkpoint(start)["state_dict"])
            log.info("stage 2: the model starts from %s", start)
        return module


# ------------------------------------------------------------------------------------------------ the step
@dataclass
class PseudoLabelSettings:
    """``pseudo_label`` config group: rounds, target precision, the leak switch, stage-2 fine-tuning."""

    rounds: int = 1
    precision: float = 0.9  # OOF precision the threshold must reach
    min_count: int = 10  # OOF predictions the precision is measured over, at least
    allow_leak: bool = False  # the full ensemble labels every fold (the 1st place's leak; the benchmark measures it)
    stage2: bool = False  # start each fold from the previous round's checkpoint of the same fold
    runtime: str = "onnx"
    # a fixed confidence threshold instead of the one chosen on OOF (e.g. to give the full ensemble, whose blended
    # confidences run lower than one fold model's, as many pseudo-labels as the per-fold teachers got)
    threshold: float | None = None


def settings_from_config(cfg: DictConfig, **given: Any) -> PseudoLabelSettings:
    """:class:`PseudoLabelSettings` from the ``pseudo_label`` config group (by field name), plus ``given``."""
    from cytologia.config import settings_from

    return settings_from(PseudoLabelSettings, cfg.pseudo_label, source="config group pseudo_label", **given)


@dataclass
class PseudoLabelResult:
    """Per round: threshold, pseudo-labels per class and fold, CV before and after; the last round's ensemble."""

    rounds: list[dict[str, Any]]
    ensemble_path: Path
    lines: list[str] = field(default_factory=list)


def train_member(
    cfg: DictConfig, out: Path, pseudo: pd.DataFrame, *, allow_leak: bool, init_from: dict[int, Path] | None = None
) -> dict[str, object]:
    """Train one member (its run's config ``cfg``) on every fold with ``pseudo`` crops added; returns the stage's
    summary (OOF macro-F1 ...) and writes the run folder ``out`` as the classification stage does."""
    from cytologia.classification.stage import crop_boxes, summarize, train_fold
    from cytologia.data.prepare import ensure_data, ensure_folds, read_train
    from cytologia.data.schema import labels

    root = ensure_data(cfg)
    table = read_train(cfg, root)
    boxes = crop_boxes(cfg, table, ensure_folds(cfg, table, root))
    label_names = list(labels(bool(cfg.classifier.background)))
    absent = [n for n in pd.unique(pseudo["NAME"]) if not (root / "images" / str(n)).is_file()]
    if absent:
        raise CytologiaInputError(
            f"{len(absent)} pseudo-labelled image(s) are not in {root / 'images'} (e.g. {absent[0]}): the test images "
            "must sit in the training data folder's images/ (as in a Trustii data folder)"
        )
    items = PseudoLabelItems(boxes, pseudo=pseudo, allow_leak=allow_leak, init_from=dict(init_from or {}))
    results = []
    for k in range(int(cfg.folds.k)):
        r = train_fold(cfg, items, k, out / f"fold_{k}", root / "images", label_names)
        if r is not None:
            results.append(r)
    return summarize(cfg, out, boxes, results, label_names)


def pseudo_label(
    ensemble: str | Path | Ensemble,
    test_data: str | Path,
    out: str | Path,
    settings: PseudoLabelSettings,
    *,
    detections: str | Path,
    members: Sequence[str | Path] | None = None,
) -> PseudoLabelResult:
    """Rounds of leak-aware pseudo-labelling (module docstring): each round labels the test folder ``test_data``
    with per-fold teachers, keeps the confident boxes (threshold on OOF: ``detections`` = the detector's
    ``oof_boxes.csv``), retrains every member (``members``: their run folders, default those of the ensemble's
    checkpoints, each with its ``config.yaml``) into ``out/round_<r>/cls_<exp>``, and re-tunes the ensemble
    (``out/round_<r>/ensemble.json``, the teacher's detector). Writes ``out/pseudo_label_report.json``."""
    from cytologia.classification.distill import config_from_run, member_runs, teacher_targets
    from cytologia.classification.oof import read_oof
    from cytologia.data.io import read_annotations
    from cytologia.ensemble import read_ensemble, write_ensemble
    from cytologia.ensemble.runs import tune_ensemble

    if settings.rounds < 1:
        raise CytologiaInputError(f"pseudo_label.rounds={settings.rounds}: must be >= 1")
    out = Path(out)
    ens = ensemble if isinstance(ensemble, Ensemble) else read_ensemble(ensemble)
    runs = [Path(p) for p in members] if members is not None else member_runs(ens)
    det_oof = pd.read_csv(detections, dtype={"NAME": str})
    rounds: list[dict[str, Any]] = []
    lines: list[str] = []
    previous: dict[Path, Path] = {run: run for run in runs}  # member run of the previous round (stage 2 starts there)
    for r in range(1, settings.rounds + 1):
        cfgs = [config_from_run(previous[run] / "config.yaml") for run in runs]
        k = int(cfgs[0].folds.k)
        truth_path = Path(cfgs[0].data.root) / "train.csv"
        truth, _ = read_annotations(truth_path, lenient=True)
        tables = [read_oof(previous[run] / "oof_logits.csv") for run in runs]
        targets = teacher_targets(ens, tables, truth=truth)
        conf = oof_confidence(targets, truth, det_oof)
        threshold = settings.threshold
        if threshold is None:
            threshold = choose_threshold(conf["confidence"].to_numpy(), conf["correct"].to_numpy(), settings.precision)
        per_fold = [] if settings.allow_leak else list(range(k))
        preds = teacher_predictions(test_data, ens, per_fold, full=settings.allow_leak, runtime=settings.runtime)
        pseudo = select_pseudo_labels(preds, threshold)
        round_dir = out / f"round_{r}"
        round_dir.mkdir(parents=True, exist_ok=True)
        pseudo.to_csv(round_dir / PSEUDO_FILE, index=False)
        counts = count_table(pseudo)
        counts.to_csv(round_dir / "pseudo_label_counts.csv")
        before = {run.name: _oof_f1(previous[run]) for run in runs}
        new_runs = []
        for run, cfg in zip(runs, cfgs):
            init = {}
            if settings.stage2:
                init = {f: previous[run] / f"fold_{f}" / "checkpoints" / "last.ckpt" for f in range(k)}
            dest = round_dir / run.name
            summary = train_member(cfg, dest, pseudo, allow_leak=settings.allow_leak, init_from=init)
            OmegaConf.save(cfg, dest / "config.yaml")
            new_runs.append(dest)
            log.info("round %d: %s OOF macro-F1 %.4f -> %.4f", r, run.name, before[run.name], summary["oof_macro_f1"])
        tuned = tune_ensemble(new_runs, truth_path, round_dir / "ensemble.json")
        new_ens = tuned.ensemble
        new_ens.detector = absolute_detector(ens)  # the detector stays the teacher's
        write_ensemble(new_ens, round_dir / "ensemble.json")
        after = {run.name: _oof_f1(new) for run, new in zip(runs, new_runs)}
        record = {
            "round": r,
            "threshold": threshold,
            "oof_precision_target": settings.precision,
            "oof_kept_share": float((conf["confidence"] >= threshold).mean()),
            "allow_leak": settings.allow_leak,
            "stage2": settings.stage2,
            "n_pseudo_labels": {str(c): int(v) for c, v in counts.sum(axis=0).items()},
            "per_class": {c: {str(f): int(v) for f, v in row.items()} for c, row in counts.iterrows() if row.sum()},
            "cv_before": before,
            "cv_after": after,
            "ensemble_heldout_f1_before": (ens.tuning.get("heldout") or {}).get("ensemble_f1"),
            "ensemble_heldout_f1_after": (new_ens.tuning.get("heldout") or {}).get("ensemble_f1"),
        }
        rounds.append(record)
        lines.append(
            f"round {r}: threshold {threshold:.3f} (OOF precision >= {settings.precision}); pseudo-labels "
            + ", ".join(f"{f} {n}" for f, n in record["n_pseudo_labels"].items())
            + "; CV "
            + ", ".join(f"{m} {before[m]:.4f} -> {after[m]:.4f}" for m in before)
        )
        ens, previous = new_ens, dict(zip(runs, new_runs))
    (out / "pseudo_label_report.json").write_text(json.dumps({"rounds": rounds}, indent=1) + "\n")
    return PseudoLabelResult(rounds, out / f"round_{settings.rounds}" / "ensemble.json", lines)


def _oof_f1(run: Path) -> float:
    summary = run / "summary.json"
    return float(json.loads(summary.read_text())["oof_macro_f1"]) if summary.is_file() else float("nan")
