"""Class maps: how the class names of other public leukocyte data sets become the 23 Cytologia classes.

Each map is data: one :class:`MapEntry` per class name of the source data set, saying which Cytologia class it
becomes (``target``), or ``None`` when Cytologia has no class for it (its cells are skipped and counted as
``not_in_cytologia``, never silently dropped), or :data:`NEEDS_SUBTYPE` when the source gives no leukocyte subtype
for the box (its class then comes from an image-level label table, see :mod:`cytologia.data.importers.core`).
``kind`` states the decision: ``same`` (one-to-one), ``merged`` (several source classes, or a broader one, land in one
Cytologia class), ``split`` (a source class told apart by its file-name prefix, PBC's immature granulocytes),
``not_in_cytologia`` or ``subtype_from_image``. ``docs/datasets.md`` holds the same maps as tables
(:func:`markdown_table`; a test keeps the two equal).

Lookup is case-insensitive. A label ``A:B`` (folder ``A``, file-name prefix ``B``, as the folder-per-class reader
makes them) is looked up whole first, then as ``A``. A user map is a CSV ``source_class,cytologia_class`` (an empty
target = not in Cytologia; the target ``?`` = subtype from the image labels): :func:`read_class_map`.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cytologia.data.schema import CLASSES
from cytologia.errors import CytologiaInputError, ValidationError

NEEDS_SUBTYPE = "?"  # target of a box whose leukocyte subtype the source does not give (BCCD's "WBC")
KINDS: tuple[str, ...] = ("same", "merged", "split", "not_in_cytologia", "subtype_from_image")


@dataclass(frozen=True)
class MapEntry:
    """One source class: its Cytologia class (None: not in Cytologia; :data:`NEEDS_SUBTYPE`), the kind of decision
    and why."""

    source: str
    target: str | None
    kind: str
    note: str = ""


@dataclass(frozen=True)
class ClassMap:
    """A named class map of one source data set (entries in the order the docs list them)."""

    name: str
    dataset: str  # the data set it was written for, with its reference
    entries: tuple[MapEntry, ...]

    def __post_init__(self) -> None:
        for e in self.entries:
            if e.target is not None and e.target != NEEDS_SUBTYPE and e.target not in CLASSES:
                raise ValueError(f"class map {self.name}: {e.source!r} -> {e.target!r} is not a Cytologia class")
            if e.kind not in KINDS:
                raise ValueError(f"class map {self.name}: {e.source!r} has kind {e.kind!r}; kinds: {', '.join(KINDS)}")
        keys = [e.source.lower() for e in self.entries]
        if len(set(keys)) != len(keys):
            raise ValueError(f"class map {self.name}: a source class is listed twice")

    @property
    def lookup(self) -> Mapping[str, MapEntry]:
        return {e.source.lower(): e for e in self.entries}

    def entry(self, label: str) -> MapEntry | None:
        """The entry of a source label (``A:B`` falls back to ``A``); None when the map does not know it."""
        table = self.lookup
        key = label.strip().lower()
        if key in table:
            return table[key]
        head = key.split(":", 1)[0]
        return table.get(head) if head != key else None

    def known(self) -> str:
        """The source classes, for messages."""
        return ", ".join(e.source for e in self.entries)


def _same(source: str, target: str, note: str = "") -> MapEntry:
    return MapEntry(source, target, "same", note)


def _out(source: str, note: str) -> MapEntry:
    return MapEntry(source, None, "not_in_cytologia", note)


_PBC = ClassMap(
    "pbc",
    "PBC (Acevedo et al. 2020, Data in Brief 30:105474): 17,092 single-cell 360x363 JPEGs, one folder per class",
    (
        MapEntry("neutrophil", "PNN", "merged", "band (BNE_) and segmented (SNE_) files: Cytologia has no band class"),
        _same("eosinophil", "EO"),
        _same("basophil", "BA"),
        _same("lymphocyte", "LY"),
        _same("monocyte", "MO"),
        MapEntry("ig:PMY", "PM", "split", "immature granulocytes folder, file prefix PMY_ = promyelocyte"),
        MapEntry("ig:MY", "M", "split", "file prefix MY_ = myelocyte"),
        MapEntry("ig:MMY", "MM", "split", "file prefix MMY_ = metamyelocyte"),
        _out("ig", "immature granulocyte of unstated stage (prefix IG_ or none): no single Cytologia class"),
        _same("erythroblast", "Er"),
        MapEntry("platelet", "Thromb", "merged", "single platelets and clumps; Cytologia's Thromb is a platelet clump"),
    ),
)

_RAABIN = ClassMap(
    "raabin",
    "Raabin-WBC (Kouzehkanan et al. 2022, Sci. Rep. 12:1123): cropped cells, one folder per class",
    (
        _same("Neutrophil", "PNN"),
        _same("Eosinophil", "EO"),
        _same("Basophil", "BA"),
        _same("Lymphocyte", "LY"),
        _same("Monocyte", "MO"),
        MapEntry("Large Lymph", "LY", "merged", "the double-labelled subset's large lymphocytes"),
        MapEntry("Small Lymph", "LY", "merged", "the double-labelled subset's small lymphocytes"),
        MapEntry("Band", "PNN", "merged", "band neutrophils: Cytologia has no band class"),
        _out("Artifact", "not a leukocyte"),
        _out("Burst", "ruptured cell of unknown type; Cytologia's Lysee is a lymphocyte smudge"),
    ),
)

_LISC = ClassMap(
    "lisc",
    "LISC (Rezatofighi & Soltanian-Zadeh 2011, CMIG 35:333): 257 BMP images, one folder per class",
    (
        _same("Baso", "BA"),
        _same("eosi", "EO"),
        _same("lymp", "LY"),
        _same("mono", "MO"),
        _same("neut", "PNN"),
        _out("mixt", "mixed: several leukocytes of different types in one image, no box per cell"),
    ),
)

_BCCD = ClassMap(
    "bccd",
    "BCCD (Shenggan/BCCD_Dataset, MIT): 364 640x480 JPEGs, Pascal VOC boxes WBC/RBC/Platelets, labels.csv subtypes",
    (
        MapEntry("WBC", NEEDS_SUBTYPE, "subtype_from_image", "no subtype on the box: from labels.csv (--image-labels)"),
        _out("RBC", "red cell, not a leukocyte"),
        _out("Platelets", "single platelets; Cytologia's Thromb boxes platelet clumps"),
        _same("NEUTROPHIL", "PNN", "labels.csv category"),
        _same("EOSINOPHIL", "EO", "labels.csv category"),
        _same("BASOPHIL", "BA", "labels.csv category"),
        _same("LYMPHOCYTE", "LY", "labels.csv category"),
        _same("MONOCYTE", "MO", "labels.csv category"),
    ),
)

_IDENTITY = ClassMap(
    "cytologia",
    "a set already labelled with the 23 Cytologia class names (case-insensitive)",
    tuple(_same(c, c) for c in CLASSES),
)

CLASS_MAPS: Mapping[str, ClassMap] = MappingProxyType({m.name: m for m in (_PBC, _RAABIN, _LISC, _BCCD, _IDENTITY)})


def read_class_map(path: str | Path) -> ClassMap:
    """A user class map from a CSV ``source_class,cytologia_class[,note]``; bad rows raise :class:`ValidationError`
    naming the file and row."""
    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"class map {path}: no such file")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
        header = rows[0].keys() if rows else []
    if not rows or not {"source_class", "cytologia_class"} <= set(header):
        raise ValidationError(path, [(None, "needs a header source_class,cytologia_class[,note] and rows")])
    entries: list[MapEntry] = []
    problems: list[tuple[int | None, str]] = []
    seen: set[str] = set()
    for i, row in enumerate(rows, start=1):
        source = (row.get("source_class") or "").strip()
        target = (row.get("cytologia_class") or "").strip()
        if not source:
            problems.append((i, "empty source_class"))
        elif source.lower() in seen:
            problems.append((i, f"source class {source!r} repeats"))
        elif target and target != NEEDS_SUBTYPE and target not in CLASSES:
            problems.append((i, f"{target!r} is not a Cytologia class; valid: {' '.join(CLASSES)}"))
        else:
            seen.add(source.lower())
            kind = "not_in_cytologia" if not target else ("subtype_from_image" if target == NEEDS_SUBTYPE else "same")
            entries.append(MapEntry(source, target or None, kind, (row.get("note") or "").strip()))
    if problems:
        raise ValidationError(path, problems[:50], len(problems))
    return ClassMap(path.stem, f"user map {path}", tuple(entries))


def get_class_map(name_or_path: str | Path) -> ClassMap:
    """A built-in map by name (:data:`CLASS_MAPS`) or a CSV file; a miss names the built-in ones."""
    key = str(name_or_path)
    if key in CLASS_MAPS:
        return CLASS_MAPS[key]
    if Path(key).suffix.lower() == ".csv" or Path(key).is_file():
        return read_class_map(key)
    raise CytologiaInputError(f"unknown class map {key!r}: built-in maps {', '.join(CLASS_MAPS)}, or a CSV file")


def markdown_table(class_map: ClassMap) -> str:
    """The map as a markdown table (what ``docs/datasets.md`` shows)."""
    lines = ["| source class | Cytologia class | decision | note |", "| --- | --- | --- | --- |"]
    for e in class_map.entries:
        target = "—" if e.target is None else ("from image labels" if e.target == NEEDS_SUBTYPE else f"`{e.target}`")
        lines.append(f"| `{e.source}` | {target} | {e.kind.replace('_', ' ')} | {e.note} |")
    return "\n".join(lines)
