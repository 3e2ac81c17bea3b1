"""The classifier ensemble: blend rule, weights tuned on out-of-fold logits, and the ensemble file.

Blend rule (``logit_mean``), the same in tuning and at prediction time (:func:`blend_probabilities`): each cell
member contributes the first 23 columns of its logits (a member trained with a 24th "background" label loses it:
every challenge box needs a cell class), the members' logits are summed with weights on the simplex (``w >= 0``,
``sum w = 1``: the blend keeps the scale of one member's logits), an optional per-class bias is added, and the
softmax gives the probabilities. When the ensemble has a multi-label full-image member, its per-class sigmoids
(normalised to sum 1) are mixed in on **single-cell images** only, ``p = (1 - a) p_cells + a p_image`` -- the 1st
place's rule; on a multi-cell image a full-image label cannot say which cell it belongs to.

Tuning (:func:`tune`) maximises the challenge score on out-of-fold (OOF) logits. For a fixed set of boxes the
score's box term does not depend on the classifiers, so the objective is its F1 part: scikit-learn's macro-F1 over
ground-truth rows, each taking the class of its matched box (its own box for ground-truth crops; the detected box of
best GIoU for crops of detected boxes, ``None`` when its image has no box), over the union of true and predicted
labels. It is piecewise constant in the weights, so the optimiser is derivative-free:

1. coordinate ascent on the simplex from two starts (uniform weights and the best single member): for each member
   in turn, a 21-point line search moving weight between it and the others, until a full pass gains nothing;
2. Nelder-Mead (scipy) on softmax-parametrised weights from that point, on F1 plus a 1e-3 x mean log-probability
   tie-break that gives the flat steps a slope; its result is kept only when its F1 is at least as high;
3. the multi-label weight ``a`` by a 21-point grid on [0, 1];
4. optionally (``class_bias=True``) per-class logit biases by coordinate ascent (11 offsets per class, 3 passes).

Held-out check: every fold in turn is held out, the ensemble is tuned on the others and scored on it; the held-out
predictions of all folds are pooled into one macro-F1 (cross-fitting), compared with the single member that scores
best on the tuning folds (scored on the held-out fold) and with equal weights. With OOF logits of only one fold the
images are split in two halves by a hash of their name. The weights written to the file are tuned on every fold.

The ensemble file (JSON, or YAML for a ``.yaml``/``.yml`` path) holds everything :mod:`cytologia.runtime.pipeline`
needs: the members (architecture, input size, margin, flip TTA, per-fold checkpoints and/or ONNX files, weight),
the blend (rule, class biases, multi-label weight), the detector (per-fold checkpoints/ONNX, input size, NMS,
flip TTA, weighted box fusion and open-world settings) and the tuning report. Relative paths are relative to the
file's folder, so a folder holding the file and its models can be moved as one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytologia.data.errors import CytologiaInputError, ValidationError
from cytologia.data.schema import BOX_COLUMNS, CLASSES

log = logging.getLogger(__name__)

VERSION = 1
N_CLASSES = len(CLASSES)
NONE_CODE = N_CLASSES  # label code of "None" (a truth box whose image has no prediction) in the F1
BLEND_RULES: tuple[str, ...] = ("logit_mean",)
KINDS: tuple[str, ...] = ("cell", "multilabel")
FLIP_SUFFIX = "+hflip"  # OOF model name of the mean of plain and mirrored logits (classification stage)
GRID_POINTS = 21  # line-search points per coordinate (weights and the multi-label weight): steps of 0.05
BIAS_POINTS = 11  # offsets tried per class bias, spread over +-1 standard deviation of the blended logits
BIAS_PASSES = 3
MAX_PASSES = 10  # coordinate-ascent passes over the members (it usually stops after 2-3)
TIE_BREAK = 1e-3  # weight of the mean log-probability of the true class in the Nelder-Mead objective
F1_WEIGHT = 0.8  # the challenge: 0.2 * mean rescaled GIoU + 0.8 * macro-F1
_EPS = 1e-12


# ------------------------------------------------------------------------------------------------ the ensemble file
@dataclass
class MemberSpec:
    """One classifier of the ensemble; at prediction time its logits are the mean over its fold models (and over the
    plain and mirrored crop with ``tta_flip``)."""

    name: str
    kind: str = "cell"  # "cell": crop of a box plus margin; "multilabel": the full image, per-class sigmoids
    arch: str | None = None  # registry/timm name (informative: checkpoints and ONNX files carry their architecture)
    img_size: int = 224
    margin: float = 16.0  # px around the box (cell members)
    tta_flip: bool = False
    num_labels: int = N_CLASSES  # 23, or 24 with "background" last
    weight: float = 1.0
    checkpoints: list[str] = field(default_factory=list)  # one per fold: the classification stage's best.ckpt
    onnx: list[str] = field(default_factory=list)  # one per fold: exported graphs (input "image", output "logits")
    oof_model: str | None = None  # the OOF ``model`` name its weight was tuned on


@dataclass
class DetectorSpec:
    """The single-class detector: one or more fold models, fused by weighted box fusion when there are several
    passes (folds x flip)."""

    backend: str = "ultralytics"
    arch: str | None = None
    img_size: int = 512
    checkpoints: list[str] = field(default_factory=list)
    onnx: list[str] = field(default_factory=list)
    conf: float = 0.001  # low: the known-count rule keeps the top-N whatever their score
    nms_iou: float = 0.6
    max_det: int = 50
    tta_flip: bool = False
    wbf_iou: float = 0.55
    wbf_skip: float = 0.0
    wbf_conf_type: str = "avg"
    open_world_score: float = 0.25  # open-world mode: score threshold, then class-agnostic NMS at this IoU
    open_world_iou: float = 0.5


@dataclass
class BlendSpec:
    rule: str = "logit_mean"
    class_bias: list[float] | None = None  # one per class (23), added to the blended logits
    multilabel_weight: float = 0.0  # share of the multi-label member on single-cell images


@dataclass
class Ensemble:
    members: list[MemberSpec]
    blend: BlendSpec = field(default_factory=BlendSpec)
    detector: DetectorSpec | None = None
    tuning: dict[str, Any] = field(default_factory=dict)  # the tuning report (held-out gain, ...)
    version: int = VERSION
    base_dir: Path | None = field(default=None, compare=False)  # folder relative paths resolve against (not saved)

    @property
    def cell_members(self) -> list[MemberSpec]:
        return [m for m in self.members if m.kind == "cell"]

    @property
    def multilabel_member(self) -> MemberSpec | None:
        found = [m for m in self.members if m.kind == "multilabel"]
        return found[0] if found else None

    def weights(self) -> np.ndarray:
        """Cell members' weights as a float64 array that sums to 1."""
        w = np.array([m.weight for m in self.cell_members], dtype=np.float64)
        return w / w.sum()

    def resolve(self, path: str) -> Path:
        """A path of the file, absolute (relative paths are relative to the file's folder)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The file's content; paths rewritten relative to ``relative_to`` where they lie below it."""
        out = asdict(self)
        out.pop("base_dir")

        def rel(path: str) -> str:
            absolute = self.resolve(path)
            if relative_to is None:
                return str(path)
            try:
                return os.path.relpath(absolute, relative_to) if absolute.is_relative_to(relative_to) else str(absolute)
            except ValueError:  # another drive on Windows
                return str(absolute)

        for member in out["members"]:
            member["checkpoints"] = [rel(p) for p in member["checkpoints"]]
            member["onnx"] = [rel(p) for p in member["onnx"]]
        if out["detector"] is not None:
            out["detector"]["checkpoints"] = [rel(p) for p in out["detector"]["checkpoints"]]
            out["detector"]["onnx"] = [rel(p) for p in out["detector"]["onnx"]]
        return {"version": out.pop("version"), **out}


def _from_dict(cls: type, data: Any, where: str, source: str) -> Any:
    """A dataclass from a mapping; unknown keys and wrong types are errors naming ``where`` in ``source``."""
    if not isinstance(data, dict):
        raise CytologiaInputError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls) if f.name != "base_dir"}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CytologiaInputError(
            f"{source}: unknown key(s) {', '.join(unknown)} in {where}; known: {', '.join(known)}"
        )
    try:
        return cls(**data)
    except TypeError as err:
        raise CytologiaInputError(f"{source}: {where}: {err}") from None


def _check_number(value: Any, key: str, source: str, *, low: float | None = None, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer()) and (low is None or value >= low)
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise CytologiaInputError(
            f"{source}: {key}={value!r} must be {what}" + (f" >= {low}" if low is not None else "")
        )


def check_ensemble(ens: Ensemble, source: str = "<ensemble>") -> Ensemble:
    """Check values and relations (kinds, sizes, weights, bias length, one multi-label member at most)."""
    if not ens.members:
        raise CytologiaInputError(f"{source}: the ensemble has no member")
    names = [m.name for m in ens.members]
    if len(set(names)) != len(names):
        raise CytologiaInputError(f"{source}: member names repeat: {names}")
    for i, m in enumerate(ens.members):
        key = f"members[{i}] ({m.name})"
        if m.kind not in KINDS:
            raise CytologiaInputError(f"{source}: {key}.kind={m.kind!r} is not one of {', '.join(KINDS)}")
        _check_number(m.img_size, f"{key}.img_size", source, low=1, integer=True)
        _check_number(m.margin, f"{key}.margin", source, low=0)
        _check_number(m.weight, f"{key}.weight", source, low=0)
        if m.num_labels not in (N_CLASSES, N_CLASSES + 1):
            raise CytologiaInputError(
                f"{source}: {key}.num_labels={m.num_labels} must be {N_CLASSES} or {N_CLASSES + 1}"
            )
        for what in ("checkpoints", "onnx"):
            value = getattr(m, what)
            if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
                raise CytologiaInputError(f"{source}: {key}.{what} must be a list of paths")
    if len([m for m in ens.members if m.kind == "multilabel"]) > 1:
        raise CytologiaInputError(f"{source}: at most one multilabel member is supported")
    cells = ens.cell_members
    if not cells:
        raise CytologiaInputError(f"{source}: the ensemble needs at least one cell member (kind: cell)")
    if sum(m.weight for m in cells) <= 0:
        raise CytologiaInputError(f"{source}: the cell members' weights sum to 0")
    b = ens.blend
    if b.rule not in BLEND_RULES:
        raise CytologiaInputError(f"{source}: blend.rule={b.rule!r} is not one of {', '.join(BLEND_RULES)}")
    if b.class_bias is not None and (
        len(b.class_bias) != N_CLASSES
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in b.class_bias)
    ):
        raise CytologiaInputError(f"{source}: blend.class_bias must hold {N_CLASSES} finite numbers (or be null)")
    if not (isinstance(b.multilabel_weight, (int, float)) and 0.0 <= b.multilabel_weight <= 1.0):
        raise CytologiaInputError(f"{source}: blend.multilabel_weight={b.multilabel_weight!r} must be in [0, 1]")
    d = ens.detector
    if d is not None:
        _check_number(d.img_size, "detector.img_size", source, low=32, integer=True)
        if d.img_size % 32:
            raise CytologiaInputError(f"{source}: detector.img_size={d.img_size} must be a multiple of 32")
        _check_number(d.max_det, "detector.max_det", source, low=1, integer=True)
        for key in ("conf", "nms_iou", "wbf_iou", "wbf_skip", "open_world_score", "open_world_iou"):
            value = getattr(d, key)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise CytologiaInputError(f"{source}: detector.{key}={value!r} must be in [0, 1]")
        if d.wbf_conf_type not in ("avg", "max"):
            raise CytologiaInputError(f"{source}: detector.wbf_conf_type={d.wbf_conf_type!r} must be avg or max")
    return ens


def ensemble_from_dict(data: Any, source: str = "<ensemble>", base_dir: Path | None = None) -> Ensemble:
    """An :class:`Ensemble` from the file's content (see :meth:`Ensemble.to_dict`), checked."""
    if not isinstance(data, dict):
        raise CytologiaInputError(f"{source}: expected a mapping at the top level")
    data = dict(data)
    version = data.pop("version", VERSION)
    if version != VERSION:
        raise CytologiaInputError(f"{source}: ensemble file version {version!r}; this cytologia reads {VERSION}")
    unknown = sorted(set(data) - {"members", "blend", "detector", "tuning"})
    if unknown:
        raise CytologiaInputError(f"{source}: unknown top-level key(s) {', '.join(unknown)}")
    members_raw = data.get("members")
    if not isinstance(members_raw, list):
        raise CytologiaInputError(f"{source}: members must be a list")
    members = [_from_dict(MemberSpec, m, f"members[{i}]", source) for i, m in enumerate(members_raw)]
    blend = _from_dict(BlendSpec, data.get("blend") or {}, "blend", source)
    det_raw = data.get("detector")
    detector = None if det_raw is None else _from_dict(DetectorSpec, det_raw, "detector", source)
    tuning = data.get("tuning") or {}
    ens = Ensemble(members=members, blend=blend, detector=detector, tuning=dict(tuning), base_dir=base_dir)
    return check_ensemble(ens, source)


def read_ensemble(path: str | Path) -> Ensemble:
    """Read and check an ensemble file (``.json``, ``.yaml``/``.yml``)."""
    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such ensemble file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (json.JSONDecodeError, ValueError) as err:
        raise CytologiaInputError(f"{path}: not a readable ensemble file: {err}") from None
    return ensemble_from_dict(data, str(path), base_dir=path.resolve().parent)


def write_ensemble(ens: Ensemble, path: str | Path) -> Path:
    """Check and write the ensemble file atomically; paths below its folder are written relative to it."""
    path = Path(path)
    check_ensemble(ens, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ens.to_dict(relative_to=path.resolve().parent)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=1) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------ the blend
def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax (float32 input stays float32: tuning evaluates it hundreds of times; else float64)."""
    z = np.asarray(z)
    z = z if z.dtype == np.float32 else z.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def multilabel_probabilities(logits: np.ndarray) -> np.ndarray:
    """Per-class sigmoids of a multi-label model's first 23 logits, normalised to sum 1 per row."""
    z = np.asarray(logits, dtype=np.float64)[..., :N_CLASSES]
    s = 1.0 / (1.0 + np.exp(-z))
    return s / np.maximum(s.sum(axis=-1, keepdims=True), _EPS)


def blend_logits(member_logits: np.ndarray, weights: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``sum_m w_m z_m[:, :23] + bias``: ``member_logits`` is (M, n, K >= 23), ``weights`` (M,) on the simplex."""
    logits = np.asarray(member_logits)[..., :N_CLASSES]
    # float32 logits stay float32 (a matrix-vector product, no float64 copy of the whole stack)
    dtype = np.float32 if logits.dtype == np.float32 else np.float64
    z = np.tensordot(np.asarray(weights, dtype), logits, axes=1)
    return z + np.asarray(bias, dtype) if bias is not None else z


def blend_probabilities(
    member_logits: np.ndarray,
    weights: np.ndarray,
    bias: np.ndarray | None = None,
    image_prob: np.ndarray | None = None,
    single_cell: np.ndarray | None = None,
    multilabel_weight: float = 0.0,
) -> np.ndarray:
    """The ensemble's class probabilities (n, 23); see the module docstring. ``image_prob`` (n, 23) is the
    multi-label member's :func:`multilabel_probabilities` of each box's image (NaN rows: none), mixed in where
    ``single_cell`` is true."""
    p = softmax(blend_logits(member_logits, weights, bias))
    if image_prob is not None and multilabel_weight > 0:
        use = np.isfinite(image_prob).all(axis=1)
        if single_cell is not None:
            use &= np.asarray(single_cell, dtype=bool)
        p[use] = (1.0 - multilabel_weight) * p[use] + multilabel_weight * image_prob[use]
    return p


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
        members=members, logits=logits, names=names, fold=fold, single_cell=single, eval_row=eval_row,
        eval_true=true_codes, eval_fold=eval_fold.astype(np.int64), image_prob=image_prob, multilabel=multilabel,
        giou=giou,
    )  # fmt: skip


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


def optimise(data: TuneData, eval_mask: np.ndarray, *, class_bias: bool = False) -> tuple[Params, dict[str, Any]]:
    """Tune the blend on the evaluation rows ``eval_mask``; returns the parameters and a trace of the steps."""
    obj = _Objective(data, eval_mask)
    m_count = data.n_members
    grid = np.linspace(0.0, 1.0, GRID_POINTS)
    singles = [obj(Params(np.eye(m_count)[i])) for i in range(m_count)]
    trace: dict[str, Any] = {"single_member_f1": dict(zip(data.members, singles))}
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


def tune(data: TuneData, *, class_bias: bool = False, heldout: bool = True) -> TuneResult:
    """Tune on every fold (the weights to use) and, with ``heldout``, cross-fit the held-out check; see the module
    docstring. The report holds macro-F1s, the challenge-score equivalents and the gain over the best member."""
    everything = np.ones(len(data.eval_row), dtype=bool)
    params, trace = optimise(data, everything, class_bias=class_bias)
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
    if heldout:
        report["heldout"] = heldout_check(data, class_bias=class_bias)
    return TuneResult(params, report)


def heldout_check(data: TuneData, *, class_bias: bool = False) -> dict[str, Any]:
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
        params, trace = optimise(data, tune_mask, class_bias=class_bias)
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
        lines.append(f"OOF logits from checkpoints chosen by (trainer.select): {modes}" + (
            f" -- best_val picked the epoch on the held-out fold itself: the OOF figures of {', '.join(peeked)} and "
            "the tuned gain are optimistic" if peeked else ""))  # fmt: skip
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
