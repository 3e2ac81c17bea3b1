"""The challenge score: ``0.2 * mean(rescaled GIoU) + 0.8 * macro-F1``, vectorised (no Python loop over images).

Rules (MISSION.md "The score"), in the order the challenge's reference evaluation applies them:

1. A prediction row is kept only if its ``trustii_id`` is a truth id and its ``NAME`` is that id's image. Of the
   kept rows the first per ``trustii_id`` (file order) wins; then rows of one image with the same
   (x1, y1, x2, y2, class) collapse to the first one.
2. Each truth box takes the kept prediction of its image with the highest GIoU (several truth boxes may take the
   same prediction); ties go to the earlier prediction row. Its GIoU ``g`` is rescaled to ``(g + 1) / 2``.
3. A truth box whose image has no kept prediction scores rescaled GIoU 0 and gets the class ``"None"``.
4. Macro-F1 is scikit-learn's ``f1_score(average="macro")`` over (true, predicted) class of every truth row: the
   average runs over every label present in the truth **or** the predictions, so "None", any string that is not a
   class, or a class absent from the truth adds a label with F1 0.

Fidelity to the reference evaluation (a per-image pandas loop, ``compute_cytologia_metric``; a public copy is in
github.com/xueerchen1990/cytologia_2nd_place, scripts/metrics.py), on purpose:

- GIoU is its formula: box areas are *not* clipped (an inverted box has a negative or a positive area), and both
  divisions are guarded with ``max(denominator, 1e-7)``. For valid boxes this is the textbook GIoU.
- A prediction with a missing or non-numeric coordinate is read as NaN (the reference reads a blank cell as NaN
  and would crash on text). Its GIoU is NaN, and the reference picks the best prediction with ``np.argmax``, which
  returns the first NaN: the first such prediction of an image takes every truth box of that image, with its
  class, and scores the worst rescaled GIoU, 0 (the reference's ``fillna(0)``).
- Class and name strings are compared exactly as written: readers use ``keep_default_na=False`` so "None", "NA" or
  "" stay those strings whatever the pandas version. (The reference read with pandas' defaults, which turn such
  cells into NaN and then, via ``astype(str)``, into "nan" -- or leave NaN under pandas 3; nothing here calls
  ``astype(str)``.) A predicted "None" is therefore the same label as the "None" of an image without prediction.
  In a DataFrame given to :func:`score`, a missing value (None/NaN) in NAME or class is the empty string, the
  value an empty CSV cell has.
- A ``trustii_id`` is compared by numeric value (``"7"``, ``7`` and ``7.0`` are the same id); a prediction id that
  is not an integer value (``"abc"``, ``7.5``, blank) matches no truth id and is counted as an unknown id.

Every prediction row that does not count is counted in :class:`ScoreResult` (unknown id, wrong NAME, repeated
id, duplicate box) -- nothing is dropped silently. :mod:`cytologia.metrics_reference` is the plain loop these
numbers are tested against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cytologia.boxes import EPS, giou_columns
from cytologia.data.schema import BOX_COLUMNS, CLASSES, NO_PREDICTION, SUBMISSION_COLUMNS
from cytologia.errors import CytologiaInputError, ValidationError

log = logging.getLogger(__name__)

GIOU_WEIGHT = 0.2
F1_WEIGHT = 0.8
GIOU_EPS = EPS  # the reference's floor on the union and enclosing areas before dividing (cytologia.boxes)
MAX_PROBLEMS = 20  # problems listed in one validation error (the total is always given)
TRUTH_COLUMNS: tuple[str, ...] = SUBMISSION_COLUMNS  # trustii_id, NAME, x1, y1, x2, y2, class


@dataclass(frozen=True, eq=False)  # eq=False: results compare by identity (a DataFrame has no plain ==)
class ScoreResult:
    """The score and what it is made of. ``per_class_f1``, ``support`` and ``confusion`` are indexed by ``labels``
    (every label of the truth or the predictions, sorted)."""

    score: float
    giou: float  # mean rescaled GIoU over truth rows, in [0, 1] for valid boxes
    f1: float  # macro-F1 over ``labels``
    labels: tuple[str, ...]
    per_class_f1: dict[str, float]
    support: dict[str, int]  # truth rows per label (0 for a label only predicted)
    confusion: pd.DataFrame  # rows: true label, columns: predicted label
    n_truth: int
    n_images: int
    n_images_without_prediction: int
    n_pred_rows: int  # rows of the prediction table
    n_pred_kept: int  # rows that take part in the matching
    n_pred_unknown_id: int  # trustii_id not a truth id (or not an integer)
    n_pred_wrong_name: int  # trustii_id of the truth, but NAME is not that id's image
    n_pred_repeated_id: int  # a later row of an already kept trustii_id
    n_pred_duplicate: int  # same image, box and class as an earlier kept row
    n_pred_bad_box: int  # kept rows with a missing or non-numeric coordinate
    _columns: dict[str, np.ndarray] = field(repr=False, compare=False)  # the per-truth-box arrays of ``matched``

    @cached_property
    def matched(self) -> pd.DataFrame:
        """One row per truth box, see :func:`score` (built on first use: scoring alone does not pay for it)."""
        return pd.DataFrame(self._columns)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary: the score, its parts, every count and the per-label F1 and support."""
        return {
            "score": self.score,
            "giou": self.giou,
            "f1": self.f1,
            "n_truth": self.n_truth,
            "n_images": self.n_images,
            "n_images_without_prediction": self.n_images_without_prediction,
            "n_pred_rows": self.n_pred_rows,
            "n_pred_kept": self.n_pred_kept,
            "n_pred_unknown_id": self.n_pred_unknown_id,
            "n_pred_wrong_name": self.n_pred_wrong_name,
            "n_pred_repeated_id": self.n_pred_repeated_id,
            "n_pred_duplicate": self.n_pred_duplicate,
            "n_pred_bad_box": self.n_pred_bad_box,
            "n_labels": len(self.labels),
            "per_class_f1": self.per_class_f1,
            "support": self.support,
        }


def giou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Generalised IoU of paired boxes ``a[i]`` vs ``b[i]`` (``(n, 4)`` x1, y1, x2, y2 arrays), as the reference
    computes it: unclipped areas, divisions guarded by ``max(., 1e-7)``; NaN coordinates give NaN."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    return giou_columns(*a.T, *b.T)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, tuple[str, ...], np.ndarray, pd.DataFrame]:
    """scikit-learn's macro F1 over the sorted union of labels; returns (macro F1, labels, per-label F1, confusion).

    Values are compared as strings (:func:`as_text`); missing values are "".
    """
    t_codes, t_labels = pd.factorize(as_text(pd.Series(np.asarray(y_true, dtype=object))))
    p_codes, p_labels = pd.factorize(as_text(pd.Series(np.asarray(y_pred, dtype=object))))
    names, (t_map, p_map) = _label_union(list(t_labels), list(p_labels))
    return _macro_f1_codes(t_map[t_codes], p_map[p_codes], names)


def _label_union(*label_lists: list[str]) -> tuple[list[str], list[np.ndarray]]:
    """One list of the distinct labels, and for each input list the index of its labels in that list."""
    index: dict[str, int] = {}
    maps = [np.array([index.setdefault(x, len(index)) for x in labels], dtype=np.int64) for labels in label_lists]
    return list(index), maps


def _macro_f1_codes(
    y_true: np.ndarray, y_pred: np.ndarray, names: list[str]
) -> tuple[float, tuple[str, ...], np.ndarray, pd.DataFrame]:
    """:func:`macro_f1` of label codes (indices into ``names``): only labels that occur count, sorted by name."""
    k0 = len(names)
    present = np.flatnonzero((np.bincount(y_true, minlength=k0) + np.bincount(y_pred, minlength=k0)) > 0)
    ordered = sorted(present.tolist(), key=lambda i: names[i])
    labels = tuple(names[i] for i in ordered)
    remap = np.zeros(k0, dtype=np.int64)
    remap[ordered] = np.arange(len(ordered))
    k, t, p = len(labels), remap[y_true], remap[y_pred]
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    # F1 = 2PR/(P+R) = 2TP/(2TP+FP+FN); scikit-learn gives 0 where TP = 0. A label that occurs always has
    # denom > 0; the guard only keeps numpy quiet.
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    confusion = pd.DataFrame(cm, index=pd.Index(labels, name="true"), columns=pd.Index(labels, name="pred"))
    return (float(f1.mean()) if k else 0.0), labels, f1, confusion


def as_text(series: pd.Series) -> np.ndarray:
    """The values of a column as Python strings (object array); missing values become "" (never "nan"/"<NA>")."""
    values = series.to_numpy(dtype=object)
    if pd.api.types.infer_dtype(values, skipna=False) == "string":  # all str: nothing missing (the usual case)
        return values
    values = series.to_numpy(dtype=object, na_value="")
    return np.array([v if isinstance(v, str) else str(v) for v in values], dtype=object)


def coordinates(frame: pd.DataFrame) -> np.ndarray:
    """``(n, 4)`` float64 x1, y1, x2, y2 (column-major); a missing or non-numeric value is NaN."""
    out = np.empty((len(frame), 4), dtype=np.float64, order="F")
    for j, col in enumerate(BOX_COLUMNS):
        values = frame[col]
        if not (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)):
            values = pd.to_numeric(values, errors="coerce")
        out[:, j] = values.to_numpy(dtype=np.float64, na_value=np.nan)
    return out


def _id_values(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ids, valid mask): an id is valid when it is a finite integer value; invalid ids are 0 in the array."""
    if pd.api.types.is_integer_dtype(series) and not series.isna().any():
        return series.to_numpy(dtype=np.int64), np.ones(len(series), dtype=bool)
    num = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    # 2**62 keeps the cast to int64 exact-or-harmless; no real id comes near it.
    valid = np.isfinite(num) & (num == np.floor(num)) & (np.abs(num) < 2.0**62)
    return np.where(valid, num, 0).astype(np.int64), valid


def _repeated(ids: np.ndarray) -> np.ndarray:
    """Mask of the entries whose value already occurred earlier in ``ids``."""
    later = np.zeros(len(ids), dtype=bool)
    if len(ids) < 2:
        return later
    lo = int(ids.min())
    if int(ids.max()) - lo < 4 * len(ids) + 1024 and np.bincount(ids - lo).max() <= 1:
        return later  # dense ids (the usual 0..n-1) without a repeat: counting is enough
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    later[order[1:][sorted_ids[1:] == sorted_ids[:-1]]] = True
    return later


def _repeated_rows(columns: list[np.ndarray]) -> np.ndarray:
    """Mask of the rows equal, in every column, to an earlier row; NaN equals NaN (as in pandas' duplicated)."""
    n = len(columns[0])
    order = np.lexsort(columns[::-1])  # stable: equal rows end up adjacent, in their original order
    same = np.ones(max(n - 1, 0), dtype=bool)
    for col in columns:
        a, b = col[order][1:], col[order][:-1]
        same &= (a == b) | (np.isnan(a) & np.isnan(b)) if col.dtype.kind == "f" else a == b
    later = np.zeros(n, dtype=bool)
    later[order[1:][same]] = True
    return later


def _missing_columns(frame: pd.DataFrame, columns: tuple[str, ...], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = ",".join(map(str, frame.columns))
        raise ValidationError(
            source, [(None, f"missing column(s) {', '.join(missing)}; expected {','.join(columns)}, found {found}")]
        )


class TruthParts(NamedTuple):
    """A validated truth table as arrays (see :func:`truth_parts`)."""

    ids: np.ndarray  # int64 trustii_id, unique
    names: np.ndarray  # NAME strings (object)
    classes: np.ndarray  # class strings (object)
    boxes: np.ndarray  # (n, 4) float64, finite
    image: np.ndarray  # image index of each row, in order of first appearance
    n_images: int
    class_codes: np.ndarray  # index of each row's class in class_labels
    class_labels: list[str]


def truth_parts(truth: pd.DataFrame, source: str = "truth") -> TruthParts:
    """Validate a truth table; a :class:`ValidationError` names ``source`` and the rows.

    The truth must have unique integer ``trustii_id``, finite numeric coordinates and non-empty NAME and class.
    Rows are 1-based data rows (row 1 is the line after the header).
    """
    _missing_columns(truth, TRUTH_COLUMNS, source)
    ids, valid_id = _id_values(truth["trustii_id"])
    names = as_text(truth["NAME"])
    classes = as_text(truth["class"])
    boxes = coordinates(truth)
    image, image_names = pd.factorize(names)
    class_codes, class_labels = pd.factorize(classes)
    problems: list[tuple[int | None, str]] = []
    for i in np.flatnonzero(~valid_id)[:MAX_PROBLEMS]:
        problems.append((int(i) + 1, f"trustii_id is not an integer: {truth['trustii_id'].iloc[i]!r}"))
    valid_rows = np.flatnonzero(valid_id)
    dup = valid_rows[_repeated(ids[valid_rows])]
    if len(dup):
        uniq, first = np.unique(ids[valid_rows], return_index=True)  # index of each id's first occurrence
        first_row = dict(zip(uniq.tolist(), (valid_rows[first] + 1).tolist()))
        for i in dup[:MAX_PROBLEMS]:
            problems.append((int(i) + 1, f"trustii_id {ids[i]} is repeated (first at row {first_row[int(ids[i])]})"))
    bad_box = ~np.isfinite(boxes)
    bad_box_rows = np.flatnonzero(bad_box.any(axis=1))
    for i in bad_box_rows[:MAX_PROBLEMS]:
        shown = ", ".join(f"{c}={truth[c].iloc[i]!r}" for j, c in enumerate(BOX_COLUMNS) if bad_box[i, j])
        problems.append((int(i) + 1, f"coordinate is missing, non-numeric or infinite: {shown}"))
    # Empty strings are looked for among the distinct values only (23 classes, one name per image).
    empty = {}
    for what, codes, labels in (("NAME", image, image_names), ("class", class_codes, class_labels)):
        code = np.flatnonzero(np.asarray(labels, dtype=object) == "")
        empty[what] = np.flatnonzero(codes == code[0]) if len(code) else np.zeros(0, dtype=np.int64)
    for what, rows in empty.items():
        problems.extend((int(i) + 1, f"{what} is empty") for i in rows[:MAX_PROBLEMS])
    total = int((~valid_id).sum() + len(dup) + len(bad_box_rows) + len(empty["NAME"]) + len(empty["class"]))
    if total:
        problems.sort(key=lambda p: p[0] or 0)
        raise ValidationError(source, list(problems[:MAX_PROBLEMS]), total)
    return TruthParts(ids, names, classes, boxes, image, len(image_names), class_codes, list(class_labels))


def _read_csv(path: Path) -> pd.DataFrame:
    """Every column as the exact text of the file (no NA detection: "None", "NA", "" stay strings)."""
    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such file")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CytologiaInputError(f"{path}: not a readable CSV table: {err}") from err


class UnknownClass(NamedTuple):
    """A class string of a truth table that is not one of the 23 classes (see :func:`unknown_classes`)."""

    label: str
    count: int  # truth rows holding it
    rows: tuple[int, ...]  # its first MAX_ROWS_SHOWN 1-based data rows


MAX_ROWS_SHOWN = 5  # rows listed per unknown class


def unknown_classes(classes: pd.Series | np.ndarray) -> list[UnknownClass]:
    """The strings of a truth ``class`` column (in file order) that are not among the 23 classes, in order of first
    appearance, with their row counts and first rows (1-based data rows)."""
    values = pd.Series(np.asarray(classes, dtype=object))
    positions = np.flatnonzero(~values.isin(CLASSES).to_numpy())
    if not len(positions):
        return []
    rows = pd.Series(positions + 1).groupby(values.iloc[positions].to_numpy(), sort=False)
    return [UnknownClass(str(label), len(group), tuple(group.iloc[:MAX_ROWS_SHOWN].tolist())) for label, group in rows]


def _unknown_text(item: UnknownClass) -> str:
    shown = ", ".join(map(str, item.rows)) + (", ..." if item.count > len(item.rows) else "")
    return f"class {item.label!r} is not one of the {len(CLASSES)} classes: {item.count} row(s) (rows {shown})"


def read_truth(path: str | Path, assign_ids: bool = False, *, strict: bool = False) -> pd.DataFrame:
    """Read and validate a truth table ``trustii_id,NAME,x1,y1,x2,y2,class`` (errors name the file and row).

    With ``assign_ids`` a table without ``trustii_id`` (``train.csv``) gets ids 0..n-1 in file order.
    Returns trustii_id as int64, coordinates as float64, NAME and class as the exact strings of the file.
    A class that is not one of the 23 (:func:`unknown_classes`) is scored as the reference scores it -- one more
    label in the macro average -- and logged as a warning naming the file, the class, its count and first rows;
    with ``strict`` it is a :class:`ValidationError` instead.
    """
    frame = _read_csv(Path(path))
    if assign_ids and "trustii_id" not in frame.columns:
        frame.insert(0, "trustii_id", np.arange(len(frame), dtype=np.int64))
    parts = truth_parts(frame, str(path))
    unknown = unknown_classes(parts.classes)
    if unknown and strict:
        raise ValidationError(str(path), [(u.rows[0], _unknown_text(u)) for u in unknown[:MAX_PROBLEMS]], len(unknown))
    for u in unknown:
        log.warning(
            "%s: %s; scored as one more label in the macro-F1 (an error with strict=True, cytologia score --strict)",
            path,
            _unknown_text(u),
        )
    out = pd.DataFrame({"trustii_id": parts.ids, "NAME": parts.names})
    for j, col in enumerate(BOX_COLUMNS):
        out[col] = parts.boxes[:, j]
    out["class"] = parts.classes
    return out


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read a submission ``trustii_id,NAME,x1,y1,x2,y2,class`` for scoring, leniently, as the reference scores it.

    A missing column is an error naming the file. Values are not validated (that is ``cytologia validate``'s job):
    NAME and class stay the exact strings of the file; a non-integer id or a missing/non-numeric coordinate is
    kept (logged with its rows) and scored by the rules in this module's docstring.
    """
    path = Path(path)
    frame = _read_csv(path)
    _missing_columns(frame, SUBMISSION_COLUMNS, str(path))
    out = pd.DataFrame({"trustii_id": pd.to_numeric(frame["trustii_id"], errors="coerce")})
    out["NAME"] = as_text(frame["NAME"])
    boxes = coordinates(frame)
    for j, col in enumerate(BOX_COLUMNS):
        out[col] = boxes[:, j]
    out["class"] = as_text(frame["class"])
    _, valid_id = _id_values(out["trustii_id"])
    bad_box = (~np.isfinite(boxes)).any(axis=1)
    for what, bad in (
        ("a trustii_id that is not an integer", ~valid_id),
        ("a missing or non-numeric coordinate", bad_box),
    ):
        if bad.any():
            rows = [str(int(i) + 1) for i in np.flatnonzero(bad)[:10]] + (["..."] if bad.sum() > 10 else [])
            log.warning("%s: %d row(s) with %s (rows %s)", path, bad.sum(), what, ", ".join(rows))
    return out


def _truth_rows(t_ids: np.ndarray, p_ids: np.ndarray, p_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, truth row) of each prediction id; ``t_ids`` are unique. The row is meaningful where found."""
    n_truth = len(t_ids)
    if n_truth == 0:
        return np.zeros(len(p_ids), dtype=bool), np.zeros(len(p_ids), dtype=np.int64)
    lo, hi = int(t_ids.min()), int(t_ids.max())
    if hi - lo < 4 * n_truth + 1024:  # ids are dense (the usual 0..n-1): a lookup table beats a binary search
        table = np.full(hi - lo + 1, -1, dtype=np.int64)
        table[t_ids - lo] = np.arange(n_truth)
        inside = p_valid & (p_ids >= lo) & (p_ids <= hi)
        t_row = np.zeros(len(p_ids), dtype=np.int64)
        t_row[inside] = table[p_ids[inside] - lo]
        return inside & (t_row >= 0), np.maximum(t_row, 0)
    order = np.argsort(t_ids)
    pos = np.clip(np.searchsorted(t_ids[order], p_ids), 0, n_truth - 1)
    return p_valid & (t_ids[order][pos] == p_ids), order[pos]


def score(truth: pd.DataFrame, pred: pd.DataFrame) -> ScoreResult:
    """Score a submission ``pred`` against ``truth`` (both ``trustii_id,NAME,x1,y1,x2,y2,class``).

    ``matched`` has one row per truth box (truth order): trustii_id, NAME, class, pred_class, pred_row (0-based
    position in ``pred`` of the prediction it took, -1 for none), giou (NaN for none) and giou_rescaled.
    """
    t = truth_parts(truth)
    t_ids, t_name, t_box, img_codes, n_images = t.ids, t.names, t.boxes, t.image, t.n_images
    _missing_columns(pred, SUBMISSION_COLUMNS, "prediction")
    n_truth, n_pred = len(t_ids), len(pred)

    # 1. Keep rows whose id is a truth id of the same image; the first row per id; collapse exact duplicates.
    p_ids, p_valid = _id_values(pred["trustii_id"])
    found, t_row = _truth_rows(t_ids, p_ids, p_valid)
    p_name = as_text(pred["NAME"])
    candidates = np.flatnonzero(found)
    name_ok = np.zeros(n_pred, dtype=bool)
    name_ok[candidates] = p_name[candidates] == t_name[t_row[candidates]]
    kept = np.flatnonzero(name_ok)
    first_of_id = np.full(n_truth, n_pred, dtype=np.int64)
    np.minimum.at(first_of_id, t_row[kept], kept)  # the earliest row per truth id
    is_first = np.zeros(n_pred, dtype=bool)
    is_first[first_of_id[first_of_id < n_pred]] = True
    kept = np.flatnonzero(is_first)  # file order
    n_first = len(kept)
    p_cls_codes, p_cls_labels = pd.factorize(as_text(pred["class"]))  # whole column: memory order, cheap to hash
    p_box = coordinates(pred)
    p_cols = [p_box[kept, j] for j in range(4)]
    p_cls = p_cls_codes[kept]
    p_img = img_codes[t_row[kept]]
    # Duplicates need two kept rows in one image; only those (few) rows are compared.
    multi = np.flatnonzero(np.bincount(p_img, minlength=n_images)[p_img] > 1)
    if len(multi):
        unique = np.ones(len(kept), dtype=bool)
        unique[multi] = ~_repeated_rows([p_img[multi], p_cls[multi], *(col[multi] for col in p_cols)])
        kept, p_cls, p_img = kept[unique], p_cls[unique], p_img[unique]
        p_cols = [col[unique] for col in p_cols]

    # 2. Every (truth box, kept prediction of its image) pair, built with index arithmetic instead of a loop.
    per_image = np.bincount(p_img, minlength=n_images)
    image_start = np.cumsum(per_image) - per_image
    # Kept predictions grouped by image, file order inside an image (a counting sort: rank within the image is 0
    # except in the few images with several predictions).
    rank = np.zeros(len(kept), dtype=np.int64)
    multi = np.flatnonzero(per_image[p_img] > 1)
    if len(multi):
        by_image = multi[np.argsort(p_img[multi], kind="stable")]
        rank[by_image] = np.arange(len(by_image)) - np.searchsorted(p_img[by_image], p_img[by_image])
    p_order = np.empty(len(kept), dtype=np.int64)
    p_order[image_start[p_img] + rank] = np.arange(len(kept))
    count = per_image[img_codes]  # pairs per truth row
    pair_start = np.cumsum(count) - count
    pair_truth = np.repeat(np.arange(n_truth), count)
    offsets = np.arange(len(pair_truth)) - pair_start[pair_truth]
    pair_pred = p_order[image_start[img_codes][pair_truth] + offsets]  # index into the kept arrays
    t_cols = [t_box[:, j] for j in range(4)]
    g = giou_columns(*(col[pair_truth] for col in t_cols), *(col[pair_pred] for col in p_cols))
    # np.argmax's choice per truth row: the first NaN if there is one, else the first maximum. The pairs of a truth
    # row are contiguous and in prediction order, so segment reductions (reduceat) find it without sorting.
    rows = np.flatnonzero(count > 0)
    best = np.zeros(0, dtype=np.int64)
    if len(rows):
        starts = pair_start[rows]
        segment = np.repeat(np.arange(len(rows)), count[rows])
        nan = np.isnan(g)
        key = np.where(nan, -np.inf, g)
        top = np.maximum.reduceat(key, starts)
        hit = np.where(np.logical_or.reduceat(nan, starts)[segment], nan, key == top[segment])
        best = np.minimum.reduceat(np.where(hit, np.arange(len(g)), len(g)), starts)
    giou_raw = np.full(n_truth, np.nan)
    giou_raw[rows] = g[best]
    # The reference's ((g + 1) / 2).fillna(0): no prediction (its g = -1) and a NaN box both score 0.
    rescaled = (g[best] + 1.0) / 2.0
    giou_rescaled = np.zeros(n_truth)
    giou_rescaled[rows] = np.where(np.isnan(rescaled), 0.0, rescaled)
    pred_row = np.full(n_truth, -1, dtype=np.int64)
    pred_row[rows] = kept[pair_pred[best]]

    # 3./4. Macro F1 over every label seen in truth or predictions ("None" for truth rows without a prediction).
    names, (t_map, p_map, none_map) = _label_union(t.class_labels, list(p_cls_labels), [NO_PREDICTION])
    y_true = t_map[t.class_codes]
    y_pred = np.full(n_truth, none_map[0], dtype=np.int64)
    y_pred[rows] = p_map[p_cls[pair_pred[best]]]
    f1, labels, per_label, confusion = _macro_f1_codes(y_true, y_pred, names)
    mean_giou = float(giou_rescaled.mean()) if n_truth else 0.0
    support = confusion.to_numpy().sum(axis=1)
    return ScoreResult(
        score=GIOU_WEIGHT * mean_giou + F1_WEIGHT * f1,
        giou=mean_giou,
        f1=f1,
        labels=labels,
        per_class_f1=dict(zip(labels, per_label.tolist())),
        support=dict(zip(labels, support.tolist())),
        confusion=confusion,
        n_truth=n_truth,
        n_images=n_images,
        n_images_without_prediction=int((per_image == 0).sum()),
        n_pred_rows=n_pred,
        n_pred_kept=len(kept),
        n_pred_unknown_id=int(n_pred - len(candidates)),
        n_pred_wrong_name=int(len(candidates) - name_ok.sum()),
        n_pred_repeated_id=int(name_ok.sum() - n_first),
        n_pred_duplicate=int(n_first - len(kept)),
        n_pred_bad_box=int((~np.isfinite(np.column_stack(p_cols))).any(axis=1).sum()) if len(kept) else 0,
        _columns={
            "trustii_id": t_ids,
            "NAME": t_name,
            "class": t.classes,
            "pred_class": (np.array(names, dtype=object)[y_pred] if n_truth else np.zeros(0, dtype=object)),
            "pred_row": pred_row,
            "giou": giou_raw,
            "giou_rescaled": giou_rescaled,
        },
    )
