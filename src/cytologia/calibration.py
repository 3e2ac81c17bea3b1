"""Calibrated probabilities and the refer-to-expert rule: temperature scaling, ECE, reliability and risk-coverage data.

**Temperature scaling** (Guo et al., 2017): the probabilities ``softmax(z / T)`` of logits ``z``, one ``T > 0`` fitted
by minimising the negative log-likelihood (NLL) of out-of-fold (OOF) labels -- a 1-D bounded search (scipy's
``minimize_scalar``, ``T`` in :data:`T_BOUNDS`, on ``log T``). ``T`` never changes which class is the most probable,
so the submission does not change. One temperature per member (its own logits) and one for the ensemble, which
divides the ensemble's log-probabilities ``log p`` -- for the plain blend ``softmax(z_blend)`` exactly
``softmax(z_blend / T)``; with a multi-label member mixed in it is the same map on the mixed probabilities -- so
prediction calibrates from the probabilities it already has (:func:`apply_temperature`).

**ECE** (expected calibration error): boxes in :data:`ECE_BINS` equal-width bins of their top-class probability,
``sum_b n_b / n * |accuracy_b - confidence_b|``; :func:`reliability_table` gives the per-bin data of the diagram.

**Refer to an expert** (selective classification): a box is referred when its score is below a threshold, chosen on
OOF boxes as the lowest one whose kept boxes have an error rate of at most the target (default
:data:`DEFAULT_TARGET_ERROR`). Scores (:func:`reject_scores`, higher = more trustworthy): ``confidence`` (calibrated
probability of the predicted class), ``margin`` (it minus the second most probable class's) and ``agreement`` (the
mean calibrated probability the members give the ensemble's class: member disagreement lowers it). The tuning step
measures all three on OOF boxes, cross-fitted (threshold fitted on the other folds), and keeps the score with the
lowest area under the risk-coverage curve among those prediction can compute from the ensemble's probabilities
alone (:data:`cytologia.ensemble.REJECT_SCORES`: ``agreement`` needs every member's output, which the inference
pipeline does not return; it is measured, and the report says when it would have won).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cytologia.data.schema import CLASSES
from cytologia.ensemble.blend import blend_probabilities, softmax
from cytologia.ensemble.schema import N_CLASSES, REJECT_SCORES, CalibrationSpec, RejectSpec
from cytologia.errors import CytologiaInputError

if TYPE_CHECKING:
    from cytologia.ensemble.tune import Params, TuneData

log = logging.getLogger(__name__)

ECE_BINS = 15  # equal-width confidence bins of the ECE and the reliability diagram (Guo et al. 2017 use 15)
T_BOUNDS: tuple[float, float] = (0.05, 20.0)  # temperatures searched; a fit at a bound is logged
DEFAULT_TARGET_ERROR = 0.02  # refer-to-expert: at most 2 % errors among the boxes kept
ALL_SCORES: tuple[str, ...] = ("confidence", "margin", "agreement")
CURVE_POINTS = 101  # risk-coverage curve points kept in the tuning report (coverage 0, 0.01, ..., 1)
_TINY = 1e-30  # floor of a probability before its log (float32 probabilities can underflow to 0)


# --------------------------------------------------------------------------------------------- temperature
def scaled_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)`` row-wise, float64."""
    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities recalibrated by ``temperature``: ``softmax(log p / T)`` (for ``p = softmax(z)`` exactly
    ``softmax(z / T)``; a probability below 1e-30 is taken as 1e-30 first)."""
    logp = np.log(np.maximum(np.asarray(probs, dtype=np.float64), _TINY))
    return softmax(logp / float(temperature))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(z).sum(axis=1))
    picked = z[np.arange(len(z)), np.asarray(labels, dtype=np.int64)]
    return float((logsum - picked).mean()) if len(z) else 0.0


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The temperature minimising :func:`nll` of ``labels`` (integer codes) over ``bounds``; 1.0 without rows."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise CytologiaInputError(f"fit_temperature: logits {logits.shape} and labels {labels.shape} do not match")
    if not len(labels):
        return 1.0
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize_scalar(lambda u: nll(logits, labels, float(np.exp(u))), bounds=(lo, hi), method="bounded")
    t = float(np.exp(res.x))
    if min(abs(res.x - lo), abs(res.x - hi)) < 1e-3:
        log.warning("temperature %.3g at the bound of [%g, %g]: the logits are extreme or the labels few", t, *bounds)
    return t


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """``log p`` (floored at 1e-30): the "logits" the ensemble temperature divides."""
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), _TINY))


# ------------------------------------------------------------------------------------------------- ECE
def reliability_table(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per equal-width bin of the top-class probability: ``lo, hi, n, confidence`` (mean top probability),
    ``accuracy`` (share whose top class is the label); empty bins have n 0 and NaN means."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64) if len(probs) else np.zeros(0)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 falls in the first bin
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    n = np.bincount(b, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / n
        acc = np.bincount(b, weights=correct, minlength=n_bins) / n
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "n": n, "confidence": mean_conf, "accuracy": acc})


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of ``probs`` (n, K) against integer ``labels``: see the module docstring."""
    t = reliability_table(probs, labels, n_bins)
    used = t["n"].to_numpy() > 0
    if not used.any():
        return 0.0
    gap = np.abs(t["accuracy"].to_numpy()[used] - t["confidence"].to_numpy()[used])
    return float((t["n"].to_numpy()[used] * gap).sum() / t["n"].sum())


# ------------------------------------------------------------------------------------------------ reject
def reject_scores(
    probs: np.ndarray, member_probs: Sequence[np.ndarray] | None = None, pred: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Scores of each box (higher = keep): ``confidence`` and ``margin`` of the calibrated ``probs`` for the class
    ``pred`` (default: the top class), and with ``member_probs`` (each member's calibrated probabilities)
    ``agreement``, their mean probability of that class."""
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1) if pred is None else np.asarray(pred, dtype=np.int64)
    rows = np.arange(len(probs))
    conf = probs[rows, pred]
    other = probs.copy()
    other[rows, pred] = -np.inf
    second = other.max(axis=1) if probs.shape[1] > 1 else np.zeros(len(probs))
    out = {"confidence": conf, "margin": conf - second}
    if member_probs is not None and len(member_probs):
        out["agreement"] = np.mean([np.asarray(p, np.float64)[rows, pred] for p in member_probs], axis=0)
    return out


def risk_coverage(score: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """The risk-coverage curve: keeping the boxes of score >= each distinct score (highest first), the share kept
    (``coverage``), the error rate among them (``risk``) and that ``threshold``."""
    score = np.asarray(score, dtype=np.float64)
    wrong = ~np.asarray(correct, dtype=bool)
    if not len(score):
        return pd.DataFrame({"threshold": [], "coverage": [], "risk": []})
    order = np.argsort(-score, kind="stable")
    s, w = score[order], wrong[order]
    kept = np.arange(1, len(s) + 1)
    errors = np.cumsum(w)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold keeps every tie: the curve has a point after each tie group
    return pd.DataFrame({"threshold": s[last], "coverage": kept[last] / len(s), "risk": errors[last] / kept[last]})


def area_under_risk_coverage(score: np.ndarray, correct: np.ndarray) -> float:
    """AURC: the mean over the kept-box counts ``k = 1..n`` of the error rate of the ``k`` best-scored boxes (ties
    broken pessimistically: by the tie group's mean error); lower is better, the error rate itself at random."""
    score = np.asarray(score, dtype=np.float64)
    wrong = ~np.asarray(correct, dtype=bool)
    if not len(score):
        return 0.0
    order = np.argsort(-score, kind="stable")
    s, w = score[order], wrong[order].astype(np.float64)
    groups = np.r_[0, np.cumsum(s[1:] != s[:-1])]
    w = (np.bincount(groups, weights=w) / np.bincount(groups))[groups]  # a tie group's boxes share its mean error
    return float((np.cumsum(w) / np.arange(1, len(w) + 1)).mean())


def fit_threshold(score: np.ndarray, correct: np.ndarray, target_error: float = DEFAULT_TARGET_ERROR) -> float:
    """The lowest threshold (refer: score < threshold) whose kept boxes have an error rate <= ``target_error``: the
    largest coverage that meets the target. When none does, a threshold above every score (refer everything)."""
    curve = risk_coverage(score, correct)
    if curve.empty:
        return 0.0
    ok = curve["risk"].to_numpy() <= target_error + 1e-12
    if not ok.any():
        return float(np.nextafter(curve["threshold"].iat[0], np.inf))
    return float(curve["threshold"].to_numpy()[np.flatnonzero(ok)[-1]])


def kept_error(score: np.ndarray, correct: np.ndarray, threshold: float) -> tuple[float, float]:
    """(coverage, error rate among the kept boxes) of the rule "keep score >= threshold"; error 0 when none kept."""
    score = np.asarray(score, dtype=np.float64)
    keep = score >= threshold
    correct = np.asarray(correct, dtype=bool)
    if not len(score):
        return 0.0, 0.0
    return float(keep.mean()), float((~correct[keep]).mean()) if keep.any() else 0.0


def error_at_coverage(score: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Error rate among the ``ceil(coverage * n)`` best-scored boxes."""
    score = np.asarray(score, dtype=np.float64)
    k = int(np.ceil(coverage * len(score)))
    if k <= 0:
        return 0.0
    order = np.argsort(-score, kind="stable")[:k]
    return float((~np.asarray(correct, dtype=bool)[order]).mean())


def curve_points(curve: pd.DataFrame, n: int = CURVE_POINTS) -> list[list[float]]:
    """``[coverage, risk]`` of a risk-coverage curve at ``n`` evenly spaced coverages (step function: the point with
    the smallest coverage at least as large)."""
    if curve.empty:
        return []
    cov, risk = curve["coverage"].to_numpy(), curve["risk"].to_numpy()
    grid = np.linspace(0.0, 1.0, n)[1:]
    at = np.minimum(np.searchsorted(cov, grid - 1e-12), len(cov) - 1)
    return [[round(float(g), 4), round(float(risk[i]), 5)] for g, i in zip(grid, at)]


# -------------------------------------------------------------------------------------------- prediction
CAL_PREFIX = "pcal_"  # calibrated probability columns of the per-box output: pcal_B, pcal_BA, ...
CAL_PROB_COLUMNS: tuple[str, ...] = tuple(f"{CAL_PREFIX}{c}" for c in CLASSES)
PAD_PREFIX = "pad:"  # source of a known-count box the detector did not find (cytologia.detection.fusion.PAD_PREFIX)


def calibrated_boxes(boxes: pd.DataFrame, calibration: CalibrationSpec, prob_prefix: str = "p_") -> pd.DataFrame:
    """Per box: the ensemble's probabilities (columns ``p_<class>``) recalibrated (``pcal_<class>``), ``confidence``
    and ``margin`` of its class, and the refer-to-expert flag with its reason (score below the threshold; a
    known-count pad the detector did not find). Other columns of ``boxes`` are kept, in front; row order as given."""
    cols = [f"{prob_prefix}{c}" for c in CLASSES]
    missing = [c for c in cols if c not in boxes.columns]
    if missing:
        raise CytologiaInputError(f"boxes table lacks probability column(s) {', '.join(missing[:3])}...")
    probs = boxes[cols].to_numpy(np.float64)
    cal = apply_temperature(probs, calibration.temperature) if len(probs) else probs
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    scores = reject_scores(cal, pred=pred) if len(probs) else {"confidence": np.zeros(0), "margin": np.zeros(0)}
    out = boxes.drop(columns=cols).reset_index(drop=True)
    if "class" not in out.columns:
        out["class"] = np.asarray(CLASSES, dtype=object)[pred]
    for j, c in enumerate(CAL_PROB_COLUMNS):
        out[c] = cal[:, j]
    out["confidence"] = scores["confidence"]
    out["margin"] = scores["margin"]
    reasons = [[] for _ in range(len(out))]
    r = calibration.reject
    if r is not None and r.threshold > 0:
        value = scores[r.score]
        for i in np.flatnonzero(value < r.threshold):
            reasons[i].append(f"{r.score} {value[i]:.3f} < {r.threshold:.3f}")
    if "source" in out.columns:
        for i in np.flatnonzero(out["source"].astype(str).str.startswith(PAD_PREFIX).to_numpy()):
            reasons[i].append("padded box: the detector found no cell there")
    out["refer"] = np.array([bool(x) for x in reasons], dtype=bool)
    out["refer_reason"] = ["; ".join(x) for x in reasons]
    return out


CALIBRATED_SUFFIX = "_calibrated.csv"  # the per-box output next to a submission: submission_calibrated.csv


def calibrated_path(submission: str | Path) -> Path:
    """Where :func:`write_calibrated` writes next to the submission ``submission``."""
    submission = Path(submission)
    return submission.with_name(submission.stem + CALIBRATED_SUFFIX)


def with_trustii_ids(boxes: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """The known-count ``boxes`` with the ``trustii_id`` each takes in the submission: the submission's own rule,
    :func:`cytologia.runtime.inference.assign_trustii_ids` (an image whose boxes and ids differ in number is an
    error naming it)."""
    from cytologia.runtime.inference import assign_trustii_ids

    return assign_trustii_ids(boxes, test)


def write_calibrated(
    boxes: pd.DataFrame, test: pd.DataFrame, calibration: CalibrationSpec, submission: str | Path
) -> list[str]:
    """Write the per-box calibrated output of the known-count ``boxes`` next to ``submission``
    (:func:`calibrated_path`): trustii_id, NAME, box, score, source, class (the submission's), ``pcal_<class>``,
    confidence, margin, refer, refer_reason. Returns the lines ``cytologia predict`` prints."""
    import os

    table = calibrated_boxes(with_trustii_ids(boxes, test), calibration)
    keep = [c for c in table.columns if c not in ("known_count", "open_world")]
    path = calibrated_path(submission)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table[keep].to_csv(tmp, index=False, float_format="%.6g")
    os.replace(tmp, path)
    referred = int(table["refer"].sum())
    lines = [f"wrote {path}: calibrated probabilities and refer-to-expert flags of {len(table)} boxes"]
    return lines + calibration_lines(calibration, referred, len(table))


def read_calibrated(path: str | Path) -> pd.DataFrame:
    """A per-box calibrated table (:func:`write_calibrated`), checked: NAME, class, every ``pcal_`` column and refer;
    probabilities finite, in [0, 1], each row summing to 1 (to 1e-3: the CSV keeps 6 digits)."""
    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such file (the per-box output of cytologia predict)")
    table = pd.read_csv(path, dtype={"NAME": str, "class": str}, keep_default_na=False)
    need = ["NAME", *CAL_PROB_COLUMNS, "refer"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise CytologiaInputError(f"{path}: missing column(s) {', '.join(missing[:4])}")
    probs = table[list(CAL_PROB_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | (np.abs(probs.sum(axis=1) - 1) > 1e-3)
    if bad.any():
        rows = ", ".join(str(int(i) + 2) for i in np.flatnonzero(bad)[:10])  # +2: header line, 1-based
        raise CytologiaInputError(
            f"{path}: {int(bad.sum())} row(s) with probabilities that are not a distribution (file lines {rows})"
        )
    refer = table["refer"].astype(str).str.lower()
    if not refer.isin(["true", "false"]).all():
        raise CytologiaInputError(f"{path}: column refer must hold True/False")
    table["refer"] = refer == "true"
    table[list(CAL_PROB_COLUMNS)] = probs
    return table


def calibration_lines(calibration: CalibrationSpec, referred: int, total: int) -> list[str]:
    """What ``cytologia predict`` prints about the calibration it applied."""
    if not calibration.fitted:
        return [f"no calibration in the ensemble file: temperature 1, {referred} of {total} boxes referred (pads only)"]
    r = calibration.reject
    rule = f"{r.score} < {r.threshold:.3f} (target error {r.target_error:.1%})" if r is not None else "none"
    return [
        f"calibrated: temperature {calibration.temperature:.3f}; referred to an expert: {referred} of {total} boxes "
        f"(rule {rule}, and padded boxes)"
    ]


# ------------------------------------------------------------------------------------------------ fitting
def _check_folds(data: TuneData, rows: np.ndarray) -> tuple[np.ndarray, str]:
    """Fold of each calibration row for the cross-fitted figures: the OOF folds, or two halves by a hash of the
    image name when there is one fold only."""
    fold = data.fold[rows]
    if len(np.unique(fold)) >= 2:
        return fold, "leave-one-fold-out over the OOF folds"
    halves = np.array([zlib.crc32(str(n).encode()) % 2 for n in data.names[rows]], dtype=np.int64)
    return halves, "one OOF fold: two halves of its images (crc32 of NAME)"


def fit_calibration(
    data: TuneData,
    params: Params,
    *,
    target_error: float = DEFAULT_TARGET_ERROR,
    n_bins: int = ECE_BINS,
    member_names: Mapping[str, str] | None = None,
) -> tuple[CalibrationSpec, dict[str, Any]]:
    """Fit the temperatures (each member, the ensemble) and the refer-to-expert threshold on the OOF boxes of
    ``data`` blended with the tuned ``params``; returns the spec for the ensemble file and a report (ECE before /
    after, in-sample and cross-fitted; per score: AURC, coverage and error at the target, cross-fitted; the
    reliability table and risk-coverage curve points). ``member_names`` maps OOF model names to member names.

    Rows: the classified boxes that a ground-truth box takes (each once), labelled with that truth's class."""
    if not 0.0 < target_error < 1.0:
        raise CytologiaInputError(f"target error {target_error} must be in (0, 1)")
    ok = data.eval_row >= 0
    rows, first = np.unique(data.eval_row[ok], return_index=True)
    labels = data.eval_true[ok][first]
    if len(rows) < 2:
        raise CytologiaInputError("calibration needs at least two out-of-fold boxes with a ground-truth class")
    image_prob = None if data.image_prob is None else data.image_prob[rows]
    probs = blend_probabilities(
        data.logits[:, rows], params.weights, params.bias, image_prob, data.single_cell[rows], params.multilabel_weight
    )
    pred = probs.argmax(axis=1)
    correct = pred == labels
    logp = log_probabilities(probs)
    t_ens = fit_temperature(logp, labels)
    member_t = {m: fit_temperature(data.logits[i, rows], labels) for i, m in enumerate(data.members)}
    cal = scaled_probabilities(logp, t_ens)
    used = [i for i, w in enumerate(params.weights) if w > 0]
    member_cal = [scaled_probabilities(data.logits[i, rows], member_t[data.members[i]]) for i in used]

    # cross-fitted: temperatures and thresholds fitted on the other folds, applied to the held-out one
    fold, scheme = _check_folds(data, rows)
    cross = np.empty_like(cal)
    cross_members = [np.empty_like(cal) for _ in used]
    for f in np.unique(fold):
        tr, te = fold != f, fold == f
        cross[te] = scaled_probabilities(logp[te], fit_temperature(logp[tr], labels[tr]))
        for k, i in enumerate(used):
            t = fit_temperature(data.logits[i, rows][tr], labels[tr])
            cross_members[k][te] = scaled_probabilities(data.logits[i, rows][te], t)
    all_scores = reject_scores(cal, member_cal, pred)
    cross_scores = reject_scores(cross, cross_members, pred)
    per_score: dict[str, Any] = {}
    for name in ALL_SCORES:
        held_keep = np.zeros(len(rows), dtype=bool)
        for f in np.unique(fold):
            tr, te = fold != f, fold == f
            thr = fit_threshold(all_scores[name][tr], correct[tr], target_error)
            held_keep[te] = cross_scores[name][te] >= thr
        per_score[name] = {
            "aurc": area_under_risk_coverage(cross_scores[name], correct),
            "heldout_coverage": float(held_keep.mean()),
            "heldout_error": float((~correct[held_keep]).mean()) if held_keep.any() else 0.0,
            "error_at_90_coverage": error_at_coverage(cross_scores[name], correct, 0.9),
            "usable_at_prediction": name in REJECT_SCORES,
        }
    best_any = min(ALL_SCORES, key=lambda s: (per_score[s]["aurc"], -per_score[s]["heldout_coverage"]))
    chosen = min(REJECT_SCORES, key=lambda s: (per_score[s]["aurc"], -per_score[s]["heldout_coverage"]))
    threshold = fit_threshold(all_scores[chosen], correct, target_error)
    coverage, error = kept_error(all_scores[chosen], correct, threshold)
    counts = np.bincount(labels, minlength=N_CLASSES).astype(np.float64) + 0.5  # + 1/2: no class has prior 0
    names = member_names or {}
    spec = CalibrationSpec(
        temperature=t_ens,
        member_temperatures={names.get(m, m): t for m, t in member_t.items()},
        reject=RejectSpec(score=chosen, threshold=threshold, target_error=target_error),
        class_prior=[float(v) for v in counts / counts.sum()],
        fitted=True,
    )
    curve = risk_coverage(all_scores[chosen], correct)
    report: dict[str, Any] = {
        "n_boxes": int(len(rows)),
        "accuracy": float(correct.mean()),
        "ece_bins": n_bins,
        "temperature": t_ens,
        "member_temperatures": dict(spec.member_temperatures),
        "ece_before": expected_calibration_error(probs, labels, n_bins),
        "ece_after_in_sample": expected_calibration_error(cal, labels, n_bins),
        "ece_after_heldout": expected_calibration_error(cross, labels, n_bins),
        "nll_before": nll(logp, labels),
        "nll_after": nll(logp, labels, t_ens),
        "member_ece": {
            names.get(m, m): {
                "before": expected_calibration_error(scaled_probabilities(data.logits[i, rows], 1.0), labels, n_bins),
                "after": expected_calibration_error(scaled_probabilities(data.logits[i, rows], t), labels, n_bins),
            }
            for i, (m, t) in enumerate(member_t.items())
        },
        "heldout_scheme": scheme,
        "reject": {
            "target_error": target_error,
            "scores": per_score,
            "best_score": best_any,
            "chosen": chosen,
            "threshold": threshold,
            "in_sample_coverage": coverage,
            "in_sample_error": error,
            "note": (
                f"{best_any} has the lowest AURC but needs every member's output at prediction time; using {chosen}"
                if best_any != chosen
                else f"{chosen} has the lowest AURC (cross-fitted) of {', '.join(ALL_SCORES)}"
            ),
        },
        "reliability_before": _records(reliability_table(probs, labels, n_bins)),
        "reliability_after": _records(reliability_table(cross, labels, n_bins)),
        "risk_coverage": {name: curve_points(risk_coverage(cross_scores[name], correct)) for name in ALL_SCORES},
        "risk_coverage_in_sample": curve_points(curve),
    }
    return spec, report


def evaluate_calibrated(
    calibrated: pd.DataFrame, submission: pd.DataFrame, truth: pd.DataFrame, calibration: CalibrationSpec
) -> dict[str, Any]:
    """Calibration and referral measured against known truth (a generated test set): each truth box takes the
    submission row the challenge score matches it with (:func:`cytologia.metrics.score`); that row's calibrated
    probabilities (``calibrated``, by trustii_id) and its class are scored against the truth's class (a row several
    truth boxes take counts once, with the first). Returns ECE before (probabilities recovered as ``softmax(T log
    pcal)``) and after, reliability tables, the risk-coverage curve of each score, the error at 90 % coverage and
    the coverage and error of the file's refer rule."""
    from cytologia.metrics import score

    m = score(truth, submission).matched
    m = m[m["pred_row"].to_numpy() >= 0].drop_duplicates("pred_row")
    ids = pd.to_numeric(submission["trustii_id"]).to_numpy(np.int64)[m["pred_row"].to_numpy(np.int64)]
    by_id = calibrated.assign(trustii_id=pd.to_numeric(calibrated["trustii_id"]).astype(np.int64))
    rows = by_id.set_index("trustii_id").loc[ids]
    known = m["class"].isin(CLASSES).to_numpy()
    rows, m = rows[known], m[known]
    labels = m["class"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(np.int64)
    cal = rows[list(CAL_PROB_COLUMNS)].to_numpy(np.float64)
    before = apply_temperature(cal, 1.0 / calibration.temperature)
    correct = (rows["class"].to_numpy() == m["class"].to_numpy()).astype(bool)
    scores = reject_scores(cal, pred=cal.argmax(axis=1))
    out: dict[str, Any] = {
        "n_boxes": int(len(labels)),
        "accuracy": float(correct.mean()) if len(correct) else 0.0,
        "ece_bins": ECE_BINS,
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(cal, labels),
        "reliability_before": _records(reliability_table(before, labels)),
        "reliability_after": _records(reliability_table(cal, labels)),
        "risk_coverage": {k: curve_points(risk_coverage(v, correct)) for k, v in scores.items()},
        "error_at_90_coverage": {k: error_at_coverage(v, correct, 0.9) for k, v in scores.items()},
    }
    r = calibration.reject
    if r is not None:
        referred = rows["refer"].to_numpy(bool) if "refer" in rows.columns else scores[r.score] < r.threshold
        kept = ~referred
        out["refer_rule"] = {
            "score": r.score,
            "threshold": r.threshold,
            "target_error": r.target_error,
            "coverage": float(kept.mean()) if len(kept) else 0.0,
            "error": float((~correct[kept]).mean()) if kept.any() else 0.0,
        }
    return out


def _records(table: pd.DataFrame) -> list[dict[str, float | None]]:
    return [
        {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
        for row in table.astype(object).to_dict("records")
    ]


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """What ``cytologia tune`` prints about the calibration it fitted."""
    r = report["reject"]
    s = r["scores"][r["chosen"]]
    return [
        f"calibration on {report['n_boxes']} OOF boxes: temperature {report['temperature']:.3f}; ECE "
        f"({report['ece_bins']} bins) {report['ece_before']:.4f} -> {report['ece_after_heldout']:.4f} (cross-fitted)",
        f"refer to an expert: {r['chosen']} < {r['threshold']:.3f} for <= {r['target_error']:.1%} errors on the kept "
        f"boxes; cross-fitted: {s['heldout_coverage']:.1%} kept, {s['heldout_error']:.1%} errors ({r['note']})",
    ]
