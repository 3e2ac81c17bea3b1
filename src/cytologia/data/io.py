"""Read, validate and write the Trustii tables: ``train.csv``, ``test.csv`` and submissions.

Every CSV is read as text (``dtype=str``, ``keep_default_na=False``, BOM-tolerant) and converted column by column,
so a class called "None" or "NA" stays that string whatever the pandas version, and an empty cell is an error, not
a silent NaN. Validation is vectorised; Python loops run only over the problems that are shown or recorded.

Rows are **1-based data rows** in messages (row 1 is the line after the header); ``box_id`` in the annotations table
is the 0-based data-row index in the source file, stable across filtering.

Modes (annotations):

- **strict** (default) raises :class:`ValidationError` listing every problem (the first :data:`MAX_SHOWN` are
  shown, the total is always given): missing columns, missing/non-numeric/non-finite coordinates, ``x2 <= x1`` or
  ``y2 <= y1``, unknown class, a ``NAME`` that is empty, absolute or escapes the image folder, and -- when an image
  folder is given -- a missing or unreadable image, or a box that lies entirely outside its image.
- **lenient** skips the rows it cannot fix and drops boxes that end up empty after clipping; each is counted by
  reason in the :class:`ValidationReport` and the first :data:`MAX_RECORDED` are recorded with row and message,
  and a warning is logged. Nothing is dropped silently.

Boxes past the image border are *not* a contract violation (the real train set has about 1,000 boxes with a negative
corner or past the border; 187 have x1 < 0 and 193 y1 < 0), in either mode: when the image size is known (read from
the image header, not by decoding) the box is clipped to the image and its ``fixes`` column says ``clipped``; when no
image folder is given, sizes are unknown (``img_w = img_h = -1``), boxes are kept as read, and the report counts the
negative corners and says ``images_checked=False``.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia.data.hygiene import clip_boxes
from cytologia.data.images import image_sizes as read_image_sizes
from cytologia.data.schema import (
    ANNOTATION_COLUMNS,
    BOX_COLUMNS,
    CLASSES,
    SUBMISSION_COLUMNS,
    TEST_COLUMNS,
    TRAIN_COLUMNS,
)
from cytologia.errors import CytologiaInputError, ValidationError

log = logging.getLogger(__name__)

MAX_SHOWN = 50  # problems listed in a ValidationError message (the total is always given)
MAX_RECORDED = 1000  # skipped/dropped rows recorded one by one in a lenient report (counts are always complete)
# Reasons a row is refused (strict) or skipped/dropped (lenient), in the order rows are attributed to them.
REASONS: tuple[str, ...] = (
    "bad_id",  # trustii_id missing, not an integer
    "duplicate_id",
    "unknown_id",  # submission id not in the test list
    "missing_id",  # a test-list id without a submission row (file level)
    "bad_name",  # NAME empty, absolute or escaping the image folder
    "name_mismatch",  # submission NAME is not the test list's image for that id
    "bad_coordinate",  # missing, non-numeric or non-finite coordinate
    "empty_box",  # x2 <= x1 or y2 <= y1 as read
    "unknown_class",
    "missing_image",
    "unreadable_image",
    "outside_image",  # nothing of the box is inside its image (empty after clipping)
)
_VALID_CLASSES = ", ".join(CLASSES)
_CLASS_SET = frozenset(CLASSES)
_ABSOLUTE = r"^(?:[/\\]|[A-Za-z]:)"  # POSIX root, Windows root or drive letter
_PARENT_SEGMENT = r"(?:^|[/\\])\.\.(?:[/\\]|$)"
_INSIDE_TOLERANCE = 1e-6  # px: submission boxes computed in float may overshoot the border by rounding


@dataclass
class ValidationReport:
    """What validating one table found and did. ``skipped``/``dropped`` count rows by reason (see :data:`REASONS`);
    ``records`` lists the first :data:`MAX_RECORDED` of them: ``{row, NAME, action, reason, message}``."""

    path: str
    table: str  # "train" | "test" | "submission"
    mode: str  # "strict" | "lenient"
    rows: int  # data rows read
    kept: int  # rows in the validated table
    images: int  # distinct NAMEs kept
    images_checked: bool  # image files were looked at (existence, header size)
    image_dir: str | None = None
    negative_corners: int = 0  # kept boxes with x1 < 0 or y1 < 0 as read (real train.csv: 356)
    negative_x1: int = 0  # of which x1 < 0 (real train.csv: 187)
    negative_y1: int = 0  # of which y1 < 0 (real train.csv: 193)
    past_border: int = 0  # kept boxes reaching past the right/bottom border (only known with image sizes)
    clipped: int = 0  # kept boxes clipped to their image
    duplicate_rows: int = 0  # rows repeating an earlier row exactly (kept; reported)
    skipped: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    records: list[dict[str, object]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        """One or two human-readable lines."""
        out = [
            f"{self.path}: {self.table}, {self.mode}: {self.rows} rows -> {self.kept} kept over {self.images} images"
            f" ({self.seconds:.2f} s); images checked: {'yes' if self.images_checked else 'no'}"
        ]
        extra = []
        if self.table == "train":
            extra.append(
                f"boxes with a negative corner {self.negative_corners} (x1 < 0: {self.negative_x1}, "
                f"y1 < 0: {self.negative_y1})"
            )
            if self.images_checked:
                extra += [f"past the border {self.past_border}", f"clipped {self.clipped}"]
        if self.duplicate_rows:
            extra.append(f"duplicate rows {self.duplicate_rows}")
        if self.skipped:
            extra.append("skipped " + ", ".join(f"{k}={v}" for k, v in self.skipped.items()))
        if self.dropped:
            extra.append("dropped " + ", ".join(f"{k}={v}" for k, v in self.dropped.items()))
        if extra:
            out.append("  " + "; ".join(extra))
        return "\n".join(out)


class _Problems:
    """Problems found by vectorised checks. Each check adds a reason, the 0-based rows it hits (-1: a file-level
    problem with no row) and a formatter, called only for the problems that are shown or recorded: with the row for
    row problems, with the problem's position in the check for file-level ones."""

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows
        self.items: list[tuple[str, np.ndarray, Callable[[int], str], bool]] = []

    def add(self, reason: str, where: np.ndarray, message: Callable[[int], str]) -> None:
        """Row problems: ``where`` is a boolean row mask; ``message(row)``."""
        rows = np.flatnonzero(where)
        if rows.size:
            self.items.append((reason, rows, message, True))

    def add_file_level(self, reason: str, count: int, message: Callable[[int], str]) -> None:
        """``count`` problems without a row; ``message(k)`` for the k-th."""
        if count:
            self.items.append((reason, np.full(count, -1, np.int64), message, False))

    @property
    def total(self) -> int:
        return sum(len(item[1]) for item in self.items)

    def row_mask(self) -> np.ndarray:
        mask = np.zeros(self.n_rows, dtype=bool)
        for _, rows, _, _ in self.items:
            mask[rows[rows >= 0]] = True
        return mask

    def message(self, check: int, k: int) -> str:
        """Message of the k-th problem of check ``check``."""
        _, rows, fmt, by_row = self.items[check]
        return fmt(int(rows[k]) if by_row else k)

    def first_reason(self) -> np.ndarray:
        """Per row, the check (index into :attr:`items`) of its highest-priority problem (order of
        :data:`REASONS`); -1 when the row has none."""
        first = np.full(self.n_rows, -1, np.int64)
        for check in sorted(range(len(self.items)), key=lambda c: REASONS.index(self.items[c][0])):
            rows = self.items[check][1]
            rows = rows[rows >= 0]
            first[rows[first[rows] < 0]] = check
        return first

    def listing(self, limit: int) -> list[tuple[int | None, str]]:
        """The first ``limit`` problems in row order (file-level problems first), with 1-based rows."""
        if not self.items:
            return []
        rows = np.concatenate([item[1] for item in self.items])
        check = np.concatenate([np.full(len(item[1]), c) for c, item in enumerate(self.items)])
        pos = np.concatenate([np.arange(len(item[1])) for item in self.items])
        order = np.lexsort((pos, check, rows))[:limit]
        return [(None if rows[i] < 0 else int(rows[i]) + 1, self.message(int(check[i]), int(pos[i]))) for i in order]


# ------------------------------------------------------------------------------------------------------ reading
def read_raw_csv(path: str | Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A CSV as all-text columns (no NA parsing); a missing file, unparsable CSV or missing column raises
    :class:`CytologiaInputError` / :class:`ValidationError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValidationError(path, [(None, f"empty file; expected the header {','.join(required)}")]) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValidationError(path, [(None, f"not a readable CSV: {err}")]) from None
    _require_columns(table, required, path)
    return table


def _require_columns(table: pd.DataFrame, required: tuple[str, ...], source: str | Path) -> None:
    missing = [c for c in required if c not in table.columns]
    if missing:
        have = ",".join(map(str, table.columns))
        raise ValidationError(source, [(None, f"missing column(s) {', '.join(missing)}; header is {have!r}")])


def _text(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(values as a str object array, mask of missing values) -- missing = None/NaN/NA in in-memory tables."""
    missing = series.isna().to_numpy()
    values = series.astype(object).to_numpy(copy=True)
    values[missing] = ""
    return values.astype(str).astype(object), missing


def _numbers(table: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    """Columns as a float64 matrix; NaN where missing or not a number."""
    return np.stack([pd.to_numeric(table[c], errors="coerce").to_numpy(np.float64) for c in columns], axis=1)


def _fmt_box(box: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def _check_coordinates(table: pd.DataFrame, problems: _Problems) -> np.ndarray:
    """Parse x1..y2; adds bad_coordinate and empty_box problems. Returns the (n, 4) float64 boxes."""
    boxes = _numbers(table, BOX_COLUMNS)
    bad = ~np.isfinite(boxes)

    def bad_msg(i: int) -> str:
        cols = [f"{c}={table[c].iloc[i]!r}" for c, b in zip(BOX_COLUMNS, bad[i]) if b]
        return "missing or non-numeric coordinate " + ", ".join(cols)

    problems.add("bad_coordinate", bad.any(axis=1), bad_msg)
    ok = ~bad.any(axis=1)
    empty = ok & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    problems.add("empty_box", empty, lambda i: f"empty box {_fmt_box(boxes[i])}: needs x2 > x1 and y2 > y1")
    return boxes


def _check_names(names: np.ndarray, missing: np.ndarray, problems: _Problems) -> np.ndarray:
    """Adds bad_name problems (empty, absolute, escaping the image folder); returns the mask of good names."""
    s = pd.Series(names, dtype=object)
    empty = missing | (s.str.strip() == "").to_numpy() | s.str.contains("\x00", regex=False).to_numpy()
    absolute = s.str.contains(_ABSOLUTE, regex=True).to_numpy() & ~empty
    escapes = np.zeros(len(s), dtype=bool)
    for i in np.flatnonzero(s.str.contains(_PARENT_SEGMENT, regex=True).to_numpy() & ~empty & ~absolute):
        norm = posixpath.normpath(names[i].replace("\\", "/"))  # only names holding a ".." segment: rare
        escapes[i] = norm == ".." or norm.startswith("../")

    def absolute_msg(i: int) -> str:
        return f"NAME {names[i]!r} is an absolute path; give it relative to the image folder"

    problems.add("bad_name", empty, lambda i: "empty NAME")
    problems.add("bad_name", absolute, absolute_msg)
    problems.add("bad_name", escapes, lambda i: f"NAME {names[i]!r} escapes the image folder")
    return ~(empty | absolute | escapes)


def _check_classes(table: pd.DataFrame, problems: _Problems) -> np.ndarray:
    classes, missing = _text(table["class"])
    unknown = missing | ~pd.Series(classes).isin(_CLASS_SET).to_numpy()
    problems.add("unknown_class", unknown, lambda i: f"unknown class {classes[i]!r}; valid classes: {_VALID_CLASSES}")
    return classes


def _usable_image_dir(image_dir: str | Path | None, report_warnings: list[str]) -> Path | None:
    if image_dir is None:
        msg = "no image folder given: image checks (existence, size, clipping) skipped"
    elif not Path(image_dir).is_dir():
        msg = f"image folder {image_dir} does not exist: image checks (existence, size, clipping) skipped"
    else:
        return Path(image_dir)
    log.warning(msg)
    report_warnings.append(msg)
    return None


def _existing(image_dir: Path, names: np.ndarray) -> np.ndarray:
    """Which relative names are files in ``image_dir``: one directory listing for plain names, a stat for the rare
    names with a sub-folder."""
    with os.scandir(image_dir) as it:
        files = {e.name for e in it if e.is_file()}
    s = pd.Series(names, dtype=object)
    nested = s.str.contains(r"[/\\]", regex=True).to_numpy()
    exists = s.isin(files).to_numpy() & ~nested
    for i in np.flatnonzero(nested):
        exists[i] = (image_dir / names[i]).is_file()
    return exists


def _check_images(
    image_dir: Path, names: np.ndarray, good_name: np.ndarray, problems: _Problems, workers: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Adds missing_image / unreadable_image problems; returns per-row (w, h) (-1 when unknown) and the mask of rows
    whose image size is known."""
    unique, inverse = np.unique(names, return_inverse=True)
    good_unique = np.zeros(len(unique), dtype=bool)
    good_unique[inverse[good_name]] = True
    exists = np.zeros(len(unique), dtype=bool)
    exists[good_unique] = _existing(image_dir, unique[good_unique])
    sizes = np.full((len(unique), 2), -1, np.int64)
    errors: list[str | None] = [None] * len(unique)
    idx = np.flatnonzero(exists)
    read, read_errors = read_image_sizes([image_dir / n for n in unique[idx]], workers=workers)
    sizes[idx] = read
    for k, e in zip(idx, read_errors):
        errors[k] = e
    row_exists = exists[inverse]
    row_sizes = sizes[inverse]
    missing = good_name & ~row_exists
    unreadable = row_exists & (row_sizes[:, 0] < 0)
    problems.add("missing_image", missing, lambda i: f"image file {image_dir / names[i]} not found")
    problems.add("unreadable_image", unreadable, lambda i: f"image unreadable: {errors[inverse[i]]}")
    return row_sizes, row_exists & ~unreadable


def _finish(
    problems: _Problems, report: ValidationReport, source: str | Path, table: pd.DataFrame, lenient: bool
) -> np.ndarray:
    """Strict: raise when there are problems. Lenient: count, record and log the refused rows; return the mask of
    rows to keep. ``outside_image`` rows count as dropped, others as skipped."""
    if not problems.total:
        return np.ones(problems.n_rows, dtype=bool)
    file_level = any(not by_row for *_, by_row in problems.items)
    if not lenient or file_level:  # a file-level problem (e.g. a missing test id) cannot be fixed by skipping rows
        raise ValidationError(source, problems.listing(MAX_SHOWN), problems.total)
    first = problems.first_reason()
    refused = np.flatnonzero(first >= 0)
    reasons = np.array([item[0] for item in problems.items], dtype=object)[first[refused]]
    for reason in REASONS:
        count = int((reasons == reason).sum())
        if count:
            (report.dropped if reason == "outside_image" else report.skipped)[reason] = count
    names = table["NAME"].astype(object).to_numpy() if "NAME" in table.columns else np.full(len(table), "")
    for i in refused[:MAX_RECORDED]:
        check = int(first[i])
        reason = problems.items[check][0]
        k = int(np.searchsorted(problems.items[check][1], i))  # rows of a check are sorted
        report.records.append(
            {
                "row": int(i) + 1,
                "NAME": str(names[i]),
                "action": "dropped" if reason == "outside_image" else "skipped",
                "reason": reason,
                "message": problems.message(check, k),
            }
        )
    counts = ", ".join(f"{k} {v}" for k, v in {**report.skipped, **report.dropped}.items())
    msg = f"{source}: {len(refused)} of {problems.n_rows} rows not kept: {counts}"
    log.warning(msg)
    report.warnings.append(msg)
    return first < 0


# -------------------------------------------------------------------------------------------------- annotations
def validate_annotations(
    raw: pd.DataFrame,
    source: str | Path = "<annotations>",
    image_dir: str | Path | None = None,
    *,
    lenient: bool = False,
    workers: int | None = None,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Validate a ``NAME,x1,y1,x2,y2,class`` table (text or typed columns) into the annotations table
    (:data:`~cytologia.data.schema.ANNOTATION_COLUMNS`); see the module docstring for the rules."""
    start = time.perf_counter()
    _require_columns(raw, TRAIN_COLUMNS, source)
    n = len(raw)
    report = ValidationReport(str(source), "train", "lenient" if lenient else "strict", n, 0, 0, False)
    problems = _Problems(n)
    names, name_missing = _text(raw["NAME"])
    good_name = _check_names(names, name_missing, problems)
    boxes = _check_coordinates(raw, problems)
    classes = _check_classes(raw, problems)
    folder = _usable_image_dir(image_dir, report.warnings)
    sizes = np.full((n, 2), -1, np.int64)
    if folder is not None:
        report.images_checked, report.image_dir = True, str(folder)
        sizes, known = _check_images(folder, names, good_name, problems, workers)
        valid_box = np.isfinite(boxes).all(axis=1)
        table = pd.DataFrame(boxes, columns=list(BOX_COLUMNS))
        table["img_w"], table["img_h"] = sizes[:, 0], sizes[:, 1]
        fixed = clip_boxes(table)
        outside = known & valid_box & fixed["empty"].to_numpy() & ~problems.row_mask()

        def outside_msg(i: int) -> str:
            return f"box {_fmt_box(boxes[i])} lies outside its image ({sizes[i, 0]} x {sizes[i, 1]} px)"

        problems.add("outside_image", outside, outside_msg)
        past = known & valid_box & ((boxes[:, 2] > sizes[:, 0]) | (boxes[:, 3] > sizes[:, 1]))
        clipped = fixed["clipped"].to_numpy() & known
        final_boxes = fixed[list(BOX_COLUMNS)].to_numpy(np.float64)
    else:
        past = clipped = np.zeros(n, dtype=bool)
        final_boxes = boxes
    keep = _finish(problems, report, source, raw, lenient)

    out = pd.DataFrame(
        {
            "NAME": names[keep],
            "box_id": np.flatnonzero(keep).astype(np.int64),
            **{c: final_boxes[keep, k] for k, c in enumerate(BOX_COLUMNS)},
            "class": classes[keep],
            "img_w": sizes[keep, 0],
            "img_h": sizes[keep, 1],
            "fixes": np.where(clipped[keep], "clipped", "").astype(object),
        },
        columns=list(ANNOTATION_COLUMNS),
    )
    report.kept = len(out)
    report.images = int(out["NAME"].nunique())
    report.negative_x1 = int((boxes[keep, 0] < 0).sum())
    report.negative_y1 = int((boxes[keep, 1] < 0).sum())
    report.negative_corners = int(((boxes[keep, 0] < 0) | (boxes[keep, 1] < 0)).sum())
    report.past_border = int(past[keep].sum())
    report.clipped = int(clipped[keep].sum())
    report.duplicate_rows = int(out.duplicated(["NAME", *BOX_COLUMNS, "class"]).sum())
    if report.duplicate_rows:
        report.warnings.append(f"{report.duplicate_rows} rows repeat an earlier (NAME, box, class) exactly")
    if not report.images_checked and report.negative_corners:
        report.warnings.append(
            f"{report.negative_corners} boxes have a negative corner; kept as read (no image sizes to clip to)"
        )
    report.seconds = time.perf_counter() - start
    return out, report


def read_annotations(
    path: str | Path, image_dir: str | Path | None = None, *, lenient: bool = False, workers: int | None = None
) -> tuple[pd.DataFrame, ValidationReport]:
    """Read and validate ``train.csv`` (``NAME,x1,y1,x2,y2,class``); returns the annotations table and the report.

    ``image_dir`` None or absent: image checks are skipped (``report.images_checked`` False, a warning is logged).
    ``workers``: threads reading image headers.
    """
    start = time.perf_counter()
    raw = read_raw_csv(path, TRAIN_COLUMNS)
    table, report = validate_annotations(raw, path, image_dir, lenient=lenient, workers=workers)
    report.seconds = time.perf_counter() - start
    return table, report


# --------------------------------------------------------------------------------------------------- ids (test)
def _check_ids(raw: pd.DataFrame, problems: _Problems) -> tuple[np.ndarray, np.ndarray]:
    """Parse trustii_id (integers); adds bad_id and duplicate_id problems. Returns int64 ids (-1 where bad) and the
    mask of bad ones."""
    values = pd.to_numeric(raw["trustii_id"], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values))
    problems.add("bad_id", bad, lambda i: f"trustii_id {raw['trustii_id'].iloc[i]!r} is not an integer")
    ids = np.where(bad, -1, np.nan_to_num(values)).astype(np.int64)
    dup = pd.Series(ids).duplicated().to_numpy() & ~bad
    if dup.any():
        first_row = pd.Series(np.arange(len(ids))).groupby(ids).transform("min").to_numpy()
        problems.add("duplicate_id", dup, lambda i: f"duplicated trustii_id {ids[i]} (first at row {first_row[i] + 1})")
    return ids, bad


def validate_test(
    raw: pd.DataFrame,
    source: str | Path = "<test>",
    image_dir: str | Path | None = None,
    workers: int | None = None,
    *,
    check_images: bool = True,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Validate a ``trustii_id,NAME`` table (always strict: a test list cannot be repaired) into
    ``trustii_id`` (int64), ``NAME``; with the report. ``check_images=False``: no image check and no warning about
    it (the caller checks each image itself, e.g. a prediction that predicts unreadable images with a fallback)."""
    start = time.perf_counter()
    _require_columns(raw, TEST_COLUMNS, source)
    report = ValidationReport(str(source), "test", "strict", len(raw), 0, 0, False)
    problems = _Problems(len(raw))
    ids, _ = _check_ids(raw, problems)
    names, missing = _text(raw["NAME"])
    good_name = _check_names(names, missing, problems)
    folder = _usable_image_dir(image_dir, report.warnings) if check_images else None
    if folder is not None:
        report.images_checked, report.image_dir = True, str(folder)
        _check_images(folder, names, good_name, problems, workers)
    _finish(problems, report, source, raw, lenient=False)
    out = pd.DataFrame({"trustii_id": ids, "NAME": names}, columns=list(TEST_COLUMNS))
    report.kept, report.images = len(out), int(out["NAME"].nunique())
    report.seconds = time.perf_counter() - start
    return out, report


def read_test(
    path: str | Path, image_dir: str | Path | None = None, workers: int | None = None, *, check_images: bool = True
) -> pd.DataFrame:
    """Read and validate ``test.csv`` (``trustii_id,NAME``): ids integer and unique, names safe, images present when
    ``image_dir`` is given (and ``check_images``, see :func:`validate_test`). Returns ``trustii_id`` (int64),
    ``NAME``."""
    return validate_test(read_raw_csv(path, TEST_COLUMNS), path, image_dir, workers, check_images=check_images)[0]


# --------------------------------------------------------------------------------------------------- submission
def _sizes_lookup(image_sizes_: pd.DataFrame | Mapping[str, tuple[int, int]]) -> pd.DataFrame:
    if isinstance(image_sizes_, Mapping):
        keys = list(image_sizes_)
        return pd.DataFrame(
            {"img_w": [image_sizes_[k][0] for k in keys], "img_h": [image_sizes_[k][1] for k in keys]},
            index=pd.Index(keys, name="NAME"),
        )
    return image_sizes_.drop_duplicates("NAME").set_index("NAME")[["img_w", "img_h"]]


def validate_submission(
    table: pd.DataFrame,
    source: str | Path = "<submission>",
    test: pd.DataFrame | None = None,
    image_sizes: pd.DataFrame | Mapping[str, tuple[int, int]] | None = None,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Validate a submission (``trustii_id,NAME,x1,y1,x2,y2,class``; text or typed columns), always strict.

    Checks: integer, unique ids; safe names; finite coordinates with x2 > x1, y2 > y1; valid class names. With
    ``test`` (a ``trustii_id,NAME`` table): every test id present exactly once, no foreign id, NAME equal to the
    id's image. With ``image_sizes`` (``NAME,img_w,img_h`` table or NAME -> (w, h)): boxes inside their image.
    Returns the typed table (ids int64, boxes float64) in the given row order, and the report.
    """
    start = time.perf_counter()
    _require_columns(table, SUBMISSION_COLUMNS, source)
    report = ValidationReport(str(source), "submission", "strict", len(table), 0, 0, False)
    problems = _Problems(len(table))
    ids, bad_id = _check_ids(table, problems)
    names, missing = _text(table["NAME"])
    _check_names(names, missing, problems)
    boxes = _check_coordinates(table, problems)
    classes = _check_classes(table, problems)
    if test is not None:
        test_ids = pd.to_numeric(test["trustii_id"], errors="raise").to_numpy(np.int64)
        test_names = test["NAME"].astype(str).to_numpy(dtype=object)
        lookup = pd.Index(test_ids)
        if not lookup.is_unique:
            raise CytologiaInputError(f"{source}: the test list given to check against has duplicated trustii_ids")
        pos = lookup.get_indexer(ids)
        known = pos >= 0
        problems.add(
            "unknown_id",
            ~known & ~bad_id,
            lambda i: f"trustii_id {ids[i]} is not in the test list (NAME {names[i]!r})",
        )
        mismatch = known & (test_names[np.where(known, pos, 0)] != names)
        problems.add(
            "name_mismatch",
            mismatch,
            lambda i: f"NAME {names[i]!r} is not trustii_id {ids[i]}'s image {test_names[pos[i]]!r}",
        )
        absent = np.flatnonzero(~pd.Index(test_ids).isin(ids))
        problems.add_file_level(
            "missing_id",
            len(absent),
            lambda k: f"trustii_id {test_ids[absent[k]]} (NAME {test_names[absent[k]]!r}) of the test list has no row",
        )
    if image_sizes is not None:
        sizes = _sizes_lookup(image_sizes)
        at = sizes.index.get_indexer(names)
        w = np.where(at >= 0, sizes["img_w"].to_numpy(np.float64)[at], np.nan)
        h = np.where(at >= 0, sizes["img_h"].to_numpy(np.float64)[at], np.nan)
        tol = _INSIDE_TOLERANCE
        with np.errstate(invalid="ignore"):
            out_of = (
                (at >= 0)
                & np.isfinite(boxes).all(axis=1)
                & ((boxes[:, 0] < -tol) | (boxes[:, 1] < -tol) | (boxes[:, 2] > w + tol) | (boxes[:, 3] > h + tol))
            )
        problems.add(
            "outside_image", out_of, lambda i: f"box {_fmt_box(boxes[i])} is not inside the image ({w[i]:g} x {h[i]:g})"
        )
    _finish(problems, report, source, table, lenient=False)
    out = pd.DataFrame(
        {"trustii_id": ids, "NAME": names, **{c: boxes[:, k] for k, c in enumerate(BOX_COLUMNS)}, "class": classes},
        columns=list(SUBMISSION_COLUMNS),
    )
    report.kept, report.images = len(out), int(out["NAME"].nunique())
    report.images_checked = image_sizes is not None
    report.seconds = time.perf_counter() - start
    return out, report


def read_submission(
    path: str | Path,
    test: pd.DataFrame | None = None,
    image_sizes: pd.DataFrame | Mapping[str, tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Read and validate a submission CSV; see :func:`validate_submission`."""
    return validate_submission(read_raw_csv(path, SUBMISSION_COLUMNS), path, test, image_sizes)[0]


# ------------------------------------------------------------------------------------------------------ writing
def write_csv(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as CSV atomically (temporary file, then rename); floats without a trailing ``.0`` for whole
    numbers and with up to 10 significant digits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table.to_csv(tmp, index=False, float_format="%.10g")
    os.replace(tmp, path)
    return path


def write_submission(
    table: pd.DataFrame,
    path: str | Path,
    test: pd.DataFrame | None = None,
    image_sizes: pd.DataFrame | Mapping[str, tuple[int, int]] | None = None,
) -> Path:
    """Validate a submission (:func:`validate_submission`, strict) and write it; nothing is written when invalid."""
    valid, _ = validate_submission(table, path, test, image_sizes)
    return write_csv(valid, path)
