"""Tuning the blend (:mod:`cytologia.ensemble.blend`) on out-of-fold logits: data, weight search, held-out check.

:func:`tune` maximises the challenge score on out-of-fold (OOF) logits. For a fixed set of boxes the score's box term
does not depend on the classifiers, so the objective is its F1 part: scikit-learn's macro-F1 over ground-truth rows,
each taking the class of its matched box (its own box for ground-truth crops; the detected box of best GIoU for crops
of detected boxes, ``None`` when its image has no box), over the union of true and predicted labels. It is piecewise
constant in the weights, so the optimiser is derivative-free:

1. coordinate ascent on the simplex from two starts (uniform weights and the best single member): for each member
   in turn, a 21-point line search moving weight between it and the others, until a full pass gains nothing;
2. Nelder-Mead (scipy) on softmax-parametrised weights from that point, on F1 plus a 1e-3 x mean log-probability
   tie-break that gives the flat steps a slope; its result is kept only when its F1 is at least as high;
   (steps 1-2 are skipped when the member weights are given, ``fixed``: the 1st place's fixed groups);
3. the multi-label weight ``a`` by a 21-point grid on [0, 1];
4. optionally (``class_bias=True``) per-class logit biases by coordinate ascent (11 offsets per class, 3 passes).

Held-out check: every fold in turn is held out, the ensemble is tuned on the others and scored on it; the held-out
predictions of all folds are pooled into one macro-F1 (cross-fitting), compared with the single member that scores
best on the tuning folds (scored on the held-out fold) and with equal weights. With OOF logits of only one fold the
images are split in two halves by a hash of their name. The weights written to the ensemble file
(:mod:`cytologia.ensemble.schema`, :func:`apply_tuning`) are tuned on every fold.

Prediction never imports this module: :mod:`cytologia.runtime` needs only the schema and the blend.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from cytologia.data.schema import BOX_COLUMNS, CLASSES
from cytologia.ensemble.blend import blend_logits, blend_probabilities, multilabel_probabilities, softmax
from cytologia.ensemble.schema import N_CLASSES, BlendSpec, MemberSpec
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.metrics import F1_WEIGHT

log = logging.getLogger(__name__)

NONE_CODE = N_CLASSES  # label code of "None" (a truth box whose image has no prediction) in the F1
GRID_POINTS = 21  # line-search points per coordinate (weights and the multi-label weight): steps of 0.05
BIAS_POINTS = 11  # offsets tried per class bias, spread over +-1 standard deviation of the blended logits
BIAS_PASSES = 3
MAX_PASSES = 10  # coordinate-ascent passes over the members (it usually stops after 2-3)
TIE_BREAK = 1e-3  # weight of the mean log-probability of the true class in the Nelder-Mead objective
_EPS = 1e-12


# -------------------------------------------------------------------------------------------------------- scoring
def macro_f1_codes(true: np.ndarray, pred: np.ndarray, n_labels: int = N_CLASSES + 1) -> float:
    """The challenge's macro-F1 (scikit-learn's, over the labels present in the truth or the predictions) of integer
    label codes in ``0..n_labels-1`` -- the same number as :func:`cytologia.metrics.macro_f1` on the names."""
    true = np.asarray(true, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if not len(true):
        return 0.0
    cm = np.bincount(true * n_labels + pred, minlength=n_labels * n_labels).reshape(n_labels, n_labels)
    tp = np.diag(cm).astype(np.float64)
    row, col = cm.sum(axis=1), cm.sum(axis=0)
    present = (row + col) > 0
    f1 = 2 * tp[present] / (row[present] + col[present])  # 2TP / (2TP + FP + FN); > 0 where present
    return float(f1.mean())


@dataclass
class TuneData:
    """Aligned OOF logits and the ground truth they are scored against.

    Rows (``n``) are the boxes that were classified; evaluation rows (``t``) are ground-truth boxes, each with the
    row whose class it takes (``eval_row``, -1: its image has no classified box -> "None").
    """

    members: list[str]
    logits: np.ndarray  # (M, n, 23) float32
    names: np.ndarray  # (n,) image of each row
    fold: np.ndarray  # (n,)
    single_cell: np.ndarray  # (n,) the row's image holds one ground-truth box
    eval_row: np.ndarray  # (t,)
    eval_true: np.ndarray  # (t,) class codes 0..22
    eval_fold: np.ndarray  # (t,)
    image_prob: np.ndarray | None = None  # (n, 23) multi-label probabilities of the row's image (NaN: none)
    multilabel: str | None = None
    giou: float | None = None  # mean rescaled GIoU of the evaluation rows (detected boxes), None for truth boxes
    fold_scheme: str = "folds"

    @property
    def n_members(self) -> int:
        return len(self.members)


def _truth_codes(classes: pd.Series, source: str) -> np.ndarray:
    codes = pd.Series(classes).astype(str).map({c: i for i, c in enumerate(CLASSES)})
    bad = np.flatnonzero(codes.isna().to_numpy())
    if len(bad):
        problems: list[tuple[int | None, str]] = [
            (int(i) + 1, f"class {classes.iloc[i]!r} is not one of the {N_CLASSES} classes") for i in bad[:20]
        ]
        raise ValidationError(source, problems, total=len(bad))
    return codes.to_numpy(np.int64)


def prepare_tuning(
    oof: pd.DataFrame | Sequence[pd.DataFrame],
    truth: pd.DataFrame,
    members: Sequence[str] | None = None,
    *,
    multilabel: str | None = None,
    boxes: pd.DataFrame | None = None,
    folds: pd.DataFrame | None = None,
    source: str = "<oof logits>",
) -> TuneData:
    """Align the OOF logits of ``members`` (``model`` names of ``oof``; default: every model but ``multilabel``) with
    the ground truth.

    ``oof``: OOF logits tables (:mod:`cytologia.classification.oof`; one table, or several -- e.g. one per run, as
    a 24-label model's table cannot share columns with a 23-label one), every member over the same (NAME, box_id)
    keys. ``truth``: the annotations table (``NAME, box_id, x1..y2, class``,
    :func:`cytologia.data.io.read_annotations`). Without ``boxes`` the OOF rows are crops of ground-truth boxes
    (``box_id`` = the truth's ``box_id``); with ``boxes`` (the detected boxes table the crops were cut from, ``box_id``
    = its row) each truth box takes the OOF box of its image with the best GIoU. The images evaluated are those of
    the OOF table, plus, with ``folds`` (``NAME, fold``), every image of the OOF table's folds -- an image in which
    nothing was detected then counts, with class "None", as in the score. ``multilabel``: the ``model`` name of a
    full-image multi-label member (its rows' logits are averaged per image; ``box_id`` is ignored).
    """
    from cytologia.classification.oof import logits_of, validate_oof

    tables = [oof] if isinstance(oof, pd.DataFrame) else list(oof)
    by_model: dict[str, pd.DataFrame] = {}
    for i, table in enumerate(tables):
        table = validate_oof(table, source if len(tables) == 1 else f"{source} #{i + 1}")
        for model, part in table.groupby("model", sort=False):
            if model in by_model:
                raise CytologiaInputError(f"{source}: model {model!r} appears in more than one OOF table")
            by_model[str(model)] = part.reset_index(drop=True)
    models = list(by_model)
    members = [m for m in models if m != multilabel] if members is None else list(members)
    if not members:
        raise CytologiaInputError(f"{source}: no cell member to tune")
    missing = [m for m in [*members, *([multilabel] if multilabel else [])] if m not in models]
    if missing:
        raise CytologiaInputError(
            f"{source}: model(s) {', '.join(missing)} not in the OOF table; it has {', '.join(models)}"
        )
    if multilabel in members:
        raise CytologiaInputError(f"{source}: {multilabel!r} is both a cell member and the multilabel member")

    first = by_model[members[0]]
    keys = pd.MultiIndex.from_frame(first[["NAME", "box_id"]])
    if keys.has_duplicates:
        raise CytologiaInputError(f"{source}: model {members[0]!r} repeats (NAME, box_id) keys")
    names = first["NAME"].to_numpy(dtype=object)
    fold = first["fold"].to_numpy(np.int64)
    stack = []
    for m in members:
        part = by_model[m]
        at = pd.MultiIndex.from_frame(part[["NAME", "box_id"]]).get_indexer(keys)
        if (at < 0).any() or len(part) != len(first):
            raise CytologiaInputError(
                f"{source}: model {m!r} has {len(part)} rows, {int((at < 0).sum())} of the {len(first)} boxes of "
                f"{members[0]!r} missing: members must be scored on the same boxes"
            )
        if not np.array_equal(part["fold"].to_numpy(np.int64)[at], fold):
            raise CytologiaInputError(f"{source}: model {m!r} holds boxes out in other folds than {members[0]!r}")
        stack.append(logits_of(part)[at, :N_CLASSES])
    logits = np.stack(stack).astype(np.float32)

    need = [c for c in ("NAME", "class", *(() if boxes is None else BOX_COLUMNS)) if c not in truth.columns]
    if boxes is None and "box_id" not in truth.columns:
        need.append("box_id")
    if need:
        raise CytologiaInputError(f"truth table: missing column(s) {', '.join(need)}")
    evaluated = set(names)
    fold_of_name: pd.Series | None = None
    if folds is not None:
        fold_of_name = pd.Series(folds["fold"].to_numpy(np.int64), index=folds["NAME"].astype(str).to_numpy())
        held = set(np.unique(fold).tolist())
        evaluated |= set(fold_of_name.index[fold_of_name.isin(held).to_numpy()])
    truth = truth[truth["NAME"].astype(str).isin(evaluated)].reset_index(drop=True)
    if truth.empty:
        raise CytologiaInputError(f"{source}: no ground-truth box in the images of the OOF table")
    true_codes = _truth_codes(truth["class"], "truth table")
    per_image = truth.groupby("NAME").size()
    single = pd.Series(names).map(per_image).fillna(0).to_numpy() == 1
    giou = None
    if boxes is None:
        row_of = pd.Series(np.arange(len(first)), index=keys)
        eval_row = row_of.reindex(pd.MultiIndex.from_frame(truth[["NAME", "box_id"]])).to_numpy()
        lost = np.isnan(eval_row.astype(np.float64))
        if lost.any():
            log.warning(
                "%d truth box(es) of the OOF images have no OOF logits: left out of the objective", int(lost.sum())
            )
            truth, true_codes, eval_row = truth[~lost], true_codes[~lost], eval_row[~lost]
        eval_row = eval_row.astype(np.int64)
    else:
        eval_row, giou = _match_detected(first, boxes, truth, source)
    eval_fold = np.where(eval_row >= 0, fold[np.maximum(eval_row, 0)], -1)
    if (eval_row < 0).any():  # an image without any classified box: its fold from the folds table
        miss = eval_row < 0
        lookup = fold_of_name if fold_of_name is not None else pd.Series(dtype=np.int64)
        eval_fold[miss] = truth["NAME"].astype(str).map(lookup).fillna(-1).to_numpy(np.int64)[miss]

    image_prob = None
    if multilabel is not None:
        ml = by_model[multilabel]
        per_name = pd.DataFrame(logits_of(ml)).groupby(ml["NAME"].to_numpy()).mean()
        probs = multilabel_probabilities(per_name.to_numpy())
        lookup = pd.DataFrame(probs, index=per_name.index)
        image_prob = lookup.reindex(names).to_numpy(np.float64)
        absent = ~np.isfinite(image_prob).all(axis=1)
        if absent.any():
            log.warning(
                "multilabel %s: no logits for %d of %d boxes' images", multilabel, int(absent.sum()), len(names)
            )
    return TuneData(
        members=members,
        logits=logits,
        names=names,
        fold=fold,
        single_cell=single,
        eval_row=eval_row,
        eval_true=true_codes,
        eval_fold=eval_fold.astype(np.int64),
        image_prob=image_prob,
        multilabel=multilabel,
        giou=giou,
    )


def _match_detected(
    first: pd.DataFrame, boxes: pd.DataFrame, truth: pd.DataFrame, source: str
) -> tuple[np.ndarray, float]:
    """Each truth row -> the OOF row (of ``first``) whose detected box has the best GIoU in its image (first on ties,
    as the score's argmax), -1 when the image has none; and the mean rescaled GIoU (0 for no box)."""
    from cytologia.metrics import giou_pairs

    missing = [c for c in ("NAME", *BOX_COLUMNS) if c not in boxes.columns]
    if missing:
        raise CytologiaInputError(f"boxes table: missing column(s) {', '.join(missing)}")
    ids = first["box_id"].to_numpy(np.int64)
    if ids.min() < 0 or ids.max() >= len(boxes):
        raise CytologiaInputError(f"{source}: box_id outside the {len(boxes)} rows of the boxes table")
    box_names = boxes["NAME"].astype(str).to_numpy(dtype=object)[ids]
    if not np.array_equal(box_names, first["NAME"].to_numpy(dtype=object)):
        raise CytologiaInputError(f"{source}: NAME of OOF rows differs from the boxes table's row box_id")
    xyxy = boxes[list(BOX_COLUMNS)].to_numpy(np.float64)[ids]
    left = pd.DataFrame({"NAME": truth["NAME"].astype(str).to_numpy(), "_t": np.arange(len(truth))})
    right = pd.DataFrame({"NAME": first["NAME"].to_numpy(), "_r": np.arange(len(first))})
    pairs = left.merge(right, on="NAME", how="inner", sort=False)
    t, r = pairs["_t"].to_numpy(np.int64), pairs["_r"].to_numpy(np.int64)
    g = giou_pairs(truth[list(BOX_COLUMNS)].to_numpy(np.float64)[t], xyxy[r]) if len(pairs) else np.zeros(0)
    order = np.lexsort((r, -g, t))
    t, r, g = t[order], r[order], g[order]
    best = np.r_[True, t[1:] != t[:-1]] if len(t) else np.zeros(0, dtype=bool)
    eval_row = np.full(len(truth), -1, dtype=np.int64)
    rescaled = np.zeros(len(truth))
    eval_row[t[best]] = r[best]
    rescaled[t[best]] = (g[best] + 1.0) / 2.0
    return eval_row, float(rescaled.mean())


@dataclass
class Params:
    """What is tuned: member weights (simplex), class biases (or None) and the multi-label weight."""

    weights: np.ndarray
    bias: np.ndarray | None = None
    multilabel_weight: float = 0.0


def _codes(
    logits: np.ndarray, params: Params, image_prob: np.ndarray | None, single_cell: np.ndarray | None
) -> np.ndarray:
    """Class codes of the blend of ``logits`` (M, n, 23): the argmax of the blended logits, or of the probabilities
    when the multi-label member takes part."""
    if image_prob is None or params.multilabel_weight <= 0:
        return blend_logits(logits, params.weights, params.bias).argmax(axis=1)
    p = blend_probabilities(logits, params.weights, params.bias, image_prob, single_cell, params.multilabel_weight)
    return p.argmax(axis=1)


def predict_codes(data: TuneData, params: Params, rows: np.ndarray | None = None) -> np.ndarray:
    """Class codes of the blend for the rows ``rows`` (default: all)."""
    sel = slice(None) if rows is None else rows
    image_prob = None if data.image_prob is None else data.image_prob[sel]
    return _codes(data.logits[:, sel], params, image_prob, data.single_cell[sel])


class _Objective:
    """Macro-F1 of a parameter set on a subset of the evaluation rows (the rows of some folds). The classified rows
    those truth rows use are sliced once: an evaluation is one matrix-vector product, an argmax and a bincount."""

    def __init__(self, data: TuneData, eval_mask: np.ndarray) -> None:
        idx = np.flatnonzero(eval_mask)
        eval_row = data.eval_row[idx]
        self.true = data.eval_true[idx]
        rows = np.unique(eval_row[eval_row >= 0])  # classified rows these truth rows use
        self.rows = rows
        self.local = np.searchsorted(rows, np.maximum(eval_row, 0))
        self.has = eval_row >= 0
        self.logits = np.ascontiguousarray(data.logits[:, rows])
        self.image_prob = None if data.image_prob is None else data.image_prob[rows]
        self.single = data.single_cell[rows]
        self.evaluations = 0

    def pred_eval(self, params: Params) -> np.ndarray:
        codes = _codes(self.logits, params, self.image_prob, self.single)
        return np.where(self.has, codes[self.local] if len(codes) else NONE_CODE, NONE_CODE)

    def __call__(self, params: Params) -> float:
        self.evaluations += 1
        return macro_f1_codes(self.true, self.pred_eval(params))

    def mean_log_prob(self, params: Params) -> float:
        """Mean log-probability of the true class (the Nelder-Mead tie-break), over rows with a classified box."""
        p = blend_probabilities(
            self.logits, params.weights, params.bias, self.image_prob, self.single, params.multilabel_weight
        )
        picked = p[self.local[self.has], self.true[self.has]]
        return float(np.log(np.maximum(picked, _EPS)).mean()) if len(picked) else 0.0


def _line_search_weights(obj: _Objective, params: Params, grid: np.ndarray) -> tuple[Params, float]:
    """Coordinate ascent on the simplex: move weight between one member and the rest, member by member."""
    best = obj(params)
    m_count = len(params.weights)
    for _ in range(MAX_PASSES):
        improved = False
        for m in range(m_count):
            w = params.weights
            rest = np.delete(w, m)
            rest = rest / rest.sum() if rest.sum() > 0 else np.full(m_count - 1, 1.0 / max(m_count - 1, 1))
            for v in grid:
                cand = np.insert(rest * (1.0 - v), m, v)
                trial = Params(cand, params.bias, params.multilabel_weight)
                f = obj(trial)
                if f > best + 1e-12:
                    best, params, improved = f, trial, True
        if not improved:
            break
    return params, best


def _nelder_mead(obj: _Objective, params: Params, start_f1: float) -> tuple[Params, float, bool]:
    """Nelder-Mead on softmax-parametrised weights; (params, F1, whether it improved on the start)."""
    from scipy.optimize import minimize

    m_count = len(params.weights)
    theta0 = np.log(params.weights + 1e-3)

    def to_params(theta: np.ndarray) -> Params:
        w = softmax(theta)
        return Params(w, params.bias, params.multilabel_weight)

    def loss(theta: np.ndarray) -> float:
        p = to_params(theta)
        return -(obj(p) + TIE_BREAK * obj.mean_log_prob(p))

    res = minimize(loss, theta0, method="Nelder-Mead", options={"maxfev": 60 * m_count, "xatol": 1e-3, "fatol": 1e-7})
    cand = to_params(res.x)
    f = obj(cand)
    if f > start_f1 + 1e-12:
        return cand, f, True
    return params, start_f1, False


def _tune_bias(obj: _Objective, params: Params, spread: float) -> tuple[Params, float]:
    best = obj(params)
    bias = np.zeros(N_CLASSES) if params.bias is None else params.bias.copy()
    offsets = np.linspace(-spread, spread, BIAS_POINTS)
    for _ in range(BIAS_PASSES):
        improved = False
        for c in range(N_CLASSES):
            base = bias[c]
            for off in offsets:
                trial_bias = bias.copy()
                trial_bias[c] = base + off
                f = obj(Params(params.weights, trial_bias, params.multilabel_weight))
                if f > best + 1e-12:
                    best, bias, improved = f, trial_bias, True
        if not improved:
            break
    return Params(params.weights, bias, params.multilabel_weight), best


def single_member_scores(data: TuneData, eval_mask: np.ndarray | None = None) -> dict[str, float]:
    """Macro-F1 of each member alone on the evaluation rows ``eval_mask`` (default: all)."""
    obj = _Objective(data, np.ones(len(data.eval_row), bool) if eval_mask is None else eval_mask)
    return {m: obj(Params(np.eye(data.n_members)[i])) for i, m in enumerate(data.members)}


def fixed_weight_vector(data: TuneData, fixed: Mapping[str, float]) -> np.ndarray:
    """Member weights on the simplex from ``fixed`` (experiment name -> relative weight; a member's flip-TTA OOF
    model ``<exp>+hflip`` takes its experiment's weight). Every member must be named, with a weight >= 0."""
    from cytologia.oof_names import plain_model_name

    missing = [m for m in data.members if plain_model_name(m) not in fixed]
    unknown = sorted(set(fixed) - {plain_model_name(m) for m in data.members})
    if missing or unknown:
        raise CytologiaInputError(
            f"fixed member weights: members without a weight: {', '.join(missing) or 'none'}; names that are no "
            f"member: {', '.join(unknown) or 'none'} (members: {', '.join(data.members)})"
        )
    w = np.array([float(fixed[plain_model_name(m)]) for m in data.members], dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise CytologiaInputError(f"fixed member weights {dict(fixed)}: must be >= 0 with a positive sum")
    return w / w.sum()


def optimise(
    data: TuneData, eval_mask: np.ndarray, *, class_bias: bool = False, fixed: np.ndarray | None = None
) -> tuple[Params, dict[str, Any]]:
    """Tune the blend on the evaluation rows ``eval_mask``; returns the parameters and a trace of the steps.
    ``fixed``: member weights given (:func:`fixed_weight_vector`, e.g. the 1st place's groups): only the multi-label
    weight (and the class biases) are searched."""
    obj = _Objective(data, eval_mask)
    m_count = data.n_members
    grid = np.linspace(0.0, 1.0, GRID_POINTS)
    singles = [obj(Params(np.eye(m_count)[i])) for i in range(m_count)]
    trace: dict[str, Any] = {"single_member_f1": dict(zip(data.members, singles))}
    if fixed is not None:
        best_params = Params(np.asarray(fixed, dtype=np.float64))
        best_f1 = obj(best_params)
        trace["fixed_weights"] = [float(w) for w in best_params.weights]
    else:
        starts = [Params(np.full(m_count, 1.0 / m_count)), Params(np.eye(m_count)[int(np.argmax(singles))])]
        best_params, best_f1 = starts[0], -1.0
        for start in starts if m_count > 1 else starts[:1]:
            p, f = _line_search_weights(obj, start, grid) if m_count > 1 else (start, obj(start))
            if f > best_f1:
                best_params, best_f1 = p, f
        trace["coordinate_ascent_f1"] = best_f1
        if m_count > 1:
            best_params, best_f1, improved = _nelder_mead(obj, best_params, best_f1)
            trace["nelder_mead_improved"] = improved
    if data.image_prob is not None:
        for a in grid[1:]:
            trial = Params(best_params.weights, best_params.bias, float(a))
            f = obj(trial)
            if f > best_f1 + 1e-12:
                best_params, best_f1 = trial, f
        trace["multilabel_weight"] = best_params.multilabel_weight
    if class_bias:
        rows = obj.rows
        spread = float(blend_logits(obj.logits, best_params.weights).std()) if len(rows) else 1.0
        best_params, best_f1 = _tune_bias(obj, best_params, max(spread, 1e-3))
    trace["f1"] = best_f1
    trace["evaluations"] = obj.evaluations
    return best_params, trace


def _folds_for_check(data: TuneData) -> tuple[np.ndarray, str]:
    """Fold of every evaluation row for the held-out check: the OOF folds, or two halves by image-name hash when the
    OOF table holds a single fold."""
    folds = np.unique(data.eval_fold[data.eval_fold >= 0])
    if len(folds) >= 2:
        return data.eval_fold, "leave-one-fold-out over the OOF folds"
    names = data.names[np.maximum(data.eval_row, 0)]
    halves = np.array([zlib.crc32(str(n).encode()) % 2 for n in names], dtype=np.int64)
    return halves, "one OOF fold only: two halves of its images (crc32 of NAME), each held out in turn"


@dataclass
class TuneResult:
    params: Params
    report: dict[str, Any]


def tune(
    data: TuneData, *, class_bias: bool = False, heldout: bool = True, fixed: np.ndarray | None = None
) -> TuneResult:
    """Tune on every fold (the weights to use) and, with ``heldout``, cross-fit the held-out check; see the module
    docstring. The report holds macro-F1s, the challenge-score equivalents and the gain over the best member.
    ``fixed``: given member weights (only the multi-label weight and biases are tuned, see :func:`optimise`)."""
    everything = np.ones(len(data.eval_row), dtype=bool)
    params, trace = optimise(data, everything, class_bias=class_bias, fixed=fixed)
    singles = trace["single_member_f1"]
    report: dict[str, Any] = {
        "objective": "macro-F1 over ground-truth boxes, the F1 part of the score (its box term does not depend on it)",
        "members": data.members,
        "multilabel": data.multilabel,
        "n_truth_boxes": int(len(data.eval_row)),
        "n_classified_boxes": int(data.logits.shape[1]),
        "class_bias": class_bias,
        "single_member_oof_f1": singles,
        "in_sample_f1": trace["f1"],
        "optimiser": {k: v for k, v in trace.items() if k not in ("single_member_f1",)},
    }
    if data.giou is not None:
        report["box_term"] = data.giou
        report["in_sample_score"] = (1 - F1_WEIGHT) * data.giou + F1_WEIGHT * trace["f1"]
    if fixed is not None:
        report["fixed_member_weights"] = dict(zip(data.members, (float(w) for w in params.weights)))
    if heldout:
        report["heldout"] = heldout_check(data, class_bias=class_bias, fixed=fixed)
    return TuneResult(params, report)


def heldout_check(data: TuneData, *, class_bias: bool = False, fixed: np.ndarray | None = None) -> dict[str, Any]:
    """Cross-fitted held-out macro-F1 of the tuned ensemble vs the best member (chosen on the tuning folds) and vs
    equal weights."""
    check_fold, scheme = _folds_for_check(data)
    folds = [int(f) for f in np.unique(check_fold[check_fold >= 0])]
    if len(folds) < 2:
        raise CytologiaInputError("the held-out check needs ground-truth boxes in at least two folds")
    m_count = data.n_members
    pred = {k: np.full(len(data.eval_row), NONE_CODE, np.int64) for k in ("ensemble", "best_member", "uniform")}
    per_fold = []
    for h in folds:
        held = check_fold == h
        tune_mask = (check_fold >= 0) & ~held
        params, trace = optimise(data, tune_mask, class_bias=class_bias, fixed=fixed)
        best_m = int(np.argmax([trace["single_member_f1"][m] for m in data.members]))
        held_obj = _Objective(data, held)
        row = {"fold": h, "n_truth_boxes": int(held.sum()), "best_member": data.members[best_m]}
        for key, p in (
            ("ensemble", params),
            ("best_member", Params(np.eye(m_count)[best_m])),
            ("uniform", Params(np.full(m_count, 1.0 / m_count))),
        ):
            codes = held_obj.pred_eval(p)
            pred[key][held] = codes
            row[f"{key}_f1"] = macro_f1_codes(held_obj.true, codes)
        row["weights"] = [round(float(w), 4) for w in params.weights]
        per_fold.append(row)
    used = check_fold >= 0
    pooled = {k: macro_f1_codes(data.eval_true[used], v[used]) for k, v in pred.items()}
    out: dict[str, Any] = {
        "scheme": scheme,
        "folds": folds,
        "ensemble_f1": pooled["ensemble"],
        "best_member_f1": pooled["best_member"],
        "uniform_f1": pooled["uniform"],
        "gain_over_best_member": pooled["ensemble"] - pooled["best_member"],
        "gain_over_uniform": pooled["ensemble"] - pooled["uniform"],
        "score_gain_over_best_member": F1_WEIGHT * (pooled["ensemble"] - pooled["best_member"]),
        "mean_fold_gain": float(np.mean([r["ensemble_f1"] - r["best_member_f1"] for r in per_fold])),
        "per_fold": per_fold,
    }
    if data.giou is not None:
        out["ensemble_score"] = (1 - F1_WEIGHT) * data.giou + F1_WEIGHT * pooled["ensemble"]
    return out


def summary(report: dict[str, Any]) -> str:
    """A few human-readable lines of a tuning report."""
    lines = [
        f"members: {', '.join(report['members'])}"
        + (f" + multilabel {report['multilabel']}" if report.get("multilabel") else "")
    ]
    singles = ", ".join(f"{m} {f:.4f}" for m, f in report["single_member_oof_f1"].items())
    lines.append(f"OOF macro-F1 per member: {singles}")
    selection = report.get("checkpoint_selection")
    if selection:  # trainer.select of the classification runs (commands/tune.py)
        modes = ", ".join(f"{m} {v}" for m, v in selection.items())
        peeked = [m for m, v in selection.items() if "best_val" in v]
        warning = ""
        if peeked:
            warning = (
                f" -- best_val picked the epoch on the held-out fold itself: the OOF figures of {', '.join(peeked)} "
                "and the tuned gain are optimistic"
            )
        lines.append(f"OOF logits from checkpoints chosen by (trainer.select): {modes}{warning}")
    lines.append(f"tuned on every fold (in-sample, optimistic): {report['in_sample_f1']:.4f}")
    h = report.get("heldout")
    if h:
        lines.append(
            f"held-out ({h['scheme']}): ensemble {h['ensemble_f1']:.4f} vs best member {h['best_member_f1']:.4f} "
            f"(gain {h['gain_over_best_member']:+.4f} F1, {h['score_gain_over_best_member']:+.4f} score) vs equal "
            f"weights {h['uniform_f1']:.4f}"
        )
    return "\n".join(lines)


def apply_tuning(
    ens_members: Sequence[MemberSpec], result: TuneResult, data: TuneData
) -> tuple[list[MemberSpec], BlendSpec]:
    """The members with their tuned weights (cell members in ``data.members`` order, then the multi-label member)
    and the blend spec of a tuning result. ``ens_members`` must name every tuned member (``oof_model`` or name)."""
    by_key = {}
    for spec in ens_members:
        by_key[spec.oof_model or spec.name] = spec
    missing = [m for m in [*data.members, *([data.multilabel] if data.multilabel else [])] if m not in by_key]
    if missing:
        raise CytologiaInputError(f"no member spec for tuned model(s) {', '.join(missing)}")
    out = []
    for m, w in zip(data.members, result.params.weights):
        spec = by_key[m]
        out.append(MemberSpec(**{**asdict(spec), "weight": float(w), "kind": "cell", "oof_model": m}))
    if data.multilabel:
        spec = by_key[data.multilabel]
        out.append(MemberSpec(**{**asdict(spec), "weight": 0.0, "kind": "multilabel", "oof_model": data.multilabel}))
    bias = None if result.params.bias is None else [float(b) for b in result.params.bias]
    return out, BlendSpec(rule="logit_mean", class_bias=bias, multilabel_weight=float(result.params.multilabel_weight))
