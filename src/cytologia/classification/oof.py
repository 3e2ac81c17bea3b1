"""The out-of-fold logits table: what every classifier run writes for the boxes of its held-out fold.

One row per (box, model)::

    NAME      str    image file name
    box_id    int64  the box: ``box_id`` of the annotations table (0-based data row of train.csv) for
                     ground-truth boxes, or the 0-based row of the boxes table when crops come from detected boxes
    fold      int64  the fold the box was held out in (the fold whose model produced the logits)
    model     str    which model / view made them: the experiment name, ``<exp>+hflip`` for the mean of the plain
                     and horizontally flipped logits (:mod:`cytologia.oof_names`)
    logit_0 .. logit_{K-1}  float32  raw (pre-softmax) scores; column i is label i of
                     :func:`cytologia.data.schema.labels` (K = 23, or 24 with "background" last)

Multi-label full-image members
------------------------------
The multi-label model (``classifier.multilabel=true``) classifies whole images, not boxes. Its table has the same
columns and still **one row per box** (the same boxes -- and ``box_id`` -- as a crop model of the same run would
have: ground-truth boxes, or the detected boxes of ``classifier.boxes``): every box of an image carries that image's
logits, repeated. Its ``model`` names start with ``"ml:"`` (``ml:<exp>`` and ``ml:<exp>+hflip``; the naming rules
are in :mod:`cytologia.oof_names`), which is what marks it: the ensemble must not average it with the crop members
but blend its per-class sigmoids in on single-cell images only. Its logits are sigmoid scores (one independent logit
per label), not softmax ones. :func:`validate_oof` checks that every row of one image of such a model holds the same
logits.

Format: CSV (the default, ``.csv``) written with 9 significant digits, which round-trips float32 exactly; Parquet
(``.parquet``) when pyarrow is installed -- a fold of the real set is ~13,000 rows x 24 floats, ~3 MB of CSV, so
CSV is no burden and needs no extra dependency. Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia.data.schema import BACKGROUND, CLASSES, labels
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.oof_names import MULTILABEL_PREFIX

KEY_COLUMNS: tuple[str, ...] = ("NAME", "box_id", "fold", "model")
FILE_NAME = "oof_logits.csv"  # per fold folder, and the concatenation of all folds in the run folder
_LOGIT = re.compile(r"^logit_(\d+)$")
_FLOAT_FORMAT = "%.9g"  # 9 significant digits: every float32 survives the text round trip bit for bit


def logit_columns(num_labels: int) -> list[str]:
    """``logit_0 .. logit_{num_labels-1}``."""
    return [f"logit_{i}" for i in range(num_labels)]


def labels_for(num_labels: int) -> tuple[str, ...]:
    """The label names of a table with ``num_labels`` logit columns (23 classes, or 24 with background last)."""
    if num_labels == len(CLASSES):
        return labels(background=False)
    if num_labels == len(CLASSES) + 1:
        return labels(background=True)
    raise CytologiaInputError(
        f"{num_labels} logit columns: expected {len(CLASSES)} (classes) or {len(CLASSES) + 1} (+ {BACKGROUND})"
    )


def make_oof_table(
    names: Sequence[str], box_ids: Sequence[int] | np.ndarray, fold: int, model: str, logits: np.ndarray
) -> pd.DataFrame:
    """Build a valid OOF table from parallel arrays (``logits`` is ``(n, K)``)."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != len(names) or len(box_ids) != len(names):
        raise ValueError(f"logits {logits.shape} do not match {len(names)} names / {len(box_ids)} box ids")
    labels_for(logits.shape[1])
    table = pd.DataFrame(
        {"NAME": np.asarray(names, dtype=object), "box_id": np.asarray(box_ids, dtype=np.int64), "fold": int(fold)}
    )
    table["fold"] = table["fold"].astype(np.int64)
    table["model"] = model
    table = pd.concat([table, pd.DataFrame(logits, columns=logit_columns(logits.shape[1]))], axis=1)
    return validate_oof(table, "<oof logits>")


def validate_oof(table: pd.DataFrame, source: str | Path = "<oof logits>") -> pd.DataFrame:
    """Check columns, types and keys; return the table with canonical dtypes and column order.

    Raises :class:`ValidationError` naming the source and (1-based data) rows: missing key columns, logit columns
    that are not ``logit_0..logit_{K-1}``, non-integer ids/folds, empty NAME/model, non-finite logits, and a
    (NAME, box_id, model) key that repeats.
    """
    missing = [c for c in KEY_COLUMNS if c not in table.columns]
    if missing:
        raise ValidationError(source, [(None, f"missing column(s) {', '.join(missing)}; have {list(table.columns)}")])
    found = sorted(int(m.group(1)) for c in table.columns if (m := _LOGIT.match(str(c))))
    extra = [c for c in table.columns if c not in KEY_COLUMNS and not _LOGIT.match(str(c))]
    if extra:
        raise ValidationError(source, [(None, f"unexpected column(s) {', '.join(map(str, extra))}")])
    if found != list(range(len(found))):
        raise ValidationError(source, [(None, f"logit columns must be logit_0..logit_K-1 without gaps, got {found}")])
    try:
        labels_for(len(found))
    except CytologiaInputError as err:
        raise ValidationError(source, [(None, str(err))]) from None
    cols = logit_columns(len(found))
    problems: list[tuple[int | None, str]] = []
    out = pd.DataFrame({"NAME": table["NAME"].astype(str).to_numpy(dtype=object)})
    for key in ("box_id", "fold"):
        values = pd.to_numeric(table[key], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values) | (values != np.round(values))
        problems += [(int(i) + 1, f"{key}={table[key].iloc[i]!r} is not an integer") for i in np.flatnonzero(bad)[:20]]
        out[key] = np.where(bad, -1, values).astype(np.int64)
    out["model"] = table["model"].astype(str).to_numpy(dtype=object)
    for key in ("NAME", "model"):
        empty = (out[key].str.len() == 0).to_numpy()
        problems += [(int(i) + 1, f"empty {key}") for i in np.flatnonzero(empty)[:20]]
    logits = table[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    problems += [(int(i) + 1, "a logit is missing or not finite") for i in bad_rows[:20]]
    dup = out.duplicated(["NAME", "box_id", "model"]).to_numpy()
    for i in np.flatnonzero(dup)[:20]:
        key = f"({out['NAME'].iat[i]}, {out['box_id'].iat[i]}, {out['model'].iat[i]})"
        problems.append((int(i) + 1, f"repeats (NAME, box_id, model) = {key}"))
    problems += _image_logits_differ(out, logits)
    if problems:
        raise ValidationError(source, sorted(problems, key=lambda p: p[0] or 0))
    return pd.concat([out, pd.DataFrame(logits, columns=cols, index=out.index)], axis=1)


def _image_logits_differ(keys: pd.DataFrame, logits: np.ndarray) -> list[tuple[int | None, str]]:
    """Rows of a multi-label member whose logits differ from those of the first row of the same image and model."""
    ml = np.flatnonzero(keys["model"].str.startswith(MULTILABEL_PREFIX).to_numpy())
    if not len(ml):
        return []
    group = keys.iloc[ml].groupby(["model", "NAME"], sort=False).ngroup().to_numpy()
    _, first = np.unique(group, return_index=True)
    reference = logits[ml[first]][group]  # ngroup numbers the groups 0..G-1
    # Bit-for-bit (NaN-safe): the stage writes one vector per image; non-finite rows are reported on their own.
    same = (logits[ml] == reference) | (np.isnan(logits[ml]) & np.isnan(reference))
    bad = ml[~same.all(axis=1)]
    return [
        (
            int(i) + 1,
            f"multi-label model {keys['model'].iat[i]}: logits differ from another box of "
            f"{keys['NAME'].iat[i]} (a full-image model gives every box of an image the same logits)",
        )
        for i in bad[:20]
    ]


def write_oof(table: pd.DataFrame, path: str | Path) -> Path:
    """Validate and write an OOF table (CSV, or Parquet for a ``.parquet`` path); atomic."""
    path = Path(path)
    table = validate_oof(table, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".parquet":
        _need_pyarrow(path)
        table.to_parquet(tmp, index=False)
    elif path.suffix == ".csv":
        table.to_csv(tmp, index=False, float_format=_FLOAT_FORMAT)
    else:
        raise CytologiaInputError(f"{path}: OOF logits are written as .csv or .parquet")
    os.replace(tmp, path)
    return path


def read_oof(path: str | Path) -> pd.DataFrame:
    """Read and validate an OOF table written by :func:`write_oof` (or by hand, with the same columns)."""
    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such file")
    if path.suffix == ".parquet":
        _need_pyarrow(path)
        table = pd.read_parquet(path)
    else:
        try:
            table = pd.read_csv(path, dtype={"NAME": str, "model": str}, keep_default_na=False, na_values=[""])
        except pd.errors.EmptyDataError:
            raise ValidationError(path, [(None, "empty file")]) from None
    return validate_oof(table, path)


def logits_of(table: pd.DataFrame) -> np.ndarray:
    """The ``(n, K)`` float32 logit matrix of a validated table."""
    return table[[c for c in table.columns if _LOGIT.match(str(c))]].to_numpy(np.float32)


def _need_pyarrow(path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ModuleNotFoundError:
        raise CytologiaInputError(f"{path}: Parquet needs pyarrow (pip install pyarrow), or use a .csv path") from None
