"""What every importer shares: the found cells, the problems, the class mapping, the checks and the written folder.

A reader (one module per layout, see :mod:`cytologia.data.importers`) only parses its layout: it returns the image
root and one :class:`Found` per cell (image path relative to the root, where it was found, the source's class name,
the box or None for a single-cell image), and adds what it cannot parse to :class:`Issues`. :func:`import_dataset`
then does the rest the same way for every layout:

1. image paths: absolute, ``..`` or a symbolic link leading out of the root -> ``bad_name``;
2. classes through the :class:`~cytologia.data.importers.class_maps.ClassMap`: a class the map does not know ->
   ``unknown_class``; a class the map states is not in Cytologia -> skipped as ``not_in_cytologia``; a box without
   a subtype (BCCD's "WBC") takes its image's class from ``image_labels`` when that names one class, else it is
   skipped as ``no_subtype`` / ``ambiguous_class``;
3. boxes of single-cell images (:mod:`cytologia.data.importers.cellbox`: whole image, threshold or detector);
4. the rows go through the same validation as our own tables (:func:`cytologia.data.io.validate_annotations`:
   missing or unreadable image, non-finite or empty box, box outside its image; boxes past the border are clipped),
   its messages naming the source file and element instead of a row of a table that never existed.

Problems of kind ``malformed``, ``unknown_class``, ``bad_name``, ``missing_image``, ``unreadable_image``,
``bad_coordinate``, ``empty_box``, ``outside_image`` are errors (a :class:`~cytologia.errors.ValidationError` listing
them, nothing written) unless ``lenient``, which skips, counts, records and logs them. The *stated* skips
(``not_in_cytologia``, ``no_subtype``, ``ambiguous_class``, ``not_image``, ``no_cell``) are decisions of the class
map or the layout, counted in either mode.

Written to ``out``: ``train.csv`` (Trustii ``NAME,x1,y1,x2,y2,class``), ``images/`` (copies, or hard links with
``link``; flat names made from the source path), ``sources.csv`` (``NAME,source,dataset,origin``: the data set is the
grouping key of folds and sampling, ``origin`` the image's path in the source), ``class_map.csv`` (the map used),
``skipped.csv`` (every skipped element: where, reason, message) and ``import_report.json``. The written folder is
then validated strictly, as ``cytologia validate`` would.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from cytologia.data.importers.cellbox import BOX_MODES, Box, detector_boxes, threshold_boxes
from cytologia.data.importers.class_maps import NEEDS_SUBTYPE, ClassMap, get_class_map
from cytologia.data.schema import BOX_COLUMNS, TRAIN_COLUMNS
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.paths import require_new_folder

log = logging.getLogger(__name__)

# Problems: errors in strict mode, counted skips with lenient.
ERRORS: tuple[str, ...] = (
    "malformed",  # a file that does not parse (XML, JSON, a label line), or an element lacking a field
    "unknown_class",  # a class the class map does not know
    "bad_name",  # an image path that is absolute or leads out of the source folder
    "missing_image",
    "unreadable_image",
    "bad_coordinate",
    "empty_box",
    "outside_image",
)
# Stated skips: decisions of the class map or the layout, counted in both modes.
STATED: tuple[str, ...] = ("not_in_cytologia", "no_subtype", "ambiguous_class", "not_image", "no_cell")
MAX_SHOWN = 50  # problems listed in an error message (the total is always given)
MAX_RECORDED = 1000  # skipped elements listed in the JSON report (skipped.csv has them all)
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
SOURCES_COLUMNS: tuple[str, ...] = ("NAME", "source", "dataset", "origin")
REPORT_FILE = "import_report.json"
SKIPPED_FILE = "skipped.csv"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DATASET = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class Found:
    """One cell as a reader found it. ``image``: path relative to the image root (``/``-separated); ``where``: the
    file and element, for messages; ``label``: the source's class name; ``box``: corners in pixels, or None when the
    image is one cell (folder-per-class sets)."""

    image: str
    where: str
    label: str
    box: Box | None = None


@dataclass(frozen=True)
class Skip:
    where: str
    reason: str
    message: str
    label: str = ""
    image: str = ""


class Issues:
    """Problems and stated skips met while importing, each with the element it concerns."""

    def __init__(self) -> None:
        self.items: list[Skip] = []
        self.files_read = 0

    def add(self, reason: str, where: str, message: str, label: str = "", image: str = "") -> None:
        if reason not in ERRORS and reason not in STATED:
            raise ValueError(f"unknown import reason {reason!r}")
        self.items.append(Skip(where, reason, message, label, image))

    @property
    def errors(self) -> list[Skip]:
        return [s for s in self.items if s.reason in ERRORS]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.items:
            out[s.reason] = out.get(s.reason, 0) + 1
        return out


@dataclass(frozen=True)
class ImportOptions:
    """How to import. ``class_map``: a built-in map name or a CSV file; ``dataset``: the grouping name written to
    ``sources.csv`` (default: the source folder's name); ``box``: the box of single-cell images (``whole``,
    ``threshold``, ``detector`` with ``detector`` a checkpoint run at ``detector_size`` px); ``image_labels``: CSV
    ``image,class`` (BCCD's ``labels.csv`` ``Image,Category`` works as is) giving the subtype of boxes that have none;
    ``annotations``: the COCO JSON (default: the one ``.json`` in the source folder); ``images``: image folder of a
    COCO set (default: ``images/`` beside the JSON when present, else the JSON's folder); ``classes``: class-name
    file of a YOLO set (default: ``classes.txt``, or ``names`` of ``data.yaml``); ``link``: hard-link images instead
    of copying (copy when the folders are on different devices)."""

    class_map: str = "cytologia"
    dataset: str | None = None
    lenient: bool = False
    box: str = "whole"
    detector: Path | None = None
    detector_size: int = 512
    image_labels: Path | None = None
    annotations: Path | None = None
    images: Path | None = None
    classes: Path | None = None
    link: bool = False
    workers: int | None = None


@dataclass
class ImportReport:
    """What an import read, kept and skipped (by reason), and where it wrote."""

    format: str
    src: str
    out: str
    dataset: str
    class_map: str
    mode: str
    box: str
    files_read: int = 0
    cells_found: int = 0
    boxes_kept: int = 0
    images_kept: int = 0
    clipped: int = 0
    box_fallbacks: int = 0  # single-cell images whose threshold/detector box fell back to the whole image
    skipped: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)  # Cytologia class -> boxes kept
    from_source: dict[str, dict[str, int]] = field(default_factory=dict)  # source label -> {target: boxes}
    records: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"{self.format} import of {self.src} as data set {self.dataset!r} (class map {self.class_map}, "
            f"{self.mode}, box {self.box}): {self.files_read} files read, {self.cells_found} cells found -> "
            f"{self.boxes_kept} boxes over {self.images_kept} images in {self.out} ({self.seconds:.2f} s)",
        ]
        if self.skipped:
            lines.append("  skipped: " + ", ".join(f"{k} {v}" for k, v in self.skipped.items()))
        if self.clipped or self.box_fallbacks:
            lines.append(f"  boxes clipped {self.clipped}; box fallbacks to the whole image {self.box_fallbacks}")
        lines.append("  classes: " + (", ".join(f"{k} {v}" for k, v in self.classes.items()) or "none"))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ class mapping
def read_image_labels(path: Path) -> dict[str, list[str]]:
    """Image-level labels: image key -> its class names. Columns ``image`` (or ``Image``/``NAME``) and ``class``
    (or ``Category``/``category``); a cell may list several classes separated by commas. Keys are the image's stem;
    an integer key also matches a stem ending in that number (BCCD's ``Image`` 3 is ``BloodImage_00003``)."""
    if not path.is_file():
        raise CytologiaInputError(f"image labels {path}: no such file")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    image_col = next((c for c in ("image", "Image", "NAME") if c in table.columns), None)
    class_col = next((c for c in ("class", "Category", "category") if c in table.columns), None)
    if image_col is None or class_col is None:
        header = list(table.columns)
        raise ValidationError(path, [(None, f"needs columns image,class (or Image,Category); header {header}")])
    out: dict[str, list[str]] = {}
    for image, classes in zip(table[image_col], table[class_col]):
        key = Path(image.strip()).stem
        names = [c.strip() for c in classes.split(",") if c.strip()]
        if key:
            out.setdefault(key, []).extend(names)
    return out


def _labels_of(image: str, labels: dict[str, list[str]]) -> list[str] | None:
    stem = Path(image).stem
    if stem in labels:
        return labels[stem]
    digits = re.search(r"(\d+)$", stem)
    if digits:
        number = int(digits.group(1))
        for key, value in labels.items():
            if key.isdigit() and int(key) == number:
                return value
    return None


def _map_classes(
    found: list[Found], class_map: ClassMap, issues: Issues, image_labels: dict[str, list[str]] | None
) -> list[str | None]:
    """The Cytologia class of every found cell, or None (an issue was added)."""
    out: list[str | None] = []
    for f in found:
        entry = class_map.entry(f.label)
        if entry is None:
            issues.add(
                "unknown_class",
                f.where,
                f"class {f.label!r} is not in class map {class_map.name!r} (it knows {class_map.known()}); "
                "give one that states it (--map FILE.csv)",
                f.label,
                f.image,
            )
            out.append(None)
        elif entry.target is None:
            why = entry.note or "not a Cytologia class"
            issues.add("not_in_cytologia", f.where, f"{f.label!r}: {why}", f.label, f.image)
            out.append(None)
        elif entry.target == NEEDS_SUBTYPE:
            out.append(_subtype(f, class_map, issues, image_labels))
        else:
            out.append(entry.target)
    return out


def _subtype(f: Found, class_map: ClassMap, issues: Issues, image_labels: dict[str, list[str]] | None) -> str | None:
    """The class of a box without a subtype, from its image's labels: kept only when they name one Cytologia class."""
    names = None if image_labels is None else _labels_of(f.image, image_labels)
    if not names:
        why = "no image labels given (--image-labels)" if image_labels is None else "its image has no label"
        issues.add("no_subtype", f.where, f"{f.label!r} box without a leukocyte subtype: {why}", f.label, f.image)
        return None
    targets = set()
    for name in names:
        entry = class_map.entry(name)
        targets.add(None if entry is None else entry.target)
    if len(targets) == 1 and None not in targets and NEEDS_SUBTYPE not in targets:
        return targets.pop()
    issues.add(
        "ambiguous_class",
        f.where,
        f"image labels {names} do not name one Cytologia class (class map {class_map.name!r}): which box is which "
        "is unknown",
        f.label,
        f.image,
    )
    return None


# ------------------------------------------------------------------------------------------------------ images
def _escapes(root: Path, image: str) -> str | None:
    """Why an image path is refused (None: it is fine): absolute, with a ``..`` leading out, or resolving (through a
    symbolic link) outside the root."""
    if not image or image.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", image):
        return f"image path {image!r} is absolute or empty; it must be relative to {root}"
    norm = posixpath.normpath(image.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return f"image path {image!r} leads out of {root}"
    real_root = root.resolve()
    target = (root / norm).resolve()
    if target != real_root and real_root not in target.parents:
        return f"image path {image!r} resolves to {target}, outside {real_root} (a symbolic link?)"
    return None


def _single_cell_boxes(
    root: Path, images: list[str], options: ImportOptions, sizes: dict[str, tuple[int, int]]
) -> tuple[dict[str, Box], int]:
    """Box of each single-cell image per ``options.box``; falls back to the whole image (counted) when the
    threshold or the detector finds nothing."""
    readable = [i for i in images if sizes.get(i, (-1, -1))[0] > 0]
    whole = {i: (0.0, 0.0, float(sizes[i][0]), float(sizes[i][1])) for i in readable}
    if options.box == "whole" or not readable:
        return whole, 0
    paths = [root / i for i in readable]
    if options.box == "threshold":
        found = threshold_boxes(paths)
    else:
        if options.detector is None:
            raise CytologiaInputError("box mode 'detector' needs a detector checkpoint (--detector FILE)")
        found = detector_boxes(paths, Path(options.detector), options.detector_size)
    fallbacks = sum(b is None for b in found)
    if fallbacks:
        log.warning("%d of %d images: no %s box found, the whole image is the box", fallbacks, len(paths), options.box)
    return {i: (b if b is not None else whole[i]) for i, b in zip(readable, found)}, fallbacks


def output_name(image: str, taken: set[str]) -> str:
    """A flat, safe, unique file name for an image path (``a/b c.jpg`` -> ``a__b_c.jpg``)."""
    parts = [p for p in image.replace("\\", "/").split("/") if p not in ("", ".")]
    stem, suffix = os.path.splitext("__".join(_SAFE.sub("_", p) for p in parts))
    name, k = stem + suffix, 1
    while name.lower() in taken:
        k += 1
        name = f"{stem}~{k}{suffix}"
    taken.add(name.lower())
    return name


def place_image(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another device, or links not allowed: copy
            pass
    shutil.copy2(src, dst)


def dataset_name(name: str | None, src: Path) -> str:
    """The data set's grouping name: given, or the source folder's name, lower-cased; letters, digits, ``_``, ``-``."""
    raw = name if name is not None else (src.stem if src.is_file() else src.resolve().name)
    value = _SAFE.sub("_", raw.strip().lower()).strip("._")
    if not _DATASET.match(value or ""):
        raise CytologiaInputError(f"data set name {raw!r} is not usable; give --name with letters, digits, _ or -")
    return value


# ---------------------------------------------------------------------------------------------------- the import
def import_dataset(fmt: str, src: str | Path, out: str | Path, options: ImportOptions | None = None) -> ImportReport:
    """Import the data set at ``src`` in layout ``fmt`` (:data:`cytologia.data.importers.FORMATS`) into ``out`` (see
    the module docstring). Raises :class:`ValidationError` listing every problem unless ``options.lenient``."""
    from cytologia.data.importers import get_reader
    from cytologia.data.io import read_annotations, validate_annotations, write_csv

    start = time.perf_counter()
    options = options or ImportOptions()
    src, out = Path(src), Path(out)
    if options.box not in BOX_MODES:
        raise CytologiaInputError(f"box mode {options.box!r} is not one of: {', '.join(BOX_MODES)}")
    if not src.exists():
        raise CytologiaInputError(f"{src}: no such file or folder")
    require_new_folder(out, "import")
    class_map = get_class_map(options.class_map)
    dataset = dataset_name(options.dataset, src)
    image_labels = read_image_labels(Path(options.image_labels)) if options.image_labels is not None else None
    reader = get_reader(fmt)
    issues = Issues()
    root, found = reader(src, options, issues)
    report = ImportReport(
        fmt, str(src), str(out), dataset, class_map.name, "lenient" if options.lenient else "strict", options.box
    )
    report.files_read, report.cells_found = issues.files_read, len(found)

    bad_images = {i: why for i in {f.image for f in found} if (why := _escapes(root, i)) is not None}
    for f in found:
        if f.image in bad_images:
            issues.add("bad_name", f.where, bad_images[f.image], f.label, f.image)
    found = [f for f in found if f.image not in bad_images]
    classes = _map_classes(found, class_map, issues, image_labels)
    kept = [(f, c) for f, c in zip(found, classes) if c is not None]

    single = sorted({f.image for f, _ in kept if f.box is None})
    cell_box: dict[str, Box] = {}
    if single:
        from cytologia.data.images import image_sizes

        wh, errors = image_sizes([root / i for i in single], workers=options.workers)
        sizes = {i: (int(w), int(h)) for i, (w, h) in zip(single, wh)}
        unread = {i: e for i, e in zip(single, errors) if e is not None}
        for f, _ in kept:
            if f.image in unread:  # a single-cell image without a size has no box: named here, not validated
                reason = "unreadable_image" if (root / f.image).is_file() else "missing_image"
                issues.add(reason, f.where, f"image unreadable: {unread[f.image]}", f.label, f.image)
        kept = [(f, c) for f, c in kept if f.image not in unread]
        cell_box, report.box_fallbacks = _single_cell_boxes(root, single, options, sizes)
    rows = [(f.image, *(f.box if f.box is not None else cell_box[f.image]), c) for f, c in kept]
    raw = pd.DataFrame(rows, columns=list(TRAIN_COLUMNS))
    valid, vreport = validate_annotations(raw, root, root, lenient=True, workers=options.workers)
    refused = {int(r["row"]) - 1: r for r in vreport.records}
    if len(valid) + len(refused) != len(raw):  # more than MAX_RECORDED refusals: find the rest without messages
        lost = sorted(set(range(len(raw))) - set(valid["box_id"].tolist()) - set(refused))
        refused.update({i: {"reason": "malformed", "message": "refused by validation"} for i in lost})
    for i, rec in sorted(refused.items()):
        f = kept[i][0]
        issues.add(str(rec["reason"]), f.where, str(rec["message"]), f.label, f.image)

    errors = sorted(issues.errors, key=lambda s: s.where.split(",")[0])  # by file; elements of a file in order
    if errors and not options.lenient:
        problems = [(None, f"{s.where}: {s.message}") for s in errors[:MAX_SHOWN]]
        raise ValidationError(src, problems, len(errors))

    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir()
    taken: set[str] = set()
    names = {i: output_name(i, taken) for i in pd.unique(valid["NAME"])}
    for image, name in names.items():
        place_image(root / image, out / "images" / name, options.link)
    table = valid[["NAME", *BOX_COLUMNS, "class"]].copy()
    table["NAME"] = table["NAME"].map(names)
    write_csv(table, out / "train.csv")
    sources = pd.DataFrame(
        {"NAME": list(names.values()), "source": dataset, "dataset": dataset, "origin": list(names)},
        columns=list(SOURCES_COLUMNS),
    )
    write_csv(sources, out / "sources.csv")
    pd.DataFrame(
        [(e.source, e.target or "", e.kind, e.note) for e in class_map.entries],
        columns=["source_class", "cytologia_class", "kind", "note"],
    ).to_csv(out / "class_map.csv", index=False)
    skipped = pd.DataFrame([asdict(s) for s in issues.items], columns=["where", "reason", "message", "label", "image"])
    if len(skipped):
        write_csv(skipped, out / SKIPPED_FILE)

    report.skipped = issues.counts()
    report.records = [asdict(s) for s in issues.items[:MAX_RECORDED]]
    report.boxes_kept, report.images_kept = len(table), len(names)
    report.clipped = int((valid["fixes"] == "clipped").sum())
    report.classes = {str(k): int(v) for k, v in table["class"].value_counts().sort_index().items()}
    labels_kept = [kept[i][0].label for i in valid["box_id"]]
    for label, target in zip(labels_kept, table["class"]):
        report.from_source.setdefault(label, {}).setdefault(str(target), 0)
        report.from_source[label][str(target)] += 1
    if errors:
        msg = f"{src}: {len(errors)} element(s) not imported: " + ", ".join(
            f"{k} {v}" for k, v in report.skipped.items() if k in ERRORS
        )
        log.warning(msg)
        report.warnings.append(msg)
    if table.empty:
        report.warnings.append("no cell was imported: train.csv is empty")
        log.warning("%s: no cell was imported", src)
    else:
        read_annotations(out / "train.csv", out / "images")  # the written folder passes validation, strictly
    report.seconds = round(time.perf_counter() - start, 3)
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return report
