"""Raw out-of-fold boxes: the table's schema (read/write) and the challenge's box term under the known-count rule.

The boxes table has one row per predicted box: ``NAME,x1,y1,x2,y2,score,model,fold`` -- absolute pixel corners in the
image's own frame, ``score`` the detector's confidence, ``model`` which model (and TTA variant, e.g.
``yolo11s_512+hflip``) produced it, ``fold`` the fold whose model predicted it (the image's held-out fold). Boxes are
raw: not fused, not cut to a count; an image with no detection has no row (the stage records which images were
predicted). Fusion reads this table.

The box term (MISSION.md, "The score") under the **known-count** rule, as the 1st place predicted: of each image keep
the ``N`` highest-scoring boxes, ``N`` = number of truth boxes of the image; when fewer than ``N`` were found, pad
with the full-image box; each truth box takes the kept box with the highest GIoU (several truth boxes may take the
same one); the GIoU ``g`` is rescaled to ``(g + 1) / 2`` and averaged over truth boxes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia.data.schema import BOX_COLUMNS
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.metrics import giou_pairs

BOX_TABLE_COLUMNS: tuple[str, ...] = ("NAME", *BOX_COLUMNS, "score", "model")
OOF_COLUMNS: tuple[str, ...] = (*BOX_TABLE_COLUMNS, "fold")
MAX_PROBLEMS = 20  # problems listed in one validation error (the total is always given)
COORD_DECIMALS = 3  # px written to CSV: sub-pixel is enough, full float64 only bloats the file
SCORE_DECIMALS = 6


def validate_boxes(table: pd.DataFrame, source: str = "<boxes>", require_fold: bool = True) -> pd.DataFrame:
    """Check a boxes table and return it typed (coordinates/score float64, fold int64, NAME/model str).

    Raises :class:`ValidationError` naming ``source`` and the 1-based rows for: missing columns, empty NAME or model,
    non-numeric or non-finite coordinates or score, ``x2 < x1`` or ``y2 < y1``, non-integer fold.
    """
    required = OOF_COLUMNS if require_fold else BOX_TABLE_COLUMNS
    missing = [c for c in required if c not in table.columns]
    if missing:
        found = ",".join(map(str, table.columns))
        problem = f"missing column(s) {', '.join(missing)}; expected {','.join(required)}, found {found}"
        raise ValidationError(source, [(None, problem)])
    out = pd.DataFrame(index=table.index)
    problems: list[tuple[int | None, str]] = []
    total = 0
    for col in ("NAME", "model"):
        values = table[col].astype(object).where(table[col].notna(), "")
        values = values.map(lambda v: v if isinstance(v, str) else str(v))
        bad = np.flatnonzero((values == "").to_numpy())
        total += len(bad)
        problems += [(int(i) + 1, f"{col} is empty") for i in bad[:MAX_PROBLEMS]]
        out[col] = values.to_numpy(dtype=object)
    numeric = ["x1", "y1", "x2", "y2", "score"]
    for col in numeric:
        out[col] = pd.to_numeric(table[col], errors="coerce").astype(np.float64)
    values = out[numeric].to_numpy()
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    total += len(bad)
    problems += [(int(i) + 1, "coordinate or score is missing, non-numeric or infinite") for i in bad[:MAX_PROBLEMS]]
    inverted = np.flatnonzero((values[:, 2] < values[:, 0]) | (values[:, 3] < values[:, 1]))
    total += len(inverted)
    problems += [(int(i) + 1, f"inverted box {values[i, :4].tolist()}") for i in inverted[:MAX_PROBLEMS]]
    columns = list(BOX_TABLE_COLUMNS)
    if "fold" in table.columns:
        fold = pd.to_numeric(table["fold"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.flatnonzero(~np.isfinite(fold) | (fold != np.floor(fold)))
        total += len(bad)
        problems += [(int(i) + 1, f"fold is not an integer: {table['fold'].iloc[i]!r}") for i in bad[:MAX_PROBLEMS]]
        out["fold"] = np.where(np.isfinite(fold), fold, -1).astype(np.int64)
        columns.append("fold")
    if total:
        problems.sort(key=lambda p: p[0] or 0)
        raise ValidationError(source, problems[:MAX_PROBLEMS], total)
    return out[columns].reset_index(drop=True)


def read_boxes(path: str | Path, require_fold: bool = True) -> pd.DataFrame:
    """Read and validate a boxes table (``oof_boxes.csv``); errors name the file and the rows."""
    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such file")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CytologiaInputError(f"{path}: not a readable CSV table: {err}") from err
    return validate_boxes(raw, str(path), require_fold=require_fold)


def write_boxes(table: pd.DataFrame, path: str | Path, require_fold: bool = True) -> Path:
    """Validate and write a boxes table as CSV (coordinates to 1/1000 px); returns the path."""
    path = Path(path)
    typed = validate_boxes(table, str(path), require_fold=require_fold)
    typed[list(BOX_COLUMNS)] = typed[list(BOX_COLUMNS)].round(COORD_DECIMALS)
    typed["score"] = typed["score"].round(SCORE_DECIMALS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    typed.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def empty_boxes(require_fold: bool = True) -> pd.DataFrame:
    """An empty boxes table with the right columns and dtypes."""
    data: dict[str, np.ndarray] = {"NAME": np.array([], dtype=object)}
    data.update({c: np.array([], dtype=np.float64) for c in (*BOX_COLUMNS, "score")})
    data["model"] = np.array([], dtype=object)
    if require_fold:
        data["fold"] = np.array([], dtype=np.int64)
    return pd.DataFrame(data)


def _sizes_table(truth: pd.DataFrame, sizes: pd.DataFrame | Mapping[str, tuple[int, int]] | None) -> pd.DataFrame:
    """``NAME -> img_w, img_h`` (index NAME) from ``sizes`` or the truth's own columns; -1 where unknown."""
    if sizes is None:
        if {"img_w", "img_h"} <= set(truth.columns):
            sizes = truth[["NAME", "img_w", "img_h"]]
        else:
            sizes = pd.DataFrame({"NAME": pd.unique(truth["NAME"]), "img_w": -1, "img_h": -1})
    elif isinstance(sizes, Mapping):
        names = list(sizes)
        sizes = pd.DataFrame(
            {"NAME": names, "img_w": [sizes[n][0] for n in names], "img_h": [sizes[n][1] for n in names]}
        )
    return sizes.drop_duplicates("NAME").set_index("NAME")[["img_w", "img_h"]]


def known_count_matches(
    boxes: pd.DataFrame,
    truth: pd.DataFrame,
    sizes: pd.DataFrame | Mapping[str, tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Per truth box: the GIoU of its best box among its image's top-N (N = truth boxes of the image).

    ``boxes``: ``NAME,x1,y1,x2,y2,score`` of *one* model (other columns ignored); ``truth``: ``NAME,x1,y1,x2,y2`` (one
    row per truth box). ``sizes`` (``NAME,img_w,img_h`` or NAME -> (w, h); default: the truth's ``img_w``/``img_h``)
    gives the full-image pad box of images with fewer than N boxes; such an image without a known size is an error.
    Returns one row per truth row (same order): ``NAME, giou, rescaled, padded`` (``padded``: the image needed the
    pad box).
    """
    t = truth.reset_index(drop=True)
    names = t["NAME"].astype(str).to_numpy(dtype=object)
    tbox = t[list(BOX_COLUMNS)].to_numpy(np.float64)
    count = pd.Series(names).value_counts()
    b = boxes.loc[boxes["NAME"].astype(str).isin(count.index), ["NAME", *BOX_COLUMNS, "score"]].copy()
    b["NAME"] = b["NAME"].astype(str)
    b = b.sort_values(["NAME", "score"], ascending=[True, False], kind="mergesort")
    rank = b.groupby("NAME", sort=False).cumcount().to_numpy()
    b = b.loc[rank < count.reindex(b["NAME"]).to_numpy()]
    found = b["NAME"].value_counts().reindex(count.index, fill_value=0)
    short = found.index[(found < count).to_numpy()]
    if len(short):
        lookup = _sizes_table(t, sizes).reindex(short)
        unknown = lookup.index[~((lookup["img_w"] > 0) & (lookup["img_h"] > 0)).to_numpy()]
        if len(unknown):
            shown = ", ".join(map(str, unknown[:10]))
            raise CytologiaInputError(
                f"known-count padding needs the image size of {len(unknown)} image(s) with too few boxes: {shown}"
            )
        pad = pd.DataFrame(
            {
                "NAME": short.to_numpy(dtype=object),
                "x1": 0.0,
                "y1": 0.0,
                "x2": lookup["img_w"].to_numpy(np.float64),
                "y2": lookup["img_h"].to_numpy(np.float64),
                "score": -np.inf,
            }
        )
        b = pd.concat([b, pad], ignore_index=True)
    # every (truth, kept box) pair of an image: at most N^2 per image, N <= 11 on real data
    left = pd.DataFrame({"NAME": names, "ti": np.arange(len(t))})
    pairs = left.merge(b.reset_index(drop=True).reset_index(names="bi"), on="NAME", how="inner")
    g = giou_pairs(tbox[pairs["ti"].to_numpy()], pairs[list(BOX_COLUMNS)].to_numpy(np.float64))
    best = pd.Series(g).groupby(pairs["ti"].to_numpy()).max().reindex(np.arange(len(t)))
    giou = best.to_numpy(np.float64)
    return pd.DataFrame(
        {"NAME": names, "giou": giou, "rescaled": (giou + 1.0) / 2.0, "padded": np.isin(names, short.to_numpy())}
    )


def known_count_giou(
    boxes: pd.DataFrame,
    truth: pd.DataFrame,
    sizes: pd.DataFrame | Mapping[str, tuple[int, int]] | None = None,
) -> float:
    """Mean rescaled GIoU over truth boxes under the known-count rule (see :func:`known_count_matches`); NaN when
    ``truth`` is empty."""
    if len(truth) == 0:
        return float("nan")
    return float(known_count_matches(boxes, truth, sizes)["rescaled"].mean())
