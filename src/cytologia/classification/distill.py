"""Distillation of the tuned ensemble into one compact student (``cytologia distill``, the pipeline's ``distill`` step).

The student is an ordinary crop classifier (any registered or timm backbone, e.g. ``resnet10t`` at 64 px for a CPU)
trained by the classification stage's own fold trainer; what differs is its target
(:class:`~cytologia.classification.losses.DistillationLoss`): ``kd_weight * T^2 * KL(teacher_T || student_T) +
(1 - kd_weight) * hard-label loss``. This module supplies the teacher's side:

- :func:`teacher_targets` -- for every training box, the ensemble's blended class probabilities computed from the
  members' **out-of-fold** logits (the ``oof_logits.csv`` of each member run): the row of a box in fold ``k`` was
  written by the fold-``k`` models, which never trained on fold ``k``. The blend is the ensemble file's rule
  (:func:`cytologia.ensemble.blend_probabilities`). Its weights are, by default (``weights="heldout"``), those the
  tuning's held-out check found *without* the box's fold (``tuning.heldout.per_fold``), so not even the two or three
  blend weights saw the box's label; ``weights="tuned"`` takes the file's weights (tuned on every fold).
- :func:`check_out_of_fold` -- the guard every student fold runs: a teacher row whose fold is not its image's fold
  would come from a model that trained on that image, and is refused.
- :class:`TeacherCropDataset`, :class:`DistillDataModule`, :class:`DistillItems` -- the teacher's log-probabilities
  travel with each crop (``teacher``) into the batch; the items strategy plugs them into
  :func:`cytologia.classification.stage.train_fold`, which trains, validates and writes OOF logits as for any member.
- optional unlabelled crops (``extra``, e.g. the detector's boxes on the test images) that carry only a teacher
  target; which teacher may label them for which fold is :mod:`cytologia.classification.pseudo`'s rule (fold ``k``
  only from fold-``k`` models).

Caveat of the student's own CV (``cv`` in :func:`distill`): the teacher's fold-``i`` model that labels a student
training box of fold ``i`` was trained on the student's validation fold ``j``; its soft targets carry a little of
fold ``j``'s labels into the student's training. The student's test-set score (``scripts/bench_distill.py``) has no
such path; the CV figure is reported as a check that training worked, not as the student's estimate.
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
import torch
from omegaconf import DictConfig, OmegaConf

from cytologia.classification.crops import CropDataset
from cytologia.classification.datamodule import CropDataModule
from cytologia.classification.module import ClassifierModule
from cytologia.classification.stage import CropItems, label_index
from cytologia.data.schema import CLASSES
from cytologia.ensemble import DetectorSpec, Ensemble, blend_probabilities, multilabel_probabilities
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

TEACHER_PREFIX = "t_"  # teacher log-probability columns of a targets table: t_0 .. t_22 (label order of CLASSES)
TEACHER_COLUMNS: tuple[str, ...] = tuple(f"{TEACHER_PREFIX}{i}" for i in range(len(CLASSES)))
TEACHER_FOLD = "teacher_fold"  # the fold whose models wrote a row (-1: every fold's models)
WEIGHT_MODES: tuple[str, ...] = ("heldout", "tuned")
TARGETS_FILE = "teacher_targets.csv"
SUMMARY_FILE = "distill_summary.json"
_EPS = 1e-12  # floor of a probability before its log (a blended probability of exactly 0 would give -inf)


class TeacherLeakError(CytologiaInputError):
    """A teacher target or pseudo-label would come from a model that trained on the image it is used for."""


# ------------------------------------------------------------------------------------------------ teacher targets
def _fold_weights(ensemble: Ensemble, mode: str) -> dict[int, np.ndarray]:
    """Cell-member weights per held-out fold (``heldout``), or ``{-1: the file's weights}`` (``tuned``)."""
    if mode not in WEIGHT_MODES:
        raise CytologiaInputError(f"teacher weights={mode!r} is not one of {', '.join(WEIGHT_MODES)}")
    tuned = ensemble.weights()
    if mode == "tuned" or len(ensemble.cell_members) == 1:
        return {-1: tuned}
    per_fold = (ensemble.tuning.get("heldout") or {}).get("per_fold") or []
    out = {}
    for row in per_fold:
        w = np.asarray(row.get("weights", []), dtype=np.float64)
        if len(w) == len(tuned) and w.sum() > 0:
            out[int(row["fold"])] = w / w.sum()
    if not out:
        log.warning("the ensemble file has no held-out per-fold weights: teacher targets use its tuned weights")
        return {-1: tuned}
    return out


def teacher_targets(
    ensemble: Ensemble,
    oof: Sequence[pd.DataFrame],
    *,
    weights: str = "heldout",
    truth: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The ensemble's blended out-of-fold distribution of every box: ``NAME, box_id, teacher_fold, t_0..t_22``
    (log-probabilities; ``teacher_fold`` = the OOF ``fold`` of the row: the fold whose models wrote it).

    ``oof``: the members' OOF logits tables (:func:`cytologia.classification.oof.read_oof`), holding the
    ``oof_model`` of every cell member of ``ensemble`` (and of its multi-label member, blended in on single-cell
    images; ``truth`` -- the annotations -- says which images hold one cell). Every member must cover the same boxes.
    ``weights``: ``heldout`` (per fold, the weights tuned without it) or ``tuned`` (the file's)."""
    from cytologia.classification.oof import logits_of

    by_model: dict[str, pd.DataFrame] = {}
    for table in oof:
        for model, part in table.groupby("model", sort=False):
            by_model[str(model)] = part.reset_index(drop=True)
    cells = ensemble.cell_members
    names = [m.oof_model or m.name for m in cells]
    missing = [n for n in names if n not in by_model]
    if missing:
        raise CytologiaInputError(
            f"OOF logits of member(s) {', '.join(missing)} not found (have {', '.join(sorted(by_model)) or 'none'})"
        )
    first = by_model[names[0]]
    keys = pd.MultiIndex.from_frame(first[["NAME", "box_id"]])
    fold = first["fold"].to_numpy(np.int64)
    stack = []
    for name in names:
        part = by_model[name]
        at = pd.MultiIndex.from_frame(part[["NAME", "box_id"]]).get_indexer(keys)
        if (at < 0).any() or len(part) != len(first):
            raise CytologiaInputError(f"member {name}: its OOF rows are not the boxes of {names[0]}")
        if not np.array_equal(part["fold"].to_numpy(np.int64)[at], fold):
            raise CytologiaInputError(f"member {name}: boxes held out in other folds than in {names[0]}")
        stack.append(logits_of(part)[at])
    logits = np.stack(stack)
    image_prob = single = None
    ml = ensemble.multilabel_member
    if ml is not None and ensemble.blend.multilabel_weight > 0:
        part = by_model.get(ml.oof_model or ml.name)
        if part is None:
            raise CytologiaInputError(f"OOF logits of the multi-label member {ml.oof_model or ml.name} not found")
        if truth is None:
            raise CytologiaInputError("a multi-label member blends in on single-cell images: give the truth table")
        per_image = pd.DataFrame(logits_of(part)).groupby(part["NAME"].to_numpy()).mean()
        image_prob = pd.DataFrame(multilabel_probabilities(per_image.to_numpy()), index=per_image.index)
        image_prob = image_prob.reindex(first["NAME"]).to_numpy(np.float64)
        single = first["NAME"].map(truth.groupby("NAME").size()).fillna(0).to_numpy() == 1
    bias = None if ensemble.blend.class_bias is None else np.asarray(ensemble.blend.class_bias)
    per_fold = _fold_weights(ensemble, weights)
    probs = np.zeros((len(first), len(CLASSES)))
    for f in np.unique(fold):
        rows = fold == f
        w = per_fold.get(int(f), per_fold.get(-1))
        if w is None:  # held-out weights exist for other folds only: the file's, said so
            log.warning("no held-out weights for fold %d: its teacher targets use the tuned weights", f)
            w = ensemble.weights()
        probs[rows] = blend_probabilities(
            logits[:, rows],
            w,
            bias,
            None if image_prob is None else image_prob[rows],
            None if single is None else single[rows],
            ensemble.blend.multilabel_weight,
        )
    out = pd.DataFrame({"NAME": first["NAME"].to_numpy(), "box_id": first["box_id"].to_numpy(np.int64)})
    out[TEACHER_FOLD] = fold
    out[list(TEACHER_COLUMNS)] = np.log(np.maximum(probs, _EPS)).astype(np.float32)
    return out


def check_out_of_fold(targets: pd.DataFrame, fold_of: pd.Series, what: str = "teacher targets") -> None:
    """Refuse any row of ``targets`` (``NAME``, ``teacher_fold``) whose teacher trained on its image: the fold-``k``
    models trained on every fold but ``k``, so a row is out-of-fold only when ``teacher_fold`` is its image's fold
    (``fold_of``: NAME -> fold). Raises :class:`TeacherLeakError` counting and naming the offending rows."""
    image_fold = targets["NAME"].astype(str).map(fold_of)
    unknown = image_fold.isna().to_numpy()
    if unknown.any():
        raise CytologiaInputError(
            f"{what}: {int(unknown.sum())} row(s) on images without a fold (e.g. {targets['NAME'].iat[0]})"
        )
    bad = np.flatnonzero(targets[TEACHER_FOLD].to_numpy(np.int64) != image_fold.to_numpy(np.int64))
    if len(bad):
        i = bad[0]
        raise TeacherLeakError(
            f"{what}: {len(bad)} row(s) come from models that trained on their image, e.g. {targets['NAME'].iat[i]} "
            f"(fold {int(image_fold.iat[i])}) labelled by the fold-{int(targets[TEACHER_FOLD].iat[i])} models, "
            "which trained on every fold but their own; teacher targets must be out-of-fold logits"
        )


# ------------------------------------------------------------------------------------------------ data and items
class TeacherCropDataset(CropDataset):
    """:class:`~cytologia.classification.crops.CropDataset` whose items also carry ``teacher``: the row's teacher
    log-probabilities (``t_*`` columns; NaN where the table has none -- the held-out crops, which only validate)."""

    def __init__(self, table: pd.DataFrame, *args: Any, **kwargs: Any) -> None:
        super().__init__(table, *args, **kwargs)
        if all(c in table.columns for c in TEACHER_COLUMNS):
            self.teacher = table[list(TEACHER_COLUMNS)].to_numpy(np.float32)
        else:
            self.teacher = np.full((len(table), len(TEACHER_COLUMNS)), np.nan, np.float32)

    def item_fields(self, index: int) -> dict[str, torch.Tensor]:
        return {**super().item_fields(index), "teacher": torch.from_numpy(self.teacher[index])}


class DistillDataModule(CropDataModule):
    """:class:`~cytologia.classification.datamodule.CropDataModule` over :class:`TeacherCropDataset`."""

    dataset_class = TeacherCropDataset


@dataclass
class DistillSettings:
    """What makes a crop model a student: the loss mix and which boxes it learns from."""

    temperature: float = 2.0  # softens both distributions in the KL term (Hinton et al.: 2-4 for many classes)
    kd_weight: float = 0.7  # share of the KL term; the rest is the hard-label loss
    weights: str = "heldout"  # teacher blend weights per fold (WEIGHT_MODES)
    extra: pd.DataFrame | None = None  # unlabelled crops with teacher targets (NAME, box, t_*, teacher_fold)
    watch_fraction: float = 0.1  # final student: share of its own training boxes it validates on (in-sample)

    def module_args(self) -> dict[str, float]:
        return {"temperature": float(self.temperature), "kd_weight": float(self.kd_weight)}


@dataclass
class DistillItems(CropItems):
    """The classification stage's items strategy for a student: crops with teacher targets, trained with the
    distillation loss. Fold ``k`` trains on the other folds' boxes, each with its out-of-fold teacher row, plus the
    unlabelled ``settings.extra`` crops labelled by the fold-``k`` models (``teacher_fold == k``). ``final``: one
    student on every box (fold ``-1``; ``extra`` rows with ``teacher_fold == -1``), watching a fixed share of its own
    training boxes (in-sample: a training monitor, never an estimate)."""

    datamodule_class = DistillDataModule  # batches carry the teacher's log-probabilities
    targets: pd.DataFrame = field(default_factory=pd.DataFrame)
    settings: DistillSettings = field(default_factory=DistillSettings)
    final: bool = False

    def split(self, fold: int, label_names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        if self.final:
            train = self.boxes[label_index(self.boxes, label_names) >= 0].reset_index(drop=True)
            rng = np.random.default_rng(0)
            n_watch = max(1, int(round(self.settings.watch_fraction * len(train))))
            val = train.iloc[np.sort(rng.choice(len(train), n_watch, replace=False))].reset_index(drop=True)
        else:
            train, val = super().split(fold, label_names)
        train = attach_teacher(train, self.targets, fold)
        extra = self.settings.extra
        if extra is not None and len(extra):
            # fold k may only learn from crops the fold-k models labelled (they never saw fold k's labels)
            mine = extra[extra[TEACHER_FOLD].to_numpy(np.int64) == (-1 if self.final else fold)]
            check_not_validation(mine, val, fold, "unlabelled crops")
            mine = mine.assign(**{"class": None, "fold": fold}).reset_index(drop=True)
            log.info("fold %d: %d unlabelled crop(s) with teacher targets added", fold, len(mine))
            train = pd.concat([train, mine.reindex(columns=train.columns)], ignore_index=True)
        return train, val

    def module(self, cfg: DictConfig, label_names: list[str], augment: dict[str, Any], fold: int) -> ClassifierModule:
        from cytologia.classification.stage import classifier_module

        return classifier_module(cfg, label_names, augment, distill=self.settings.module_args())


def check_not_validation(rows: pd.DataFrame, val: pd.DataFrame, fold: int, what: str) -> None:
    """Refuse training ``rows`` on an image of fold ``fold``'s validation set ``val`` (:class:`TeacherLeakError`)."""
    leaked = rows["NAME"].astype(str).isin(set(val["NAME"].astype(str)))
    if leaked.any():
        raise TeacherLeakError(
            f"fold {fold}: {int(leaked.sum())} {what} on the fold's own validation images (e.g. "
            f"{rows.loc[leaked, 'NAME'].iat[0]}): they would be scored on what they were trained on"
        )


def attach_teacher(train: pd.DataFrame, targets: pd.DataFrame, fold: int) -> pd.DataFrame:
    """``train`` (boxes of the training folds) with its teacher columns; every box needs one row (none is dropped),
    and every row must be out-of-fold (:func:`check_out_of_fold` against the boxes' own ``fold``)."""
    keyed = targets.set_index(["NAME", "box_id"])
    at = keyed.index.get_indexer(pd.MultiIndex.from_frame(train[["NAME", "box_id"]]))
    if (at < 0).any():
        i = int(np.flatnonzero(at < 0)[0])
        raise CytologiaInputError(
            f"fold {fold}: {int((at < 0).sum())} training box(es) have no teacher target (e.g. {train['NAME'].iat[i]} "
            f"box_id {train['box_id'].iat[i]}): the members' OOF logits must cover the boxes the student trains on"
        )
    rows = keyed.iloc[at].reset_index(drop=True)
    check_out_of_fold(
        pd.DataFrame({"NAME": train["NAME"].to_numpy(), TEACHER_FOLD: rows[TEACHER_FOLD].to_numpy()}),
        pd.Series(train["fold"].to_numpy(), index=train["NAME"].to_numpy()).groupby(level=0).first(),
    )
    out = train.reset_index(drop=True).copy()
    out[list(TEACHER_COLUMNS)] = rows[list(TEACHER_COLUMNS)].to_numpy(np.float32)
    return out


# ----------------------------------------------------------------------------------------------- configuration
def member_runs(ensemble: Ensemble) -> list[Path]:
    """The run folders of the ensemble's cell members: the folder above ``fold_<k>/checkpoints/<file>``."""
    runs = []
    for m in ensemble.cell_members:
        if not m.checkpoints:
            raise CytologiaInputError(f"member {m.name}: no checkpoints in the ensemble file: which run is it?")
        runs.append(ensemble.resolve(m.checkpoints[0]).resolve().parents[2])
    return runs


def student_config(cfg: DictConfig) -> DictConfig:
    """The classification config the student trains with: ``cfg`` with ``distill.student`` over its ``classifier``
    group and ``distill.trainer`` over its ``trainer`` group, stage ``classifier``, ``exp_name`` ``student`` (its
    OOF model name), every fold; a key that is not in those groups is an error naming it."""
    from cytologia.config import check_config

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.stage, out.exp_name, out.fold = "classifier", "student", None
    for group, key in (("classifier", "student"), ("trainer", "trainer")):
        for name, value in (OmegaConf.to_container(cfg.distill[key], resolve=True) or {}).items():
            if name not in out[group]:
                raise CytologiaInputError(f"config key distill.{key}.{name}: {group} has no key {name!r}")
            OmegaConf.update(out, f"{group}.{name}", value, merge=True)
    return check_config(out)


def config_from_run(run_config: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """A training config from a run's ``config.yaml`` (e.g. a member's: data folder, folds, trainer) laid over the
    checkout's ``configs/train.yaml`` defaults -- so groups and keys added after the run (``distill``,
    ``pseudo_label``, ...) take their default values -- then ``overrides`` (``key=value``, as on ``train.py``'s
    command line); validated."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cytologia.config import check_config
    from cytologia.paths import project_root

    path = Path(run_config)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such run config")
    root = project_root()
    if root is None or not (root / "configs").is_dir():
        raise CytologiaInputError("cytologia is installed, not run from a checkout: there is no configs/ folder")
    if GlobalHydra.instance().is_initialized():  # called from inside a Hydra app
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        base = OmegaConf.create(OmegaConf.to_container(compose(config_name="train")))  # plain: the run adds keys
    try:
        cfg = OmegaConf.merge(base, OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:  # omegaconf's merge and grammar errors, with the key
        raise CytologiaInputError(f"{path} + overrides {list(overrides)}: {err}") from None
    return check_config(cfg)


# ----------------------------------------------------------------------------------------------------- the step
@dataclass
class DistillResult:
    """What :func:`distill` did: the student's run folder, its CV (None without ``cv``), the final checkpoint, the
    ensemble file holding the student as its only member (with the teacher's detector), and the printed lines."""

    run_dir: Path
    cv_macro_f1: float | None
    final_checkpoint: Path | None
    ensemble_path: Path | None
    lines: list[str] = field(default_factory=list)


def distill(
    cfg: DictConfig,
    ensemble: str | Path | Ensemble,
    out: str | Path,
    *,
    oof: Sequence[str | Path] | None = None,
    runtime: str = "onnx",
) -> DistillResult:
    """Distil the teacher ``ensemble`` into the student of ``cfg`` (a training config: ``data``, ``folds``,
    ``trainer``; the ``distill`` group names the student and the loss mix, :func:`student_config`), into ``out``.

    The targets are the ensemble's out-of-fold blend (:func:`teacher_targets`) of the members' OOF logits: ``oof``
    (run folders or ``oof_logits.csv`` files; default the run folders of the ensemble's checkpoints). With
    ``distill.cv`` one student per fold (``out/cv``: OOF logits and macro-F1, see the module docstring for what they
    mean); with ``distill.final`` one student on every training box (``out/final``) and ``out/student.json``, an
    ensemble file with it as the only member and the teacher's detector -- what
    :func:`cytologia.predict.predict_folder` and ``cytologia bench pipeline`` take. ``distill.unlabelled`` adds the
    test images' crops (``data.root``'s ``test.csv``) with the teacher's predictions as their only target: fold
    ``k``'s from the fold-``k`` models, the final student's from the whole ensemble (predicted with ``runtime``)."""
    from cytologia.classification.oof import read_oof
    from cytologia.classification.stage import crop_boxes, summarize, train_fold
    from cytologia.data.prepare import ensure_data, ensure_folds, read_train
    from cytologia.data.schema import labels
    from cytologia.ensemble import read_ensemble

    out = Path(out)
    ens = ensemble if isinstance(ensemble, Ensemble) else read_ensemble(ensemble)
    scfg = student_config(cfg)
    d = scfg.distill
    runs = [Path(p) for p in oof] if oof is not None else member_runs(ens)
    tables = [read_oof(p / "oof_logits.csv" if p.is_dir() else p) for p in runs]
    root = ensure_data(scfg)
    table = read_train(scfg, root)
    folds = ensure_folds(scfg, table, root)
    targets = teacher_targets(ens, tables, weights=str(d.weights), truth=table)
    out.mkdir(parents=True, exist_ok=True)
    targets.to_csv(out / TARGETS_FILE, index=False, float_format="%.7g")
    extra = None
    if d.unlabelled:
        from cytologia.classification.pseudo import teacher_predictions

        k_folds = list(range(int(scfg.folds.k))) if d.cv else []
        extra = unlabelled_crops(teacher_predictions(root, ens, k_folds, full=bool(d.final), runtime=runtime))
    settings = DistillSettings(float(d.temperature), float(d.kd_weight), str(d.weights), extra=extra)
    boxes = crop_boxes(scfg, table, folds)
    label_names = list(labels(False))
    lines = [f"teacher: {', '.join(m.name for m in ens.cell_members)}; {len(targets)} out-of-fold targets"]
    if extra is not None:
        lines.append(f"unlabelled test crops with teacher targets: {len(extra)} (per teacher fold, -1 = all folds)")
    cv_f1 = None
    if d.cv:
        items = DistillItems(boxes, targets=targets, settings=settings)
        results = []
        for k in range(int(scfg.folds.k)):
            r = train_fold(scfg, items, k, out / "cv" / f"fold_{k}", root / "images", label_names)
            if r is not None:
                results.append(r)
        cv_f1 = float(summarize(scfg, out / "cv", boxes, results, label_names)["oof_macro_f1"])
        lines.append(f"student CV macro-F1 {cv_f1:.4f} (teacher targets out-of-fold; see docs/distillation.md)")
    ckpt = ens_path = None
    if d.final:
        items = DistillItems(boxes, targets=targets, settings=settings, final=True)
        r = train_fold(scfg, items, -1, out / "final", root / "images", label_names)
        if r is not None:
            ckpt = Path(r.oof_checkpoint or r.last_checkpoint)
            ens_path = write_student_ensemble(scfg, ens, ckpt, out / "student.json")
            student = f"{scfg.classifier.name}@{scfg.classifier.img_size}"
            lines.append(f"final student ({student}, every training box): wrote {ens_path}")
    record = {
        "student": str(scfg.classifier.name),
        "img_size": int(scfg.classifier.img_size),
        **{k: _plain(d[k]) for k in ("temperature", "kd_weight", "weights", "unlabelled")},
        "teacher": [m.name for m in ens.cell_members],
        "cv_macro_f1": cv_f1,
        "final_checkpoint": None if ckpt is None else str(ckpt),
        "n_unlabelled_crops": 0 if extra is None else len(extra),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return DistillResult(out, cv_f1, ckpt, ens_path, lines)


def unlabelled_crops(predictions: pd.DataFrame) -> pd.DataFrame:
    """Crops of predicted boxes (``NAME, x1..y2, p_<class>..., teacher_fold``: the output of
    :func:`cytologia.classification.pseudo.teacher_predictions`) whose only target is the teacher's distribution:
    ``NAME, box_id, x1..y2, t_*, teacher_fold`` (box ids above any train.csv row)."""
    from cytologia.classification.pseudo import PSEUDO_BOX_ID_START
    from cytologia.data.schema import BOX_COLUMNS
    from cytologia.runtime.inference import PROB_COLUMNS

    missing = [c for c in (*PROB_COLUMNS, TEACHER_FOLD) if c not in predictions.columns]
    if missing:
        raise CytologiaInputError(f"predicted boxes: missing column(s) {', '.join(missing[:4])}")
    out = predictions[["NAME", *BOX_COLUMNS, TEACHER_FOLD]].reset_index(drop=True).copy()
    out.insert(1, "box_id", PSEUDO_BOX_ID_START + np.arange(len(out), dtype=np.int64))
    logp = np.log(np.maximum(predictions[list(PROB_COLUMNS)].to_numpy(np.float64), _EPS)).astype(np.float32)
    out[list(TEACHER_COLUMNS)] = logp
    return out


def write_student_ensemble(cfg: DictConfig, teacher: Ensemble, checkpoint: Path, path: Path) -> Path:
    """An ensemble file with the student as its only cell member (weight 1, no flip TTA) and the teacher's
    detector: the student replaces the classifier ensemble, the detector stays."""
    from cytologia.ensemble import BlendSpec, MemberSpec, write_ensemble

    member = MemberSpec(
        name="student",
        arch=str(cfg.classifier.name),
        img_size=int(cfg.classifier.img_size),
        margin=float(cfg.classifier.margin),
        tta_flip=False,
        checkpoints=[str(Path(checkpoint).resolve())],
    )
    tuning = {"distilled_from": [m.name for m in teacher.cell_members], "config": _plain(cfg.distill)}
    detector = absolute_detector(teacher, folds=cfg.distill.detector_folds)
    return write_ensemble(Ensemble([member], BlendSpec(), detector, tuning), path)


def absolute_detector(ensemble: Ensemble, *, folds: int | None = None) -> DetectorSpec | None:
    """The ensemble's detector with absolute file paths (to put in another ensemble file, elsewhere); with ``folds``
    only its first ``folds`` fold models (one pass per fold and flip view: the detector's cost grows with them)."""
    d = ensemble.detector
    if d is None:
        return None
    n = len(d.checkpoints)
    if folds is not None and not 1 <= int(folds) <= n:
        raise CytologiaInputError(f"detector_folds={folds}: the teacher's detector has {n} fold model(s) (1..{n})")
    keep = n if folds is None else int(folds)
    return replace(
        d,
        checkpoints=[str(ensemble.resolve(p)) for p in d.checkpoints[:keep]],
        onnx=[str(ensemble.resolve(p)) for p in d.onnx[:keep]],
    )


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
